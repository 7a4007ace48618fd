"""Parameter-efficient fine-tuning: the recipe's ``peft:`` block, checked, turned into a ``peft`` config.

    peft: {method: lora, r: 16, alpha: 32, target_modules: [q_proj, k_proj, v_proj, o_proj]}
    peft: {method: qlora, r: 16, alpha: 32}                   # 4-bit base (CUDA + bitsandbytes)
    peft: {method: ia3, target_modules: [k_proj, v_proj, down_proj], feedforward_modules: [down_proj]}
    peft: {method: prefix, num_virtual_tokens: 20}
    peft: {method: p_tuning, num_virtual_tokens: 20, encoder_hidden_size: 128}
    peft: {method: prompt_tuning, num_virtual_tokens: 8, init_text: "Answer the question."}
    peft: {method: none}                                      # full fine-tuning

Each method takes only its own options; an option of another method is one error line listing
the options that apply, and method defaults (LoRA's ``q_proj``/``v_proj``, IA³'s
``k_proj``/``v_proj``/``down_proj``) are filled in so that the resolved recipe in the manifest says
what was trained. The run's ``checkpoint/`` then holds only the adapter, loaded on its base by
``manifests.models.load_causal_lm``; LoRA and IA³ adapters can be merged into the base
(``distillery train merge``), prompt-learning ones (prefix, p-tuning, prompt tuning) cannot: they
are virtual tokens in front of the input, not changes to weights.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from manifests.errors import DistilleryError
from manifests.recipes import RecipeConfig

PeftMethod = Literal["lora", "qlora", "prefix", "p_tuning", "prompt_tuning", "ia3", "none"]
PROMPT_LEARNING = ("prefix", "p_tuning", "prompt_tuning")
LORA_OPTIONS = ("r", "alpha", "dropout", "target_modules")
OPTIONS: dict[str, tuple[str, ...]] = {
    "lora": LORA_OPTIONS,
    "qlora": LORA_OPTIONS,
    "ia3": ("target_modules", "feedforward_modules"),
    "prefix": ("num_virtual_tokens", "prefix_projection", "encoder_hidden_size"),
    "p_tuning": (
        "num_virtual_tokens", "encoder_hidden_size", "encoder_reparameterization_type", "encoder_num_layers",
        "encoder_dropout",
    ),
    "prompt_tuning": ("num_virtual_tokens", "init_text"),
    "none": (),
}  # fmt: skip
"""The options each method takes (the others stay unset)."""
DEFAULTS: dict[str, dict[str, Any]] = {
    "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]},
    "qlora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]},
    # IA³ paper (Liu et al. 2022): rescale keys, values and the feed-forward input (peft's Llama default).
    "ia3": {"target_modules": ["k_proj", "v_proj", "down_proj"]},
    "prefix": {"num_virtual_tokens": 20, "prefix_projection": False},
    "p_tuning": {
        "num_virtual_tokens": 20,
        "encoder_reparameterization_type": "MLP",
        "encoder_num_layers": 2,
        "encoder_dropout": 0.0,
    },  # fmt: skip
    "prompt_tuning": {"num_virtual_tokens": 20},
}
FEEDFORWARD_NAMES = ("down_proj", "up_proj", "gate_proj", "fc1", "fc2", "c_fc", "w1", "w2", "w3")
ADAPTABLE_LAYERS = ("Linear", "Embedding", "Conv1D", "Conv1d", "Conv2d")


class PeftSettings(RecipeConfig):
    """Parameter-efficient fine-tuning; ``method: none`` trains every weight."""

    method: PeftMethod = "lora"
    """lora, qlora (LoRA on a 4-bit base: CUDA + bitsandbytes), prefix, p_tuning, prompt_tuning, ia3, none."""
    r: int | None = Field(default=None, ge=1)
    """LoRA rank (lora, qlora; default 8)."""
    alpha: int | None = Field(default=None, ge=1)
    """LoRA scaling numerator: the update is scaled by alpha / r (lora, qlora; default 16)."""
    dropout: float | None = Field(default=None, ge=0.0, lt=1.0)
    """Dropout on the LoRA input (lora, qlora; default 0.05)."""
    target_modules: list[str] | None = None
    """Layers to adapt, by name or dotted suffix (lora, qlora: default q_proj, v_proj, or ``[all-linear]``;
    ia3: default k_proj, v_proj, down_proj)."""
    feedforward_modules: list[str] | None = None
    """IA³: the target modules whose *input* is rescaled (the feed-forward ones; default: those of
    target_modules named like an MLP projection, e.g. down_proj)."""
    num_virtual_tokens: int | None = Field(default=None, ge=1)
    """Virtual tokens put in front of every input (prefix, p_tuning, prompt_tuning; default 20)."""
    prefix_projection: bool | None = None
    """Prefix tuning: produce the prefix through a two-layer MLP (more stable, more parameters)."""
    encoder_hidden_size: int | None = Field(default=None, ge=1)
    """Hidden size of the prompt encoder (p_tuning; prefix with prefix_projection); default the model's."""
    encoder_reparameterization_type: Literal["MLP", "LSTM"] | None = None
    """P-tuning prompt encoder (default MLP)."""
    encoder_num_layers: int | None = Field(default=None, ge=1)
    """Layers of the p-tuning prompt encoder (default 2)."""
    encoder_dropout: float | None = Field(default=None, ge=0.0, lt=1.0)
    """Dropout of the p-tuning prompt encoder (default 0)."""
    init_text: str | None = None
    """Prompt tuning: initialise the virtual tokens from this text's embeddings (default random)."""

    @model_validator(mode="before")
    @classmethod
    def _options_of_the_method(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("method", "lora") not in OPTIONS:
            return data  # pydantic reports the unknown method (or the wrong type)
        method = data.get("method", "lora")
        foreign = [k for k in data if k != "method" and k in cls.model_fields and k not in OPTIONS[method]]
        if foreign:
            valid = ", ".join(OPTIONS[method]) or "none"
            raise PydanticCustomError(
                "peft_option",
                "{foreign} not an option of method '{method}' (its options: {valid})",
                {"foreign": ", ".join(foreign) + (" is" if len(foreign) == 1 else " are"), "method": method,
                 "valid": valid},
            )  # fmt: skip
        filled = {**DEFAULTS.get(method, {}), **data}
        if method == "ia3" and filled.get("feedforward_modules") is None:
            filled["feedforward_modules"] = [
                m
                for m in filled["target_modules"]
                if isinstance(m, str) and m.rsplit(".", 1)[-1] in FEEDFORWARD_NAMES
            ]
        if method == "ia3" and not set(map(str, filled["feedforward_modules"])) <= set(
            map(str, filled["target_modules"])
        ):
            raise PydanticCustomError(
                "peft_option", "feedforward_modules must be among target_modules ({targets})",
                {"targets": ", ".join(filled["target_modules"])},
            )  # fmt: skip
        return filled

    @property
    def is_prompt_learning(self) -> bool:
        return self.method in PROMPT_LEARNING


def require_method_support(settings: PeftSettings) -> None:
    """Fail before any model loads when the method cannot run here (QLoRA without CUDA or bitsandbytes)."""
    if settings.method != "qlora":
        return
    import torch

    missing = []
    if not torch.cuda.is_available():
        missing.append("no CUDA device")
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("bitsandbytes is not installed")
    if missing:
        raise DistilleryError(
            f"peft.method qlora needs a CUDA GPU and bitsandbytes ({'; '.join(missing)}); "
            "use method: lora on this machine"
        )


def model_load_kwargs(settings: PeftSettings) -> dict[str, Any]:
    """Extra ``from_pretrained`` arguments for the base: QLoRA loads it in 4-bit NF4 (QLoRA paper)."""
    if settings.method != "qlora":
        return {}
    import torch
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )  # fmt: skip
    return {"quantization_config": quantization, "dtype": torch.bfloat16}


def check_target_modules(names: list[str], model, model_ref: str) -> None:
    """Every target names at least one adaptable layer of ``model``; otherwise list its linear layers."""
    if names == ["all-linear"]:
        return
    modules = dict(model.named_modules())
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if type(m).__name__ == "Linear"})
    unknown, not_layers = [], []
    for target in names:
        hits = [m for n, m in modules.items() if n == target or n.endswith("." + target)]
        if not hits:
            unknown.append(target)
        elif not any(type(m).__name__ in ADAPTABLE_LAYERS for m in hits):
            not_layers.append(f"{target} ({type(hits[0]).__name__})")
    if unknown:
        raise DistilleryError(
            f"peft.target_modules: {', '.join(unknown)} not in model {model_ref}; its linear layers: {', '.join(linear)}"
        )
    if not_layers:
        raise DistilleryError(
            f"peft.target_modules: {', '.join(not_layers)} not a linear layer of model {model_ref}; "
            f"its linear layers: {', '.join(linear)}"
        )


def build_peft_config(settings: PeftSettings, model, tokenizer_path: str):
    """The ``peft`` config for ``settings`` on ``model`` (None for full fine-tuning); targets checked first."""
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

    s = settings
    hidden = model.config.get_text_config().hidden_size
    if s.method in ("lora", "qlora"):
        targets = "all-linear" if s.target_modules == ["all-linear"] else s.target_modules
        return LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=targets,
                          task_type="CAUSAL_LM")  # fmt: skip
    if s.method == "ia3":
        return IA3Config(target_modules=s.target_modules, feedforward_modules=s.feedforward_modules,
                         task_type="CAUSAL_LM")  # fmt: skip
    if s.method == "prefix":
        return PrefixTuningConfig(num_virtual_tokens=s.num_virtual_tokens, prefix_projection=s.prefix_projection,
                                  encoder_hidden_size=s.encoder_hidden_size or hidden, task_type="CAUSAL_LM")  # fmt: skip
    if s.method == "p_tuning":
        return PromptEncoderConfig(
            num_virtual_tokens=s.num_virtual_tokens, encoder_hidden_size=s.encoder_hidden_size or hidden,
            encoder_reparameterization_type=s.encoder_reparameterization_type,
            encoder_num_layers=s.encoder_num_layers, encoder_dropout=s.encoder_dropout, task_type="CAUSAL_LM",
        )  # fmt: skip
    if s.method == "prompt_tuning":
        init = {"prompt_tuning_init": "RANDOM"}
        if s.init_text:
            init = {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": s.init_text,
                    "tokenizer_name_or_path": tokenizer_path}  # fmt: skip
        return PromptTuningConfig(num_virtual_tokens=s.num_virtual_tokens, task_type="CAUSAL_LM", **init)
    return None
