"""``distillery train export RUN``: a trained model, written for serving, as a new run.

    distillery train export demo-sft-run --format safetensors --format gguf --gguf-type q8_0

The run (a full checkpoint, or a LoRA/IA³ adapter run, merged into its base first) is published as
a run of its own whose parent is the exported run (role ``model``)::

    checkpoint/                 safetensors   the merged model + tokenizer (float32, or ``dtype``):
                                              eval, serve and synth load the export like any run
    export/model-f16.gguf       gguf          llama.cpp's format, tokenizer and chat template inside
    export/int8/                int8          weight-only int8 of every nn.Linear (``load_int8``)

Only the model's own architecture weights are exported: what training kept beside them (a learned
hidden-state projection of distillation, ``distill_*`` keys in the weights or a
``projections.safetensors``) is dropped and named in the stats. Each format's quality cost is
measured at export time on a few fixed texts against the source model and kept in the manifest::

    "formats": {"gguf": {"file": "export/model-q8_0.gguf", "bytes": 6912160,
                         "max_abs_logit_diff": 0.0031, "top1_agreement": 1.0}, …}

GGUF is written for Llama-family models (``LlamaForCausalLM``, which SmolLM2 is) with a byte-level
BPE tokenizer, under llama.cpp's key and tensor names, so that llama.cpp and transformers'
GGUF loader (``from_pretrained(folder, gguf_file=…)``) both read it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from manifests.errors import DistilleryError
from manifests.model_runs import model_config, require_causal_lm
from manifests.models import CHECKPOINT_DIR, base_model_of, checkpoint_path, is_adapter, load_causal_lm
from manifests.publish import Publisher
from manifests.recipes import Name, RecipeConfig, parse_config
from manifests.schema import Manifest
from manifests.store import Store

if TYPE_CHECKING:
    import numpy as np
    import torch

Format = Literal["safetensors", "gguf", "int8"]
EXPORT_DIR = "export"
INT8_DIR = f"{EXPORT_DIR}/int8"
INT8_WEIGHTS = "model-int8.safetensors"
"""Not ``model.safetensors``: transformers would load its int8 tensors as if they were the weights."""
PROJECTIONS = "projections.safetensors"
"""Where a distillation run keeps a learned projection beside the student (no part of the model)."""

PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Distillation teaches a small student from a large teacher: 12 + 30 = 42.",
    "alpha beta gamma delta epsilon zeta eta theta",
)
"""The fixed texts every format's logits are compared on against the source model."""


class ExportConfig(RecipeConfig):
    """Export a trained run for serving: merged safetensors, GGUF for llama.cpp, weight-only int8."""

    run: str
    """Run reference of the model to export (a full checkpoint, or a LoRA/IA³ adapter run, which is
    merged into its base first)."""
    name: Name | None = None
    """Name of the exported run in the store; none: the run's name and '-export'."""
    formats: list[Format] = Field(default_factory=lambda: ["safetensors", "gguf"], min_length=1)
    """One or more of safetensors (checkpoint/, which eval, serve and synth load), gguf and int8
    (on the command line, --format once for each); default safetensors and gguf."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Precision of the safetensors checkpoint (gguf and int8 are made from float32 weights)."""
    gguf_type: Literal["f16", "f32", "q8_0"] = "f16"
    """GGUF tensor type of the 2-D weights (norms stay f32; q8_0 falls back to f16 for rows that
    are no multiple of 32)."""

    @field_validator("formats")
    @classmethod
    def _once_each(cls, formats: list[str]) -> list[str]:
        return list(dict.fromkeys(formats))


# --- the source model ----------------------------------------------------------------------------


def check_gguf_supported(run: Manifest, store: Store) -> None:
    """One line for a model GGUF export cannot write, read from ``config.json`` before any loading."""
    source = run
    while is_adapter(source):
        source = base_model_of(source, store)
    config = model_config(source)
    archs = config.get("architectures") or [config.get("model_type", "?")]
    if config.get("model_type") != "llama":
        raise DistilleryError(
            f"{run.ref}: gguf export supports Llama-family models (LlamaForCausalLM, such as SmolLM2); "
            f"this one is {archs[0]} -- export it with --format safetensors or --format int8"
        )
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    unsupported = [
        f"{key}={config[key]}"
        for key, fine in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu"))
        if key in config and config[key] != fine
    ] + ([f"rope_type={rope_type}"] if rope_type != "default" else [])
    if unsupported:
        raise DistilleryError(
            f"{run.ref}: gguf export writes plain Llama models; this one has {', '.join(unsupported)} -- "
            "export it with --format safetensors or --format int8"
        )


def check_not_prompt_learning(run: Manifest) -> None:
    if not is_adapter(run):
        return
    from peft import PeftConfig

    adapter = PeftConfig.from_pretrained(checkpoint_path(run))
    if adapter.is_prompt_learning:
        raise DistilleryError(
            f"{run.ref} is a {adapter.peft_type.value} adapter: its virtual tokens are not weights and cannot be "
            "merged into a model to export; use the run as it is, loaded on its base"
        )


def dropped_weights(run: Manifest, model) -> list[str]:
    """Tensors stored with the run that are no part of the model's architecture (``file:key``)."""
    from safetensors import safe_open

    own = set(model.state_dict())
    folder = run.location / CHECKPOINT_DIR
    found = []
    for path in [*sorted(folder.glob("*.safetensors")), run.location / PROJECTIONS]:
        if not path.is_file() or path.name.startswith("adapter_model"):
            continue  # an adapter's weights are merged into the model, not dropped
        with safe_open(path, "pt") as weights:
            keys = list(weights.keys())
        found += [f"{path.name}:{k}" for k in keys if k not in own or path.name == PROJECTIONS]
    return sorted(found)


# --- measuring a format against the source --------------------------------------------------------


def probe_ids(tokenizer) -> list[torch.Tensor]:
    import torch

    return [torch.tensor([tokenizer(text)["input_ids"]]) for text in PROBE_TEXTS]


def logits_of(model, probes: list[torch.Tensor]) -> list[torch.Tensor]:
    import torch

    with torch.no_grad():
        return [model(input_ids=ids).logits[0].float() for ids in probes]


def compare(reference: list[torch.Tensor], logits: list[torch.Tensor]) -> dict[str, float]:
    """Max |logit difference| and the share of positions whose top-1 token agrees."""
    diff = max(float((a - b).abs().max()) for a, b in zip(reference, logits, strict=True))
    agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(reference, logits, strict=True))
    positions = sum(a.shape[0] for a in reference)
    return {"max_abs_logit_diff": diff, "top1_agreement": agree / positions}


# --- int8 ------------------------------------------------------------------------------------------


def _unique_state(model) -> dict[str, torch.Tensor]:
    """The state dict without the second name of a tied tensor (``lm_head.weight`` = the embedding)."""
    seen: set[int] = set()
    state = {}
    for key, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        state[key] = tensor
    return state


def int8_state(model) -> dict[str, torch.Tensor]:
    """Every nn.Linear weight as int8 with one float scale per output channel (symmetric: the
    channel's largest |weight| maps to 127); every other tensor as it is."""
    import torch

    state = {k: v.detach().contiguous() for k, v in _unique_state(model).items()}
    for name, module in model.named_modules():
        key = f"{name}.weight"
        if not isinstance(module, torch.nn.Linear) or key not in state:
            continue  # a tied LM head is the embedding, stored once in float
        weight = state[key].float()
        scale = weight.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        state[key] = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
        state[f"{key}_scale"] = scale
    return state


def write_int8(model, tokenizer, folder: Path) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / INT8_WEIGHTS
    save_file(
        int8_state(model), path, metadata={"format": "pt", "quantization": "int8-weight-only-per-channel"}
    )
    config = copy.deepcopy(model.config)
    config.dtype = "float32"
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return path


def load_int8(path: Path | str):
    """The float32 model of an ``export/int8/`` folder: each int8 weight times its channel's scale.

    ``path`` is the folder (or the run folder that holds ``export/int8/``); the tokenizer loads from
    the same folder with ``AutoTokenizer.from_pretrained``."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(path)
    if not (folder / INT8_WEIGHTS).is_file() and (folder / INT8_DIR / INT8_WEIGHTS).is_file():
        folder = folder / INT8_DIR
    if not (folder / INT8_WEIGHTS).is_file():
        raise DistilleryError(f"{path}: no {INT8_WEIGHTS}; give an export/int8 folder of 'train export'")
    stored = load_file(folder / INT8_WEIGHTS)
    state = {
        key: value.float() * stored[f"{key}_scale"][:, None] if value.dtype == torch.int8 else value.float()
        for key, value in stored.items()
        if not (key.endswith("_scale") and key.removesuffix("_scale") in stored)
    }
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
    tied = set(model.state_dict()) - set(_unique_state(model))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if set(missing) - tied or unexpected:
        raise DistilleryError(
            f"{folder / INT8_WEIGHTS}: does not fit its config.json (missing {sorted(set(missing) - tied)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}); the export is damaged"
        )
    return model.eval()


# --- GGUF ------------------------------------------------------------------------------------------


def llama_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a q or k projection in llama.cpp's rotary order.

    transformers rotates the two halves of each head (``rotate_half``); llama.cpp rotates adjacent
    pairs, so its converter interleaves each head's two halves, and readers of the GGUF (transformers'
    loader among them) undo it. ``heads`` is the key/value head count for k."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def llama_unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    rows = weight.shape[0]
    return (
        weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def _pre_tokenizer_name(pre: dict[str, Any] | None) -> str | None:
    """llama.cpp's name (``tokenizer.ggml.pre``) of a byte-level pre-tokenizer, or None if unknown."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    def byte_level(step: dict[str, Any], regex: bool) -> bool:
        return (
            step.get("type") == "ByteLevel"
            and not step.get("add_prefix_space")
            and step.get("use_regex") == regex
        )

    if pre is None:
        return None
    if byte_level(pre, True):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if len(steps) != 2:
        return None
    first, second = steps
    if first.get("type") == "Digits" and first.get("individual_digits") and byte_level(second, True):
        return "smollm"  # SmolLM's own: each digit alone, then GPT-2's split
    if first.get("type") == "Split" and first.get("behavior") == "Isolated" and byte_level(second, False):
        pattern = (first.get("pattern") or {}).get("Regex")
        # The splits transformers' GGUF reader rebuilds, by the names llama.cpp gives them.
        return next((name for name, split in GGUF_PRE_TOKENIZER_SPLITS.items() if split == pattern), None)
    return None


def gguf_vocab(tokenizer, vocab_size: int, ref: str) -> dict[str, Any]:
    """The tokenizer as llama.cpp's ``gpt2`` (byte-level BPE) vocabulary."""
    backend = (
        json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}
    )
    bpe = backend.get("model", {})
    pre = _pre_tokenizer_name(backend.get("pre_tokenizer"))
    if bpe.get("type") != "BPE" or (backend.get("decoder") or {}).get("type") != "ByteLevel":
        raise DistilleryError(
            f"{ref}: gguf export writes byte-level BPE tokenizers (llama.cpp's 'gpt2' vocabulary); this one is "
            f"{bpe.get('type', type(tokenizer).__name__)} -- export it with --format safetensors or --format int8"
        )
    if pre is None:
        raise DistilleryError(
            f"{ref}: its tokenizer splits text in a way llama.cpp has no name for "
            f"({json.dumps(backend.get('pre_tokenizer'))[:120]}), so a GGUF would tokenize differently -- "
            "export it with --format safetensors or --format int8"
        )
    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size:
        raise DistilleryError(
            f"{ref}: the tokenizer has {len(vocab)} tokens but the model's embedding only {vocab_size} rows"
        )
    from gguf import TokenType

    by_id = {i: token for token, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")  # rows of the embedding no token reaches, as llama.cpp names them
            types.append(TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        if i in added:
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            types.append(TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
    ids = tokenizer("a")["input_ids"]
    special = {
        "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
        "unk": tokenizer.unk_token_id, "pad": tokenizer.pad_token_id,
    }  # fmt: skip
    return {
        "pre": pre, "tokens": tokens, "types": types, "merges": merges, "special": special,
        "add_bos": special["bos"] is not None and ids[:1] == [special["bos"]],
        "add_eos": special["eos"] is not None and ids[-1:] == [special["eos"]],
        "chat_template": tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None,
    }  # fmt: skip


GGUF_TYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "q8_0": ("Q8_0", "MOSTLY_Q8_0")}
"""``gguf_type`` → (the tensor type of 2-D weights, ``general.file_type``)."""


def gguf_tensors(model, gguf_type: str) -> list[tuple[str, str, np.ndarray, Any]]:
    """(gguf name, transformers name, stored bytes, tensor type) of every weight, in llama.cpp's
    names and row order."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    wanted = gguf.GGMLQuantizationType[GGUF_TYPES[gguf_type][0]]
    out = []
    for key, tensor in _unique_state(model).items():
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise DistilleryError(
                f"gguf export: weight {key} has no llama.cpp name; this is no plain Llama model"
            )
        data = tensor.detach().float().numpy()
        if name.endswith("attn_q.weight"):
            data = llama_permute(data, config.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            data = llama_permute(data, config.num_key_value_heads)
        qtype = wanted
        if data.ndim == 1:
            qtype = gguf.GGMLQuantizationType.F32  # norms stay exact, as llama.cpp keeps them
        elif data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            qtype = gguf.GGMLQuantizationType.F16  # rows that are no whole number of blocks
        out.append((name, key, gguf.quants.quantize(data, qtype), qtype))
    return out


def write_gguf(path: Path, model, tensors, vocab: dict[str, Any], gguf_type: str, name: str) -> None:
    import gguf

    config = model.config
    rope = getattr(config, "rope_parameters", None) or {}
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType[GGUF_TYPES[gguf_type][1]])
    if gguf_type == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_rope_dimension_count(head_dim)
    if head_dim * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    for key, token_id in vocab["special"].items():
        if token_id is not None:
            getattr(writer, f"add_{key}_token_id")(token_id)
    writer.add_add_bos_token(vocab["add_bos"])
    writer.add_add_eos_token(vocab["add_eos"])
    if vocab["chat_template"]:
        writer.add_chat_template(vocab["chat_template"])

    for tensor_name, _, data, qtype in tensors:
        writer.add_tensor(tensor_name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def gguf_model(model, tensors):
    """The model with the weights a GGUF reader gets back (dequantised, rows in transformers' order)."""
    import gguf
    import torch

    config = model.config
    shapes = {key: tensor.shape for key, tensor in model.state_dict().items()}
    state = {}
    for tensor_name, key, data, qtype in tensors:
        weight = gguf.quants.dequantize(data, qtype).reshape(shapes[key])
        if tensor_name.endswith("attn_q.weight"):
            weight = llama_unpermute(weight, config.num_attention_heads)
        elif tensor_name.endswith("attn_k.weight"):
            weight = llama_unpermute(weight, config.num_key_value_heads)
        state[key] = torch.from_numpy(weight.copy())
    copy_ = copy.deepcopy(model)
    copy_.load_state_dict(state, strict=False)
    return copy_


# --- the stage -------------------------------------------------------------------------------------


def export_run(cfg: ExportConfig, store: Store) -> Manifest:
    import torch
    from transformers import AutoModelForCausalLM

    run = require_causal_lm(store.resolve(cfg.run, kind="run"), store)
    check_not_prompt_learning(run)
    if "gguf" in cfg.formats:
        check_gguf_supported(run, store)
    name = cfg.name or f"{run.name}-export"
    model, tokenizer = load_causal_lm(run, store, merge_adapter=True, dtype=torch.float32)
    if type(model).__name__.startswith("Peft"):  # a prompt-learning adapter further down the chain
        raise DistilleryError(f"{run.ref}: an adapter in its chain of base models cannot be merged to export")
    model.eval()
    vocab = gguf_vocab(tokenizer, model.config.vocab_size, run.ref) if "gguf" in cfg.formats else None
    dropped = dropped_weights(run, model)
    probes = probe_ids(tokenizer)
    reference = logits_of(model, probes)
    formats: dict[str, dict[str, Any]] = {}
    recipe = cfg.resolved() | {"name": name, "run": run.id}
    with Publisher(
        store, kind="run", name=name, stage="train.export", recipe=recipe, parents=[run],
        parent_roles={run.id: "model"},
    ) as pub:  # fmt: skip
        if "safetensors" in cfg.formats:
            dtype = getattr(torch, cfg.dtype)
            folder = pub.dir / CHECKPOINT_DIR
            (model if cfg.dtype == "float32" else copy.deepcopy(model).to(dtype)).save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
            formats["safetensors"] = {
                "file": f"{CHECKPOINT_DIR}/", "dtype": cfg.dtype,
                "bytes": sum(p.stat().st_size for p in folder.glob("*.safetensors")),
            } | compare(reference, logits_of(reloaded, probes))  # fmt: skip
            del reloaded
        if "gguf" in cfg.formats:
            tensors = gguf_tensors(model, cfg.gguf_type)
            path = pub.dir / EXPORT_DIR / f"model-{cfg.gguf_type}.gguf"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_gguf(path, model, tensors, vocab, cfg.gguf_type, name)
            formats["gguf"] = {
                "file": path.relative_to(pub.dir).as_posix(), "type": cfg.gguf_type, "bytes": path.stat().st_size,
            } | compare(reference, logits_of(gguf_model(model, tensors), probes))  # fmt: skip
            del tensors
        if "int8" in cfg.formats:
            path = write_int8(model, tokenizer, pub.dir / INT8_DIR)
            formats["int8"] = {
                "file": f"{INT8_DIR}/", "bytes": path.stat().st_size,
            } | compare(reference, logits_of(load_int8(path.parent), probes))  # fmt: skip
        stats = {
            "architecture": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "probe_tokens": sum(p.shape[1] for p in probes),
            "formats": formats,
            "dropped_weights": dropped,
        }
        return pub.publish(stats=stats)


def run_recipe(data: dict[str, Any], store: Store, source: str) -> Manifest:
    return export_run(parse_config(ExportConfig, data, source), store)
