"""Pretraining from packed shards: learning, guard rails on a planted NaN, exact resume, DDP, launch."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pyarrow as pa
import pytest
import yaml
from safetensors.torch import load_file

from manifests.publish import Publisher

from .conftest import ROOT, assert_one_line_error, write_recipe

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "to", "park", "and", "back", "home", "."]
SEQ = 16


@pytest.fixture
def packed(store):
    """A word-level tokenizer run and a packed dataset of 64 sequences (train) + 8 (validation)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from manifests.models import CHECKPOINT_DIR

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    with Publisher(store, kind="run", name="tok", stage="test", recipe={}) as pub:
        tokenizer.save_pretrained(pub.dir / CHECKPOINT_DIR)
        pub.publish(stats={})
    # A repetitive language: "the cat sat on the mat ." cycles, so a model can learn it.
    text = "the cat sat on the mat . a dog ran to the park and back home ."
    sentence = [vocab[w] for w in text.split(" ")]

    def rows(n: int, offset: int) -> list[dict]:
        return [{"id": f"seq-{offset + i}", "parents": [],
                 "input_ids": [sentence[(i + j) % len(sentence)] for j in range(SEQ)]} for i in range(n)]  # fmt: skip

    schema = pa.schema(
        [("id", pa.string()), ("parents", pa.list_(pa.string())), ("input_ids", pa.list_(pa.int32()))]
    )
    with Publisher(store, kind="dataset", name="packed", stage="test", recipe={}) as pub:
        pub.write_table(pa.Table.from_pylist(rows(64, 0), schema=schema), split="train")
        pub.write_table(pa.Table.from_pylist(rows(8, 64), schema=schema), split="validation")
        pub.publish(stats={})
    return store


def _recipe(tmp_path, extra: str = "", name: str = "lm"):
    base = yaml.safe_load(
        f"stage: train\nmethod: pretrain\nname: {name}\ndatasets: [{{ref: packed}}]\ntokenizer: tok\n"
        "shape: {hidden_size: 32, layers: 2, heads: 2}\nmax_steps: 8\nper_device_batch_size: 4\n"
        "learning_rate: 0.01\nwarmup_steps: 2\nsave_every: 2\neval_every: 4\neval_batches: 2\n"
    )
    # ``extra`` replaces a default key rather than repeating it (a recipe may give a key once).
    return write_recipe(tmp_path / f"{name}.yaml", yaml.safe_dump(base | (yaml.safe_load(extra) or {})))


def _metrics(m) -> list[dict]:
    return [json.loads(line) for line in (m.location / "metrics.jsonl").read_text().splitlines()]


def _weights(m) -> dict:
    return load_file(m.location / "checkpoint" / "model.safetensors")


def test_pretraining_learns_and_publishes_a_loadable_checkpoint(cli, tmp_path, packed):
    result = cli("--store", packed.root, "train", _recipe(tmp_path, "max_steps: 30\n"))
    assert result.code == 0, result.err
    m = packed.resolve("lm")
    steps = [r for r in _metrics(m) if "loss" in r]
    assert len(steps) == 30 and steps[-1]["loss"] < steps[0]["loss"] * 0.5
    assert {"lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s"} <= set(steps[0])
    assert steps[1]["lr"] > steps[0]["lr"] and steps[-1]["lr"] < steps[5]["lr"]  # warmup, then cosine
    assert "eval_loss" in steps[3] and m.stats["eval_loss"] is not None and m.stats["guard_triggers"] == []
    assert m.stats["tokens"] == 30 * 4 * SEQ
    roles = {p.name: p.role for p in m.parents}
    assert roles == {"packed": "input", "tok": "tokenizer"}
    from manifests.models import load_causal_lm

    model, tokenizer = load_causal_lm(m, packed)
    assert model.config.num_hidden_layers == 2 and tokenizer.eos_token == "<eos>"


def test_a_killed_run_resumes_to_the_same_weights(cli, tmp_path, packed):
    assert cli("--store", packed.root, "train", _recipe(tmp_path)).code == 0
    straight = packed.resolve("lm")
    env = {**os.environ, "DISTILLERY_FAULT_EXIT_AFTER_STEP": "4"}
    killed = subprocess.run([sys.executable, "-m", "manifests.cli", "--store", str(packed.root), "train",
                             str(_recipe(tmp_path, "seed: 0\n", name="lm2"))], cwd=ROOT, env=env, capture_output=True,
                            text=True)  # fmt: skip
    assert killed.returncode == 137, killed.stderr[-2000:]
    assert not any(m.name == "lm2" for m in packed.list())
    result = cli("--store", packed.root, "train", _recipe(tmp_path, "seed: 0\n", name="lm2"), "--resume")
    assert result.code == 0, result.err
    resumed = packed.resolve("lm2")
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys() and all(float((a[k] - b[k]).abs().max()) < 1e-6 for k in a)
    assert [r["loss"] for r in _metrics(resumed) if "loss" in r][-4:] == pytest.approx(
        [r["loss"] for r in _metrics(straight) if "loss" in r][-4:], abs=1e-6
    )


@pytest.mark.parametrize("nan_at, checkpointed", [(9, None), (21, 4)])
def test_resume_trains_again_what_came_after_the_checkpoint_and_logs_it_once(cli, tmp_path, packed, monkeypatch,
                                                                               nan_at, checkpointed):  # fmt: skip
    """A run stopped (by its guard) at step 3, before any checkpoint, or at step 6, after the step-4 one."""
    recipe = write_recipe(tmp_path / "r.yaml", _recipe(tmp_path, name="r").read_text().replace("save_every: 2",
                                                                                          "save_every: 4"))  # fmt: skip
    monkeypatch.setenv("DISTILLERY_FAULT_NAN_AT", str(nan_at))
    assert cli("--store", packed.root, "train", recipe).code == 1  # guard.action stop
    (work,) = packed.name_dir("run", "r").glob(".work-*")
    assert [p.name for p in work.glob("step-*")] == ([f"step-{checkpointed:06d}"] if checkpointed else [])
    monkeypatch.delenv("DISTILLERY_FAULT_NAN_AT")
    result = cli("--store", packed.root, "train", recipe, "--resume")
    assert result.code == 0, result.err
    m = packed.resolve("r")
    assert [r["step"] for r in _metrics(m)] == [
        1,
        2,
        3,
        4,
        5,
        6,
        7,
        8,
    ]  # no step twice, no stale guard record
    assert m.stats["guard_triggers"] == [] and m.stats["steps"] == 8


@pytest.mark.parametrize("action", ["skip", "rollback", "stop"])
def test_a_planted_nan_triggers_the_chosen_guard_action(cli, tmp_path, packed, monkeypatch, action):
    # Sequence position 21 is in the micro-batch of step 6 (4 sequences a step): after the step-4 checkpoint.
    monkeypatch.setenv("DISTILLERY_FAULT_NAN_AT", "21")
    result = cli("--store", packed.root, "train", _recipe(tmp_path, f"guard: {{action: {action}}}\n"))
    if action == "stop":
        assert_one_line_error(result, code=1)
        assert "nan loss at step 5" in result.err and "rollback" in result.err
        assert not any(m.name == "lm" for m in packed.list())
        return
    assert result.code == 0, result.err
    m = packed.resolve("lm")
    (trigger,) = m.stats["guard_triggers"]
    assert trigger["reason"] == "nan_loss" and trigger["action"] == action and trigger["positions"] == [20]
    assert m.stats["steps"] == 8 and math.isfinite(m.stats["final_loss"])  # 8 good steps
    assert m.stats["skipped_positions"] == ([20] if action == "rollback" else [])
    assert any("guard" in r for r in _metrics(m))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3"])
def test_two_processes_give_the_losses_of_one(cli, tmp_path, packed, strategy):
    assert cli("--store", packed.root, "train", _recipe(tmp_path, name="one")).code == 0
    two = write_recipe(tmp_path / "two.yaml", _recipe(tmp_path, f"strategy: {strategy}\n", name="two").read_text()
                       .replace("per_device_batch_size: 4", "per_device_batch_size: 2"))  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    port = {"ddp": "29517", "fsdp": "29518", "deepspeed-zero2": "29514", "deepspeed-zero3": "29515"}[strategy]
    result = subprocess.run([sys.executable, "-m", "manifests.cli", "--store", str(packed.root), "train", str(two),
                             "--nproc", "2", "--master-port", port], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = packed.resolve("one"), packed.resolve("two")
    assert (two.stats["processes"], two.stats["strategy"], two.producer.hardware["processes"]) == (
        2,
        strategy,
        2,
    )
    assert one.stats["strategy"] == "single" and "processes" not in one.producer.hardware
    a = [r["loss"] for r in _metrics(one) if "loss" in r]
    b = [r["loss"] for r in _metrics(two) if "loss" in r]
    assert len(a) == len(b) == 8 and b == pytest.approx(a, rel=1e-4, abs=1e-5)
    # The published weights are whole (FSDP shards gathered) and equal the one-process run's.
    wa, wb = _weights(one), _weights(two)
    assert wa.keys() == wb.keys() and all(float((wa[k] - wb[k]).abs().max()) < 1e-4 for k in wa)


def _torchrun(store, recipe, port: str, *extra: str, env: dict | None = None):
    return subprocess.run([sys.executable, "-m", "manifests.cli", "--store", str(store.root), "train", str(recipe),
                           "--nproc", "2", "--master-port", port, *extra], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=300)  # fmt: skip


def test_under_zero2_a_nan_rolls_back_and_a_killed_run_resumes_exactly(tmp_path, packed):
    """DeepSpeed applies a step before the guards see it: rollback reloads the last checkpoint. A NaN at
    step 6 rolled back in a run straight through, and in one killed after step 4 and resumed: same weights."""
    extra = "strategy: deepspeed-zero2\ngradient_accumulation_steps: 2\nguard: {action: rollback}\n"
    two = lambda name: write_recipe(tmp_path / f"{name}.yaml", _recipe(tmp_path, extra, name=name).read_text()  # noqa: E731
                                    .replace("per_device_batch_size: 4", "per_device_batch_size: 1"))  # fmt: skip
    nan = {"DISTILLERY_FAULT_NAN_AT": "21"}
    assert _torchrun(packed, two("zs"), "29534", env=nan).returncode == 0
    killed = _torchrun(packed, two("zk"), "29534", env=nan | {"DISTILLERY_FAULT_EXIT_AFTER_STEP": "4"})
    assert killed.returncode == 137, killed.stderr[-2000:]
    again = _torchrun(packed, two("zk"), "29534", "--resume", env=nan)
    assert again.returncode == 0, again.stderr[-3000:]
    straight, resumed = packed.resolve("zs"), packed.resolve("zk")
    for m in (straight, resumed):
        (trigger,) = m.stats["guard_triggers"]
        assert (
            trigger["reason"] == "nan_loss"
            and trigger["action"] == "rollback"
            and m.stats["skipped_positions"]
        )
        assert m.stats["steps"] == 8 and m.stats["strategy"] == "deepspeed-zero2"
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys() and all(float((a[k] - b[k]).abs().max()) < 1e-6 for k in a)
    assert all(math.isfinite(float(w.abs().max())) for w in a.values())


def test_a_torchrun_job_stopped_by_sigterm_or_a_taken_port_ends_in_one_line(tmp_path, packed):
    import signal
    import socket
    import time

    long = write_recipe(tmp_path / "long.yaml", _recipe(tmp_path, name="long").read_text()
                        .replace("max_steps: 8", "max_steps: 100000").replace("save_every: 2", "save_every: 1000"))  # fmt: skip
    command = [
        sys.executable,
        "-m",
        "manifests.cli",
        "--store",
        str(packed.root),
        "train",
        str(long),
        "--nproc",
        "2",
    ]
    with open(tmp_path / "stderr.txt", "w") as log:  # a file, not a pipe: a full pipe would stall the job
        job = subprocess.Popen([*command, "--master-port", "29536"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log,
                               text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
        deadline = time.time() + 120
        while (
            not list(packed.name_dir("run", "long").glob(".work-*/metrics.jsonl")) and time.time() < deadline
        ):
            time.sleep(0.5)  # until the processes train
        job.send_signal(signal.SIGTERM)  # what a scheduler sends at a time limit
        job.wait(timeout=120)
    err = (tmp_path / "stderr.txt").read_text()
    assert job.returncode == 143 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        "error: stopped by SIGTERM; nothing was published -- '--resume' continues from the last checkpoint"
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 29537))
        taken.listen()
        result = subprocess.run([*command, "--master-port", "29537"], cwd=ROOT, capture_output=True, text=True,
                                timeout=120)  # fmt: skip
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
    assert "could not meet at 127.0.0.1:29537" in result.stderr and "pass --master-port" in result.stderr


def test_an_error_in_every_process_of_a_torchrun_job_is_one_line(tmp_path, packed):
    """The batch is checked against the data inside the processes: each fails, one line is printed."""
    bad = (
        _recipe(tmp_path, name="big")
        .read_text()
        .replace("per_device_batch_size: 4", "per_device_batch_size: 40")
    )
    result = subprocess.run([sys.executable, "-m", "manifests.cli", "--store", str(packed.root), "train",
                             str(write_recipe(tmp_path / "big.yaml", bad)), "--nproc", "2", "--master-port", "29516"],
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == [
        "error: a batch of 80 sequences is larger than the data (64 sequences); lower per_device_batch_size"
    ]
    assert not any(m.name == "big" for m in packed.list())


def test_emit_slurm_writes_a_torchrun_script(cli, tmp_path, packed):
    script = tmp_path / "job.sbatch"
    result = cli("--store", packed.root, "train", "run", _recipe(tmp_path), "--nproc", "4", "--nnodes", "2",
                 "--emit-slurm", script)  # fmt: skip
    assert result.code == 0, result.err
    text = script.read_text()
    assert "#SBATCH --nodes=2" in text and "--nproc_per_node=4" in text and "torch.distributed.run" in text
    assert "manifests.cli" in text and str(_recipe(tmp_path)) in text and "--emit-slurm" not in text


def test_bad_pretraining_recipes_are_one_line(cli, tmp_path, packed):
    cases = {
        "datasets: [{ref: tok}]": "no dataset manifest named 'tok'",
        "tokenizer: packed": "no run manifest named 'packed'",
        "model: tok": "give 'model'",
        "method: pretrian": "did you mean 'pretrain'",
        "per_device_batch_size: 1000": "larger than the data (64 sequences)",
        "strategy: deepspeed-zero2\nguard: {action: skip}": "guard.action skip cannot be done under deepspeed-zero2",
    }
    for line, message in cases.items():
        result = cli("--store", packed.root, "train", _recipe(tmp_path, line, name="bad"))
        assert_one_line_error(result)
        assert message in result.err, (line, result.err)


def test_the_example_recipe_pretrains_on_the_packed_demo_corpus(cli, tmp_path, store):
    """corpus → BPE tokenizer → pack → pretrain-tiny.yaml (the tokenizer swapped for speed)."""
    run = lambda *a: cli("--store", store.root, *map(str, a))  # noqa: E731
    assert run("corpus", "build", "examples/recipes/demo-corpus.yaml").code == 0
    assert (
        run("train", "tokenizer", "examples/recipes/demo-tokenizer.yaml", "--set", "vocab_size=600").code == 0
    )
    packed = run(
        "train",
        "pack",
        "examples/recipes/demo-pack.yaml",
        "--set",
        "tokenizer=demo-bpe",
        "--set",
        "seq_len=64",
    )
    assert packed.code == 0, packed.err
    result = run("train", "examples/recipes/pretrain-tiny.yaml", "--set", "tokenizer=demo-bpe", "--set", "max_steps=6",
                 "--set", "shape={hidden_size: 32, layers: 1, heads: 2}", "--set", "eval_every=3", "--set", "save_every=3")  # fmt: skip
    assert result.code == 0, result.err
    m = store.resolve("tiny-lm")
    assert m.stats["steps"] == 6 and m.stats["eval_loss"] is not None
    assert {p.name: p.role for p in m.parents} == {"demo-pack": "input", "demo-bpe": "tokenizer"}
    # Data packed with another tokenizer is refused before training.
    assert run("train", "tokenizer", "examples/recipes/demo-tokenizer.yaml", "--set", "vocab_size=500",
               "--set", "name=other-bpe").code == 0  # fmt: skip
    wrong = run("train", "examples/recipes/pretrain-tiny.yaml", "--set", "tokenizer=other-bpe")
    assert_one_line_error(wrong)
    assert "was packed with tokenizer run" in wrong.err and "other-bpe" in wrong.err
