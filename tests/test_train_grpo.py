"""GRPO (``method: grpo``): a tiny policy learns a scripted reward; rollouts are published with lineage;
resume, two processes, RL guard rails and mistakes.

The policy is a 2-layer Llama over the tests' word-level vocabulary (19 tokens); the reward is the regex
verifier of ``synth cot`` -- 1 when the answer mentions ``alpha`` -- which a random policy meets about a
fifth of the time. The advantage and loss formulas are checked in ``tests/test_rl_losses.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pytest

from manifests.errors import RunFailed
from manifests.publish import Publisher
from manifests.recipes import parse_config
from manifests.store import Store
from train.grpo import GRPORecipe, train_grpo
from train.rl_core import step_prompts

from .conftest import ROOT, WORDS, assert_one_line_error, tiny_tokenizer
from .test_train_distill import llama, publish_model
from .test_train_sft import weights_of

PATTERN = r".*\balpha\b.*"


def prompt_rows(n: int) -> list[dict]:
    return [{"id": f"q{i}", "parents": [], "prompt": [{"role": "user", "content": " ".join(WORDS[i % 5 : i % 5 + 3])}],
             "reference": PATTERN} for i in range(n)]  # fmt: skip


@pytest.fixture(scope="module")
def rl_store(tmp_path_factory) -> Store:
    store = Store(tmp_path_factory.mktemp("grpo") / "store")
    publish_model(store, "policy", llama(3, 2, 64, 4), tiny_tokenizer())
    other = tiny_tokenizer(WORDS[:-5])
    publish_model(store, "foreign", llama(5, 2, 64, 4, vocab=len(other)), other)
    publish_model(store, "rm", reward_model(len(tiny_tokenizer())), tiny_tokenizer())
    publish_model(store, "rm-foreign", reward_model(len(other)), other)
    for name, rows in (("prompts", prompt_rows(8)), ("bare", [{k: v for k, v in r.items() if k != "reference"}
                                                            for r in prompt_rows(4)])):  # fmt: skip
        with Publisher(store, kind="dataset", name=name, stage="test", recipe={"rows": len(rows)}) as pub:
            pub.write_table(pa.Table.from_pylist(rows), split="train")
            pub.publish()
    return store


def reward_model(vocab: int):
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(7)
    return LlamaForSequenceClassification(LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, num_labels=1, pad_token_id=0, bos_token_id=1, eos_token_id=2))  # fmt: skip


BASE = {"model": "policy", "datasets": [{"ref": "prompts"}], "rewards": [{"verifier": "regex"}],
        "group_size": 8, "prompts_per_step": 2, "max_new_tokens": 4, "learning_rate": 0.02,
        "peft": {"method": "none"}, "max_steps": 3}  # fmt: skip


def grpo(store: Store, name: str, **recipe):
    return train_grpo(parse_config(GRPORecipe, {"name": name} | BASE | recipe, "test"), store)


def records(manifest) -> list[dict]:
    return [json.loads(line) for line in (manifest.location / "metrics.jsonl").read_text().splitlines()]


def test_prompts_are_a_seeded_shuffle_per_pass():
    first = [i for s in range(1, 5) for i in step_prompts(8, s, 2, seed=0)]
    assert sorted(first) == list(range(8))  # one pass: every prompt once
    assert step_prompts(8, 3, 2, seed=0) == step_prompts(8, 3, 2, seed=0)


def test_the_policy_learns_a_scripted_reward_and_its_rollouts_are_data(rl_store):
    run = grpo(rl_store, "grpo-learns", max_steps=12, loss_type="grpo", learning_rate=0.005)
    steps = [r for r in records(run) if "reward_mean" in r]
    early = sum(r["reward_mean"] for r in steps[:3]) / 3
    late = sum(r["reward_mean"] for r in steps[-3:]) / 3
    assert early < 0.5 and late > early + 0.4, (early, late)
    assert {"zero_spread", "kl", "clip_ratio", "entropy", "length_mean", "truncated", "generation_s",
            "training_s", "reward/verifier:regex"} <= steps[0].keys()  # fmt: skip
    data = rl_store.resolve("grpo-learns-rollouts")
    assert {p.id for p in data.parents} == {run.id, rl_store.resolve("prompts").id}
    table = pa.parquet.read_table(data.location / data.data_files()[0].path).to_pylist()
    assert len(table) == 12 * 2 * 8 == data.stats["rows"]
    row = table[0]
    assert row["parents"] == [row["prompt_id"]] and row["step"] == 1 and row["policy_step"] == 0
    assert json.loads(row["verdicts"])[0]["name"] == "verifier:regex"
    group = [r for r in table if r["step"] == 1 and r["prompt_id"] == row["prompt_id"]]
    spread = len({r["reward"] for r in group}) == 1
    assert all(r["zero_spread"] == spread for r in group)
    if not spread:  # GRPO: within a group the advantages are centred
        assert abs(sum(r["advantage"] for r in group)) < 1e-4
    from manifests.lineage import trace_record

    traced = trace_record(rl_store, row["id"])  # from a rollout back to its prompt record
    assert traced.row["id"] == row["id"] and traced.parents[0].row["id"] == row["prompt_id"]
    assert run.producer.recipe["reward_functions"][0]["name"] == "verifier:regex"
    assert run.producer.recipe["reward_functions"][0]["version"]


def test_a_lora_policy_with_a_kl_penalty_to_its_base(rl_store):
    run = grpo(rl_store, "grpo-kl", peft={"method": "lora", "r": 4}, beta=0.1, max_steps=3, learning_rate=0.05,
               loss_type="dr_grpo", advantage="rloo")  # fmt: skip
    steps = [r for r in records(run) if "reward_mean" in r]
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the adapter starts as the identity
    assert steps[-1]["kl"] > 0
    assert (run.location / "checkpoint" / "adapter_config.json").is_file()


def test_a_reward_model_and_a_verifier_weighted_together(rl_store):
    run = grpo(
        rl_store,
        "grpo-rm",
        rewards=[{"verifier": "regex"}, {"reward_model": "rm", "weight": 0.5}],
        max_steps=1,
    )
    step = next(r for r in records(run) if "reward_mean" in r)
    both = step["reward/verifier:regex"] + 0.5 * step["reward/reward_model:rm"]
    assert step["reward_mean"] == pytest.approx(both, abs=1e-5)
    assert {p.role for p in run.parents} == {"input", "base_model", "reward_model"}


def test_guards_stop_on_entropy_collapse_with_the_steps_prompts(rl_store):
    with pytest.raises(RunFailed, match="entropy collapse at step 1"):
        grpo(rl_store, "grpo-collapse", guard={"entropy_floor": 50.0, "entropy_patience": 1})
    with pytest.raises(RunFailed, match="length explosion at step 1 and no checkpoint"):
        grpo(rl_store, "grpo-long", guard={"length_ceiling": 0.5, "action": "rollback"})
    work = next(rl_store.name_dir("run", "grpo-collapse").glob(".work-*"))
    guard = next(
        r["guard"] for r in map(json.loads, (work / "metrics.jsonl").read_text().splitlines()) if "guard" in r
    )
    assert guard["reason"] == "entropy_collapse" and len(guard["prompts"]) == 2
    assert not rl_store.list(kind="run", name="grpo-collapse")


def test_a_rollback_returns_to_the_last_checkpoint_and_goes_on(rl_store):
    """Entropy below the floor for 2 steps: at step 2 the run goes back to step 1's checkpoint, and the
    next steps take the next prompts (the counter starts again)."""
    run = grpo(rl_store, "grpo-rollback", max_steps=3, save_every=1,
               guard={"entropy_floor": 50.0, "entropy_patience": 2, "action": "rollback"})  # fmt: skip
    triggers = run.stats["guard_triggers"]
    assert [(t["step"], t["reason"], t["action"]) for t in triggers] == [(2, "entropy_collapse", "rollback")]
    assert len(triggers[0]["prompts"]) == 2


@pytest.mark.parametrize(
    "extra, message",
    [
        ("group_size: 1", "at least 2"),
        ("datasets: [{ref: bare}]", "lacks column"),
        ("rewards: [{reward_model: foreign}]", "no reward model"),
        ("rewards: [{reward_model: rm-foreign}]", "another tokenizer"),
        ("rewards: [{verifier: regex, reward_model: policy}]", "one of them"),
    ],
)
def test_grpo_mistakes_are_one_line(rl_store, cli, tmp_path, extra, message):
    lines = {"stage": "train", "method": "grpo", "name": "grpo-bad", "model": "policy",
             "datasets": "[{ref: prompts}]", "rewards": "[{verifier: regex}]"}  # fmt: skip
    key = extra.split(":")[0]
    lines[key] = extra.split(": ", 1)[1]
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("".join(f"{k}: {v}\n" for k, v in lines.items()))
    result = cli("--store", str(rl_store.root), "train", "run", str(recipe))
    assert_one_line_error(result)
    assert message in result.err


def _cli(store: Store, recipe, *extra: str, env: dict | None = None):
    command = [
        sys.executable,
        "-m",
        "manifests.cli",
        "--store",
        str(store.root),
        "train",
        "run",
        str(recipe),
        *extra,
    ]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})  # fmt: skip


def _recipe(tmp_path, name: str, **extra) -> str:
    data = {"stage": "train", "method": "grpo", "name": name} | BASE | extra
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(data))  # (JSON is YAML)
    return str(path)


def test_a_killed_grpo_run_resumes_to_the_weights_of_an_uninterrupted_one(rl_store, cli, tmp_path):
    import torch

    straight = grpo(rl_store, "grpo-straight", max_steps=3, save_every=1)
    recipe = _recipe(tmp_path, "grpo-resumed", max_steps=3, save_every=1)
    killed = _cli(rl_store, recipe, env={"DISTILLERY_FAULT_EXIT_AFTER_STEP": "1"})
    assert killed.returncode == 137, killed.stderr[-2000:]
    # The resume runs in this process: only the kill needs a process of its own.
    again = cli("--store", rl_store.root, "train", "run", recipe, "--resume")
    assert again.code == 0, again.err[-2000:]
    assert "training from the start" not in again.err  # it did resume
    resumed = rl_store.resolve("grpo-resumed")
    a, b = weights_of(straight), weights_of(resumed)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    rollouts = rl_store.resolve("grpo-resumed-rollouts")
    assert rollouts.stats["rows"] == 3 * 2 * 8 and rollouts.stats["steps"] == 3


def test_two_processes_under_torchrun_train_what_one_process_trains(rl_store, tmp_path):
    import torch

    one = grpo(rl_store, "grpo-one", max_steps=2)
    result = _cli(
        rl_store, _recipe(tmp_path, "grpo-two", max_steps=2), "--nproc", "2", "--master-port", "29541"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    two = rl_store.resolve("grpo-two")
    assert two.stats["processes"] == 2
    a, b = weights_of(one), weights_of(two)
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
    r1, r2 = ([r["reward_mean"] for r in records(m) if "reward_mean" in r] for m in (one, two))
    assert r1 == pytest.approx(r2)
