"""Learning from preference pairs: DPO (``method: dpo``) and reward models (``method: reward``).

A 2-layer Llama with the tests' word-level tokenizer learns pairs whose chosen answers use the first
half of the vocabulary's words and whose rejected answers use the second half -- a preference a few
steps can learn. The loss formulas are checked in ``tests/test_preference_losses.py``; here the batch
(padding-free log-probs equal each sequence's own), the loss of a whole batch against a direct
computation, the reference routes, training, lineage, resume and mistakes.
"""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from manifests.publish import Publisher
from manifests.recipes import parse_config
from manifests.store import Store
from train.dpo import DPORecipe, pair_collator, sequence_logps, train_dpo
from train.preference_data import pair_tokens
from train.reward import RewardRecipe, train_reward

from .conftest import ROOT, WORDS, assert_one_line_error, tiny_tokenizer
from .test_train_distill import llama, publish_model
from .test_train_sft import weights_of

GOOD, BAD = WORDS[: len(WORDS) // 2], WORDS[len(WORDS) // 2 :]


def preference_rows(n: int, seed: int, chat: bool = True) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
        chosen = " ".join(rng.choice(GOOD) for _ in range(rng.randint(2, 8)))
        rejected = " ".join(rng.choice(BAD) for _ in range(rng.randint(2, 8)))
        if chat:
            row = {"prompt": [{"role": "user", "content": prompt}],
                   "chosen": [{"role": "assistant", "content": chosen}],
                   "rejected": [{"role": "assistant", "content": rejected}]}  # fmt: skip
        else:
            row = {"prompt": prompt + " ", "chosen": chosen, "rejected": rejected}
        rows.append({"id": f"p{seed}-{i}", "parents": [], **row, "margin": float(i % 3)})
    return rows


def publish_pairs(store: Store, name: str, train: list[dict], test: list[dict] | None = None):
    with Publisher(store, kind="dataset", name=name, stage="test", recipe={"rows": len(train)}) as pub:
        pub.write_table(pa.Table.from_pylist(train), split="train")
        if test:
            pub.write_table(pa.Table.from_pylist(test), split="test")
        return pub.publish()


@pytest.fixture(scope="module")
def pref_store(tmp_path_factory) -> Store:
    """Runs ``policy`` and ``sibling`` (2 layers, width 64), ``foreign`` (another vocabulary); datasets ``prefs`` (chats,
    train and test), ``prefs-text`` (plain strings) and ``no-chosen``."""
    store = Store(tmp_path_factory.mktemp("prefs") / "store")
    publish_model(store, "policy", llama(3, 2, 64, 4), tiny_tokenizer())
    publish_model(store, "sibling", llama(4, 2, 64, 4), tiny_tokenizer())
    other = tiny_tokenizer(WORDS[:-5])
    publish_model(store, "foreign", llama(5, 2, 64, 4, vocab=len(other)), other)
    publish_pairs(store, "prefs", preference_rows(24, 0), preference_rows(16, 1))
    publish_pairs(store, "prefs-text", preference_rows(8, 2, chat=False))
    publish_pairs(
        store, "no-chosen", [{k: v for k, v in r.items() if k != "chosen"} for r in preference_rows(4, 3)]
    )
    return store


def dpo(store: Store, name: str, **recipe):
    data = {"name": name, "model": "policy", "datasets": [{"ref": "prefs"}], "max_steps": 2, "max_length": 64,
            "learning_rate": 1e-2, "per_device_batch_size": 4, "peft": {"method": "none"}, "beta": 0.5} | recipe  # fmt: skip
    return train_dpo(parse_config(DPORecipe, data, "test"), store)


def metrics(manifest) -> list[dict]:
    return [json.loads(line) for line in (manifest.location / "metrics.jsonl").read_text().splitlines()]


def own_logps(model, prompt: list[int], answer: list[int]) -> float:
    """The answer's summed log-probs from the model's own logits over the sequence alone."""
    import torch

    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].double(), -1)
    return sum(float(logprobs[len(prompt) - 1 + i, t]) for i, t in enumerate(answer))


@pytest.mark.parametrize("padding_free", [True, False])
def test_every_sequence_in_a_batch_gets_the_log_probs_it_has_alone(padding_free):
    import torch

    model, tok = llama(3, 2, 64, 4).eval(), tiny_tokenizer()
    pairs = [pair_tokens(r, tok) for r in preference_rows(3, 7)]
    batch = pair_collator(0, padding_free)(pairs)
    with torch.no_grad():
        logps = sequence_logps(model, batch, model.lm_head, model.config.vocab_size)
    expected = [
        own_logps(model, p["prompt_ids"], p[side]) for side in ("chosen_ids", "rejected_ids") for p in pairs
    ]
    assert logps.shape == (6,)
    assert torch.allclose(logps.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-4)


def test_chat_and_text_pairs_are_tokenized_as_the_prompt_then_each_answer():
    tok = tiny_tokenizer()
    chat = preference_rows(1, 4)[0]
    pair = pair_tokens(chat, tok)
    ids = lambda messages, **kw: list(tok.apply_chat_template(messages, return_dict=True, **kw)["input_ids"])  # noqa: E731
    assert pair["prompt_ids"] == ids(chat["prompt"], add_generation_prompt=True)
    assert pair["prompt_ids"] + pair["chosen_ids"] == ids(chat["prompt"] + chat["chosen"])
    text = preference_rows(1, 4, chat=False)[0]
    pair = pair_tokens(text, tok)
    assert tok.decode(pair["chosen_ids"]) == text["chosen"] + " <|im_end|>"
    assert pair["rejected_ids"][-1] == tok.eos_token_id


def test_the_training_loss_of_a_batch_equals_a_direct_computation(pref_store):
    """The first logged loss and rewards of a run (all 24 pairs in one batch, weights untouched so far, the
    reference another model) against -log σ(β·Δ) from both models' own logits, sequence by sequence."""
    import math

    from manifests.models import load_causal_lm

    m = dpo(
        pref_store, "dpo-direct", max_steps=1, per_device_batch_size=24, beta=0.5, reference_model="sibling"
    )
    policy, tok = load_causal_lm(pref_store.resolve("policy"), pref_store)
    reference, _ = load_causal_lm(pref_store.resolve("sibling"), pref_store)
    losses, margins = [], []
    for row in preference_rows(24, 0):
        p = pair_tokens(row, tok)
        chosen, rejected = (own_logps(policy, p["prompt_ids"], p[side]) - own_logps(reference, p["prompt_ids"], p[side])
                            for side in ("chosen_ids", "rejected_ids"))  # fmt: skip
        losses.append(math.log1p(math.exp(-0.5 * (chosen - rejected))))
        margins.append(0.5 * (chosen - rejected))
    first = next(r for r in metrics(m) if "loss" in r)
    assert first["loss"] == pytest.approx(sum(losses) / 24, rel=1e-4)
    assert first["rewards/margins"] == pytest.approx(sum(margins) / 24, rel=1e-4)
    # The published reference log-probs are the reference model's own.
    stored = pq.read_table(m.location / "reference_logps.parquet").to_pylist()
    p0 = pair_tokens(preference_rows(24, 0)[0], tok)
    assert stored[0]["rejected"] == pytest.approx(
        own_logps(reference, p0["prompt_ids"], p0["rejected_ids"]), abs=1e-4
    )
    assert m.stats["train_pairs"] == 24 and m.stats["dropped_pairs"] == 0


def test_dpo_learns_the_preference_and_reports_held_out_reward_accuracy(pref_store):
    m = dpo(pref_store, "dpo-learns", max_steps=6, eval_split="test", loss=["sigmoid", "sft"],
            loss_weights=[1.0, 0.1])  # fmt: skip
    ev = m.stats["eval"]
    assert ev["rewards/accuracies"] >= 0.9 and ev["rewards/margins"] > 0
    assert ev["policy_accuracy"] > m.stats["eval_policy_accuracy_before"]
    logged = [r for r in metrics(m) if "loss" in r]
    assert logged[-1]["loss"] < logged[0]["loss"] and logged[-1]["num_tokens"] > 0
    parents = {p.role for p in m.parents}
    assert parents == {"input", "base_model"}
    assert m.producer.recipe["loss"] == ["sigmoid", "sft"] and m.producer.stage == "train.dpo"


def test_the_implicit_adapter_reference_trains_what_precomputed_log_probs_train(pref_store):
    import torch
    from safetensors.torch import load_file

    lora = {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0}
    online = dpo(pref_store, "dpo-online", peft=lora, reference="online", max_steps=3)
    stored = dpo(pref_store, "dpo-stored", peft=lora, reference="precomputed", max_steps=3)
    a, b = (load_file(m.location / "checkpoint" / "adapter_model.safetensors") for m in (online, stored))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert not (online.location / "reference_logps.parquet").exists()


def test_text_pairs_a_frozen_reference_model_and_loss_variants_train(pref_store):
    m = dpo(pref_store, "dpo-text", datasets=[{"ref": "prefs-text"}], reference="online", loss="ipo",
            padding_free=False, max_steps=2)  # fmt: skip
    assert m.stats["steps"] == 2 and m.stats["padding_free"] is False
    m = dpo(pref_store, "dpo-robust", loss=["robust", "hinge"], label_smoothing=0.1, reference_model="sibling",
            max_steps=1)  # fmt: skip
    assert {p.role for p in m.parents} == {"input", "base_model", "reference"}


@pytest.mark.parametrize(
    "extra, message",
    [
        ("datasets: [{ref: no-chosen}]", "lacks column"),
        ("reference_model: foreign", "different tokenizers"),
        ("loss: [exo_pair]", "exo_pair"),
        ("loss: [sigmoid, ipo]\nloss_weights: [1.0]", "loss_weights"),
        ("loss: [nca_pair]\nf_divergence: forward_kl", "nca_pair"),
        ("loss: [sigmod]", "sigmoid"),
        ("packing: true", "padding_free"),
        ("beta: 0", "beta"),
    ],
)
def test_dpo_mistakes_are_one_line_and_publish_nothing(pref_store, cli, tmp_path, extra, message):
    data = "" if extra.startswith("datasets") else "datasets: [{ref: prefs}]\n"
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"stage: train\nmethod: dpo\nname: dpo-bad\nmodel: policy\n{data}peft: {{method: none}}\n"
                      f"max_steps: 1\n{extra}\n")  # fmt: skip
    result = cli("--store", str(pref_store.root), "train", "run", str(recipe))
    assert_one_line_error(result)
    assert message in result.err
    assert not pref_store.list(kind="run", name="dpo-bad")


def test_a_killed_dpo_run_resumes_to_the_weights_of_an_uninterrupted_one(pref_store, cli, tmp_path):
    import os
    import subprocess
    import sys

    import torch

    straight = dpo(pref_store, "dpo-straight", max_steps=3, save_every=1, per_device_batch_size=2)
    recipe = tmp_path / "resumed.yaml"
    recipe.write_text("stage: train\nmethod: dpo\nname: dpo-resumed\nmodel: policy\ndatasets: [{ref: prefs}]\n"
                      "max_steps: 3\nsave_every: 1\nper_device_batch_size: 2\nmax_length: 64\nlearning_rate: 0.01\n"
                      "peft: {method: none}\nbeta: 0.5\n")  # fmt: skip
    command = [
        sys.executable,
        "-m",
        "manifests.cli",
        "--store",
        str(pref_store.root),
        "train",
        "run",
        str(recipe),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=env | {"DISTILLERY_FAULT_EXIT_AFTER_STEP": "1"})  # fmt: skip
    assert killed.returncode == 137, killed.stderr[-2000:]
    again = cli(*command[3:], "--resume")  # in this process: only the kill needs a process of its own
    assert again.code == 0, again.err[-2000:]
    assert "training from the start" not in again.err  # it did resume
    a, b = weights_of(straight), weights_of(pref_store.resolve("dpo-resumed"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_two_processes_under_torchrun_train_what_one_process_trains(pref_store, tmp_path):
    import os
    import subprocess
    import sys

    import torch

    one = dpo(pref_store, "dpo-one", max_steps=2, per_device_batch_size=4)
    recipe = tmp_path / "ddp.yaml"
    recipe.write_text("stage: train\nmethod: dpo\nname: dpo-ddp\nmodel: policy\ndatasets: [{ref: prefs}]\n"
                      "max_steps: 2\nper_device_batch_size: 2\nmax_length: 64\nlearning_rate: 0.01\n"
                      "peft: {method: none}\nbeta: 0.5\n")  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "manifests.cli", "--store", str(pref_store.root), "train", "run",
                             str(recipe), "--nproc", "2", "--master-port", "29543"], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    two = pref_store.resolve("dpo-ddp")
    assert two.stats["processes"] == 2
    a, b = weights_of(one), weights_of(two)
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
    first = lambda m: next(r for r in metrics(m) if "loss" in r)  # noqa: E731
    assert first(two)["rewards/accuracies"] == pytest.approx(first(one)["rewards/accuracies"])


# --- reward models --------------------------------------------------------------------------------


def reward(store: Store, name: str, **recipe):
    data = {"name": name, "model": "policy", "datasets": [{"ref": "prefs"}], "max_steps": 8, "max_length": 64,
            "learning_rate": 1e-2, "per_device_batch_size": 4, "peft": {"method": "none"}} | recipe  # fmt: skip
    return train_reward(parse_config(RewardRecipe, data, "test"), store)


def test_a_reward_model_learns_the_preference_and_scores_for_synth(pref_store):
    from synth.preferences import RewardModel

    m = reward(pref_store, "rm", eval_split="test", margin=False)
    assert m.stats["eval_accuracy"] >= 0.9 and m.stats["eval_margin"] > 0 and m.stats["margin"] is False
    scorer = RewardModel(m, pref_store)  # what synth preferences (score: reward_model) loads
    row = preference_rows(1, 9)[0]
    good, bad = scorer.score(row["prompt"], [row["chosen"][0]["content"], row["rejected"][0]["content"]])
    assert good > bad


def test_a_lora_reward_model_is_saved_merged_and_the_margin_column_is_used(pref_store):
    from manifests.model_runs import require_sequence_classifier

    m = reward(pref_store, "rm-lora", peft={"method": "lora", "r": 4}, max_steps=2)
    require_sequence_classifier(m)
    assert (m.location / "checkpoint" / "model.safetensors").is_file()
    assert m.stats["margin"] is True and m.producer.recipe["margin"] is True


def test_reward_model_mistakes_are_one_line(pref_store, cli, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(
        "stage: train\nmethod: reward\nname: rm-bad\nmodel: policy\ndatasets: [{ref: no-chosen}]\n"
    )
    result = cli("--store", str(pref_store.root), "train", "run", str(recipe))
    assert_one_line_error(result)
    assert "lacks column" in result.err and "chosen" in result.err
