"""White-box distillation (``method: distill``) and stored teacher outputs (``train teacher-logits``).

A 4-layer teacher and 2-layer students (one as wide as the teacher, one narrower), random-init from a
config with the tests' word-level tokenizer, train for a step or a few; the losses themselves are
checked against direct computations in ``tests/test_distill_losses.py``.
"""

from __future__ import annotations

import json

import pytest

from manifests.errors import DistilleryError
from manifests.publish import Publisher
from manifests.recipes import parse_config
from manifests.store import Store
from train.distill import DistillRecipe, train_distill
from train.teacher_logits import TeacherLogitsRecipe, run_teacher_logits

from .conftest import ROOT, TINY_SPECIAL, WORDS, assert_one_line_error, tiny_tokenizer
from .test_train_sft import chat_rows, publish_dataset, weights_of


def llama(seed: int, layers: int, width: int, heads: int, vocab: int | None = None, sharp: float = 1.0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab or len(TINY_SPECIAL) + len(WORDS), hidden_size=width,
                         intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # a teacher with opinions: a random init's next-token distribution is nearly flat
        model.lm_head.weight.mul_(sharp)
    return model


def publish_model(store: Store, name: str, model, tokenizer) -> None:
    from manifests.models import CHECKPOINT_DIR

    with Publisher(store, kind="run", name=name, stage="test", recipe={"model": name}) as pub:
        model.save_pretrained(pub.dir / CHECKPOINT_DIR)
        tokenizer.save_pretrained(pub.dir / CHECKPOINT_DIR)
        pub.publish(stats={})


@pytest.fixture(scope="module")
def kd_store(tmp_path_factory) -> Store:
    """Runs ``teacher`` (4 layers, width 64), ``teacher-b`` (another seed), ``student`` (2 layers, width
    64), ``narrow`` (2 layers, width 32, 2 heads), ``foreign`` (another vocabulary); dataset ``chat``."""
    store = Store(tmp_path_factory.mktemp("distill") / "store")
    tok = tiny_tokenizer()
    publish_model(store, "teacher", llama(1, 4, 64, 4, sharp=30.0), tok)
    publish_model(store, "teacher-b", llama(2, 4, 64, 4, sharp=30.0), tok)
    publish_model(store, "student", llama(3, 2, 64, 4), tok)
    publish_model(store, "narrow", llama(4, 2, 32, 2), tok)
    other = tiny_tokenizer(WORDS[:-5])
    publish_model(store, "foreign", llama(5, 2, 64, 4, vocab=len(other)), other)
    publish_dataset(store, "chat", chat_rows(16))
    store_outputs(store, "tl-8", top_k=8)
    return store


def distill(store: Store, name: str, **recipe):
    data = {"name": name, "model": "student", "teacher": "teacher", "datasets": [{"ref": "chat"}], "max_steps": 1,
            "max_length": 128, "learning_rate": 1e-2, "per_device_batch_size": 4, "peft": {"method": "none"}} | recipe  # fmt: skip
    if "teacher_outputs" in recipe or "teachers" in recipe:
        data.pop("teacher")
    if "stages" in recipe:
        data.pop("max_steps")
    data = {k: v for k, v in data.items() if v is not None}
    return train_distill(parse_config(DistillRecipe, data, "test"), store)


def store_outputs(store: Store, name: str, **recipe):
    data = {"name": name, "teacher": "teacher", "datasets": [{"ref": "chat"}], "max_length": 128} | recipe
    return run_teacher_logits(parse_config(TeacherLogitsRecipe, data, "test"), store)


def metrics(manifest) -> list[dict]:
    return [json.loads(line) for line in (manifest.location / "metrics.jsonl").read_text().splitlines()]


def direct_loss(student, teachers, weights, batch, kind: str, temperature: float, ce: float):
    """The distillation loss from whole logits, with plain formulas: the reference."""
    import torch
    import torch.nn.functional as F

    labels = batch["labels"][:, 1:]
    mask = labels != -100
    s = (
        student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        .logits[:, :-1][mask]
        .float()
    )
    with torch.no_grad():
        probs = sum(w * F.softmax(t(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][mask]
                                  .float(), -1) for t, w in zip(teachers, weights, strict=True))  # fmt: skip
    p = F.softmax(probs.log() / temperature, -1)
    log_q = F.log_softmax(s / temperature, -1)
    kl = (
        (p * (p.log() - log_q)).sum(-1) if kind == "forward_kl" else (log_q.exp() * (log_q - p.log())).sum(-1)
    )
    return (kl.sum() * temperature**2 + ce * F.cross_entropy(s, labels[mask], reduction="sum")) / mask.sum()


@pytest.mark.parametrize("kind, teachers", [("forward_kl", 1), ("reverse_kl", 2)])
def test_the_chunked_loss_and_its_gradients_equal_a_direct_computation(kd_store, monkeypatch, kind, teachers):
    """Chunks of 3 positions (so a batch spans many), one or two mixed teachers, T = 2, a CE weight."""
    import tempfile

    import torch
    from datasets import Dataset
    from trl import SFTConfig

    import train.distill as distill_module
    from manifests.models import load_causal_lm
    from train.teacher_logits import example_tokens

    tok = tiny_tokenizer()
    monkeypatch.setattr(distill_module, "LOGITS_PER_CHUNK", 4 * len(tok) * 3)
    refs = [{"ref": "teacher", "weight": 3.0}, {"ref": "teacher-b", "weight": 1.0}][:teachers]
    cfg = parse_config(DistillRecipe, {"name": "x", "model": "student", "teachers": refs, "datasets": [{"ref": "chat"}],
                                       "divergence": kind, "temperature": 2.0, "loss": {"logits": 1.0, "ce": 0.5}}, "t")  # fmt: skip
    models = [load_causal_lm(kd_store.resolve(r["ref"]), kd_store)[0].eval() for r in refs]
    student = llama(3, 2, 64, 4)
    rows = [example_tokens(r, "messages", tok, 128) for r in chat_rows(4)]
    args = SFTConfig(output_dir=tempfile.mkdtemp(), report_to="none", use_cpu=True, max_length=128,
                     remove_unused_columns=False, activation_checkpointing=False)  # fmt: skip
    trainer = distill_module.distill_trainer(
        cfg,
        models,
        [[] for _ in models],
        [[] for _ in models],
        None,
        model=student,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        data_collator=distill_module.stored_outputs_collator(0),
    )
    batch = distill_module.stored_outputs_collator(0)([dict(r) for r in rows])
    student.train()
    ours = trainer.compute_loss(student, dict(batch))
    ours.backward()
    mine = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    total = sum(r["weight"] for r in refs)
    reference = direct_loss(student, models, [r["weight"] / total for r in refs], batch, kind, 2.0, 0.5)
    reference.backward()
    assert float(ours.detach()) == pytest.approx(float(reference.detach()), rel=1e-4)
    for n, p in student.named_parameters():
        torch.testing.assert_close(mine[n], p.grad, rtol=1e-3, atol=1e-6)


def test_online_distillation_brings_the_student_to_its_teacher(kd_store, cli):
    """Forward KL falls over the steps; lineage names teacher and base; every component is logged."""
    m = distill(kd_store, "kd", max_steps=6, loss={"logits": 1.0, "ce": 0.2})
    logged = metrics(m)
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert logged[-1]["distill_logits"] < logged[0]["distill_logits"] * 0.8
    assert all("distill_ce" in r and "distill_hidden" not in r for r in logged if "loss" in r)
    roles = {p.name: p.role for p in m.parents}
    assert roles == {"chat": "input", "student": "base_model", "teacher": "teacher"}
    assert m.producer.recipe["teachers"][0]["ref"] == kd_store.resolve("teacher").id
    assert m.stats["components"].keys() == {"logits", "ce"}
    lineage = cli("--store", kd_store.root, "manifests", "lineage", m.ref)
    assert lineage.code == 0 and "teacher" in lineage.out and "chat" in lineage.out, lineage.out


def test_stored_top_k_outputs_train_what_the_online_teacher_trains(kd_store):
    """Stored outputs of the whole vocabulary (float16) give the online run's weights; a smaller k with
    the leftover spread gives other weights."""
    vocab = len(tiny_tokenizer())
    full = store_outputs(kd_store, "tl-full", top_k=vocab)
    assert full.stats["top_k"] == vocab and full.stats["rows"] == 16
    assert {p.role for p in full.parents} == {"teacher", "input"}
    online = distill(kd_store, "kd-online", max_steps=2)
    offline = distill(kd_store, "kd-offline", max_steps=2, teacher_outputs="tl-full", datasets=[])
    a, b = weights_of(online), weights_of(offline)
    # The same updates up to float16 storage (Adam turns a tiny gradient's rounding into a visible step,
    # so they are compared as a whole: the difference is a small share of the update).
    start = weights_of(kd_store.resolve("student"))
    assert all(float((a[k] - b[k]).norm()) < 0.05 * float((a[k] - start[k]).norm()) for k in a)
    first = [r["distill_logits"] for r in metrics(online) if "loss" in r]
    assert first == pytest.approx([r["distill_logits"] for r in metrics(offline) if "loss" in r], rel=1e-3)
    assert {p.role for p in offline.parents} == {"input", "base_model", "teacher_outputs"}
    small = store_outputs(kd_store, "tl-4", top_k=4)
    spread = distill(kd_store, "kd-top4", max_steps=2, teacher_outputs="tl-4")
    top4 = [r["distill_logits"] for r in metrics(spread) if "loss" in r]
    assert top4 != pytest.approx(first, rel=1e-3)
    assert small.stats["positions"] == full.stats["positions"]


def test_stored_outputs_are_refused_for_other_tokens_data_or_k(kd_store, tmp_path):
    with pytest.raises(DistilleryError, match="tokens differ from those teacher_outputs"):
        distill(kd_store, "x", teacher_outputs="tl-8", max_length=16)  # truncated otherwise than stored
    with pytest.raises(DistilleryError, match="more than the 8 tokens per position"):
        distill(kd_store, "x", teacher_outputs="tl-8", top_k=9)
    publish_dataset(kd_store, "chat", chat_rows(15))  # a new version of the data
    try:
        with pytest.raises(DistilleryError, match="were made for chat@.*not chat@"):
            distill(kd_store, "x", teacher_outputs="tl-8", datasets=[{"ref": "chat"}])
    finally:
        publish_dataset(kd_store, "chat", chat_rows(16))  # (the same content: that version is latest again)
    with pytest.raises(DistilleryError, match="another tokenizer than student foreign"):
        distill(kd_store, "x", teacher_outputs="tl-8", model="foreign")


def test_hidden_states_through_a_projection_and_attention_across_head_counts(kd_store):
    """A narrower student learns the teacher's hidden states through a projection saved beside (not in)
    its checkpoint, and its attention maps (2 heads vs 4)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    m = distill(kd_store, "kd-hidden", model="narrow", max_steps=2,
                loss={"logits": 1.0, "hidden": 1.0, "attention": 1.0}, hidden_layers={"last": 2})  # fmt: skip
    record = metrics(m)[-1]
    assert record["distill_hidden"] > 0 and record["distill_attention"] > 0
    assert m.producer.recipe["layer_maps"] == {"hidden": [[[1, 3], [2, 4]]], "attention": [[[2, 4]]]}
    projections = load_file(m.location / "projections.safetensors")
    assert {k: tuple(v.shape) for k, v in projections.items()} == {
        "t0_l1.weight": (64, 32), "t0_l2.weight": (64, 32)
    }  # fmt: skip
    assert not any(k.startswith("distill_") for k in weights_of(m))
    AutoModelForCausalLM.from_pretrained(m.location / "checkpoint")  # loads as a plain model


def test_stages_switch_losses_and_temperature_and_lora_students_train(kd_store):
    m = distill(kd_store, "kd-stages", peft={"method": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj"]},
                stages=[{"steps": 2, "loss": {"logits": 0.0, "hidden": 1.0}},
                        {"steps": 1, "temperature": 2.0}])  # fmt: skip
    logged = [r for r in metrics(m) if "loss" in r]
    assert [("distill_hidden" in r, "distill_logits" in r, r["temperature"]) for r in logged] == [
        (True, False, 1.0), (True, False, 1.0), (False, True, 2.0)
    ]  # fmt: skip
    assert m.stats["stage_ends"] == [2, 3] and m.stats["steps"] == 3 and m.stats["peft"] == "lora"
    assert (m.location / "checkpoint" / "adapter_model.safetensors").is_file()


def test_a_lora_student_learns_through_a_projection_and_a_shape_student_trains_in_full(kd_store):
    lora = distill(kd_store, "kd-lora-proj", model="narrow", loss={"logits": 1.0, "hidden": 1.0},
                   peft={"method": "lora", "r": 4, "alpha": 8, "target_modules": ["all-linear"]})  # fmt: skip
    from safetensors.torch import load_file

    assert set(load_file(lora.location / "projections.safetensors")) == {"t0_l1.weight", "t0_l2.weight"}
    adapter = load_file(lora.location / "checkpoint" / "adapter_model.safetensors")
    assert adapter and not any("distill" in k for k in adapter)  # no adapter on the projections
    fresh = distill(kd_store, "kd-shape", model=None, shape={"hidden_size": 32, "layers": 1, "heads": 2},
                    peft=None, max_steps=2)  # fmt: skip
    assert fresh.stats["peft"] == "none" and {p.role for p in fresh.parents} == {"input", "teacher"}


def test_string_prompt_completion_is_tokenized_as_trl_tokenizes_it(kd_store):
    from train.teacher_logits import example_tokens

    from .test_train_sft import trl_trainer

    rows = [{"id": f"p{i}", "prompt": f"alpha beta {i}", "completion": " gamma delta"} for i in range(3)]
    prepared = trl_trainer(rows).train_dataset
    for row, theirs in zip(rows, prepared, strict=True):
        ours = example_tokens(row, "prompt-completion", tiny_tokenizer(), 128)
        assert ours["input_ids"] == theirs["input_ids"]
        assert ours["labels"] == theirs["labels"]


def test_on_policy_batches_are_the_students_own_answers(kd_store):
    m = distill(kd_store, "kd-gkd", max_steps=2, on_policy={"fraction": 1.0, "max_new_tokens": 8},
                divergence="jsd", beta=0.5)  # fmt: skip
    assert m.stats["steps"] == 2 and all(r["distill_logits"] >= 0 for r in metrics(m) if "loss" in r)
    assert m.producer.recipe["on_policy"]["fraction"] == 1.0


@pytest.mark.parametrize(
    "recipe, message",
    [
        ({"model": "foreign"}, "have different tokenizers"),
        ({"loss": {"hidden": 1.0}, "hidden_layers": [[1, 5]]}, "hidden_layers: layer map pair"),
        ({"top_k": 100000}, "top_k 100000 is larger than the vocabulary"),
        ({"teacher_outputs": "tl-8"}, "not both"),
        ({"loss": {"logits": 0.0}}, "every weight is 0"),
        ({"packing": True}, "packing"),
        ({"divergence": "reverse_kl", "top_k": 4, "leftover": "drop"}, "use leftover: spread"),
        ({"divergence": "jsd", "beta": 1.0, "top_k": 4, "leftover": "drop"}, "jsd is reverse KL here"),
        (
            {
                "model": None,
                "shape": {"hidden_size": 32, "layers": 1, "heads": 2},
                "peft": {"method": "lora"},
            },
            "trains in full",
        ),
        ({"peft": {"method": "prefix", "num_virtual_tokens": 4}}, "virtual tokens have no teacher"),
    ],
)
def test_mistakes_are_one_line_and_publish_nothing(kd_store, cli, tmp_path, recipe, message):
    import yaml

    data = {"stage": "train", "method": "distill", "name": "bad", "model": "student", "teacher": "teacher",
            "datasets": [{"ref": "chat"}], "max_steps": 1, "max_length": 64} | recipe  # fmt: skip
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    result = cli("--store", kd_store.root, "train", "run", path)
    assert_one_line_error(result)
    assert message in result.err
    assert not any(m.name == "bad" for m in kd_store.list())


def test_teacher_logits_on_the_command_line_and_its_mistakes(kd_store, cli, tmp_path):
    recipe = tmp_path / "tl.yaml"
    recipe.write_text("stage: train.teacher-logits\nname: tl-cli\nteacher: teacher\ndatasets: [{ref: chat}]\n"
                      "top_k: 4\nmax_length: 64\n")  # fmt: skip
    result = cli("--store", kd_store.root, "train", "teacher-logits", recipe)
    assert result.code == 0, result.err
    m = kd_store.resolve("tl-cli")
    row = m.location / m.data_files()[0].path
    import pyarrow.parquet as pq

    schema = pq.read_schema(row)
    assert str(schema.field("teacher_ids").type) == "list<element: uint16>"
    assert str(schema.field("teacher_logprobs").type) == "list<element: halffloat>"
    too_many = cli("--store", kd_store.root, "train", "teacher-logits", recipe, "--set", "top_k=100000")
    assert_one_line_error(too_many)
    assert "larger than the vocabulary" in too_many.err


def test_a_killed_distill_run_resumes_to_the_weights_of_an_uninterrupted_one(kd_store, cli, tmp_path):
    import os
    import subprocess
    import sys

    import torch

    straight = distill(kd_store, "kd-straight", max_steps=4, save_every=2, per_device_batch_size=2,
                       loss={"logits": 1.0, "hidden": 0.5}, model="narrow")  # fmt: skip
    recipe = tmp_path / "resumed.yaml"
    recipe.write_text("stage: train\nmethod: distill\nname: kd-resumed\nmodel: narrow\nteacher: teacher\n"
                      "datasets: [{ref: chat}]\nmax_steps: 4\nsave_every: 2\nper_device_batch_size: 2\n"
                      "max_length: 128\nlearning_rate: 0.01\npeft: {method: none}\nloss: {logits: 1.0, hidden: 0.5}\n")  # fmt: skip
    command = [
        sys.executable,
        "-m",
        "manifests.cli",
        "--store",
        str(kd_store.root),
        "train",
        "run",
        str(recipe),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=env | {"DISTILLERY_FAULT_EXIT_AFTER_STEP": "2"})  # fmt: skip
    assert killed.returncode == 137, killed.stderr[-2000:]
    again = cli(*command[3:], "--resume")  # in this process: only the kill needs a process of its own
    assert again.code == 0, again.err[-2000:]
    resumed = kd_store.resolve("kd-resumed")
    a, b = weights_of(straight), weights_of(resumed)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    from safetensors.torch import load_file

    pa_, pb = (load_file(m.location / "projections.safetensors") for m in (straight, resumed))
    assert all(torch.allclose(pa_[k], pb[k], atol=1e-5) for k in pa_)
    assert [r["step"] for r in metrics(resumed) if "loss" in r] == [1, 2, 3, 4]


def test_two_processes_under_torchrun_train_what_one_process_trains(kd_store, tmp_path):
    import os
    import subprocess
    import sys

    import torch

    """Stages too: the first leaves the LM head unused, which DDP must still see a gradient for."""
    stages = [{"steps": 1, "loss": {"logits": 0.0, "hidden": 1.0}}, {"steps": 1}]
    one = distill(kd_store, "kd-one", per_device_batch_size=4, learning_rate=0.01, stages=stages)
    recipe = tmp_path / "ddp.yaml"
    recipe.write_text("stage: train\nmethod: distill\nname: kd-ddp\nmodel: student\nteacher: teacher\n"
                      "datasets: [{ref: chat}]\nper_device_batch_size: 2\nmax_length: 128\n"
                      "learning_rate: 0.01\npeft: {method: none}\n"
                      "stages: [{steps: 1, loss: {logits: 0.0, hidden: 1.0}}, {steps: 1}]\n")  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "manifests.cli", "--store", str(kd_store.root), "train", "run",
                             str(recipe), "--nproc", "2", "--master-port", "29545"], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("published run") == 1
    two = kd_store.resolve("kd-ddp")
    assert two.stats["processes"] == 2
    a, b = weights_of(one), weights_of(two)
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
