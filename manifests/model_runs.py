"""What a run in the store is, checked before a stage loads it as a model.

Every run is a manifest plus files, but not every run is a causal language model: a tokenizer run
(``train.tokenizer``) holds only tokenizer files, a dedup index or a quality classifier has no
``checkpoint/`` folder at all, and a reward model has a classification head where the LM head would
be. transformers meets a checkpoint without a model config with ``ValueError: Unrecognized model``
deep in a traceback, and one with a head of the other kind it loads with freshly initialised
weights in that place, which no error reports. So every stage that takes a model reference (``serve``,
``make-student``, a train recipe's ``model:``, an eval recipe's ``models:``, a synth teacher
``{serve: …}``, a reward model) checks it here first, in one line::

    run demo-bpe@ab12cd34ef56 is a tokenizer (made by train.tokenizer), not a causal language model;
    give a model run (train import-model, make-student, sft, pretrain)

Only ``checkpoint/config.json`` (and an adapter's ``adapter_config.json``) is read: the check is
cheap, and the weights are hashed by the loader as before.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from manifests.errors import DistilleryError
from manifests.schema import Manifest
from manifests.store import Store

CHECKPOINT_DIR = "checkpoint"
"""The folder of a run that holds its model files (``config.json``, weights, tokenizer)."""

MODEL_RUNS = "give a model run (train import-model, make-student, sft, pretrain)"
"""What to do instead, in every message: the verbs that publish a causal language model."""
REWARD_MODELS = "give a run saved from an AutoModelForSequenceClassification with one label"

MADE_BY = {
    "train.tokenizer": "a tokenizer",
    "corpus.dedup-index": "a dedup index",
    "corpus.train-classifier": "a quality classifier",
}
"""Runs that are no model by the stage that made them."""

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
OTHER_HEADS = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering", "ForMaskedLM")
"""Architectures whose head is not a language-model head (their weights there would be random)."""


def base_model_of(manifest: Manifest, store: Store) -> Manifest:
    """The run an adapter was trained on (its parent with role ``base_model``)."""
    for parent in manifest.parents:
        if parent.role == "base_model":
            return store.get(parent.id)
    raise DistilleryError(f"{manifest.ref} is an adapter but names no base_model parent")


def _stage(manifest: Manifest) -> str:
    return manifest.producer.stage


def _what(manifest: Manifest, folder: Path) -> str | None:
    """What a run that is no model is ("a tokenizer (made by train.tokenizer)"), or None."""
    stage = _stage(manifest)
    if stage in MADE_BY:
        return f"{MADE_BY[stage]} (made by {stage})"
    if not folder.is_dir():
        return f"a run without a '{CHECKPOINT_DIR}/' folder (made by {stage})"
    weights = any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")) or any(folder.glob("*.gguf"))
    tokenizer = any((folder / f).exists() for f in TOKENIZER_FILES)
    if not (folder / "config.json").exists() and tokenizer and not weights:
        return f"a tokenizer only, without model weights or config.json (made by {stage})"
    return None


def _json(path: Path, manifest: Manifest, hint: str = MODEL_RUNS) -> dict[str, Any]:
    """A checkpoint's JSON file, or one line saying that it is damaged."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DistilleryError(
            f"run {manifest.ref} (made by {_stage(manifest)}): {CHECKPOINT_DIR}/{path.name} cannot be read "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}); the checkpoint is "
            f"damaged -- 'distillery manifests verify {manifest.ref}' checks its files; {hint}"
        ) from None
    if not isinstance(data, dict):
        raise DistilleryError(
            f"run {manifest.ref}: {CHECKPOINT_DIR}/{path.name} holds a JSON {type(data).__name__}, not an "
            f"object; the checkpoint is damaged; {hint}"
        )
    return data


def model_config(
    manifest: Manifest, wanted: str = "a causal language model", hint: str = MODEL_RUNS
) -> dict[str, Any]:
    """The ``config.json`` of a run's full checkpoint, once it is known to describe a model.

    One ``DistilleryError`` line for a run that is no model (what it is instead), a missing or
    unreadable ``config.json``, or a model type this transformers does not know.
    """
    if manifest.kind != "run":
        raise DistilleryError(f"{manifest.ref} is a {manifest.kind}, not a model run; {hint}")
    folder = manifest.location / CHECKPOINT_DIR
    what = _what(manifest, folder)
    if what is not None:
        raise DistilleryError(f"run {manifest.ref} is {what}, not {wanted}; {hint}")
    path = folder / "config.json"
    if not path.is_file():
        raise DistilleryError(
            f"run {manifest.ref} (made by {_stage(manifest)}): its checkpoint has no config.json, so it is no "
            f"loadable model -- 'distillery manifests verify {manifest.ref}' checks its files; {hint}"
        )
    config = _json(path, manifest, hint)
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise DistilleryError(
            f"run {manifest.ref}: {CHECKPOINT_DIR}/config.json names no model_type, so transformers cannot "
            f"tell which model it is; the checkpoint is damaged or not a transformers model; {hint}"
        )
    from transformers import __version__
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING_NAMES:
        raise DistilleryError(
            f"run {manifest.ref}: model type '{model_type}' is unknown to the installed transformers "
            f"({__version__}); install a version that has it, or {hint}"
        )
    return config


def _architectures(config: dict[str, Any]) -> list[str]:
    archs = config.get("architectures")
    return [a for a in archs if isinstance(a, str)] if isinstance(archs, list) else []


def require_causal_lm(manifest: Manifest, store: Store) -> Manifest:
    """``manifest``, once it is a run that loads as a causal language model: a full checkpoint with
    an LM head, or an adapter on such a base (checked all the way down); else one clear error."""
    given = manifest
    for _ in range(64):  # an adapter of an adapter …: a chain that long is a cycle, not a model
        if manifest.kind == "run" and (manifest.location / CHECKPOINT_DIR / "adapter_config.json").is_file():
            _json(manifest.location / CHECKPOINT_DIR / "adapter_config.json", manifest)
            manifest = base_model_of(manifest, store)
            continue
        config = model_config(manifest)
        break
    else:
        raise DistilleryError(f"run {manifest.ref}: its chain of base models does not end; {MODEL_RUNS}")
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config["model_type"]
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise DistilleryError(
            f"run {manifest.ref} is a '{model_type}' model, which transformers cannot load as a causal "
            f"language model; {MODEL_RUNS}"
        )
    archs = _architectures(config)
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    other = [a for a in archs if a.endswith(OTHER_HEADS)]
    if other and not any(a in causal or a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise DistilleryError(
            f"run {manifest.ref} is a {other[0]} (a classifier, such as a reward model), not a causal "
            f"language model: its LM head would be random weights; {MODEL_RUNS}"
        )
    return given


def require_sequence_classifier(manifest: Manifest) -> Manifest:
    """``manifest``, once it is a run with a one-label sequence-classification head (a reward model).

    A causal LM loads as a classifier too -- with a freshly initialised score head, whose rewards
    would be noise that no error reports -- so a run without such a head is refused here."""
    config = model_config(manifest, "a reward model", REWARD_MODELS)
    archs = _architectures(config)
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        shown = f" ({archs[0]})" if archs else ""
        raise DistilleryError(
            f"run {manifest.ref} is no reward model{shown}: it has no sequence-classification head, and one "
            f"loaded in its place would score with random weights; {REWARD_MODELS}"
        )
    labels = config.get("id2label")
    if isinstance(labels, dict) and len(labels) != 1:
        raise DistilleryError(
            f"run {manifest.ref} is a classifier with {len(labels)} labels; a reward model has one "
            "(its single logit is the reward)"
        )
    return manifest
