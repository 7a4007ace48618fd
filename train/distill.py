"""``train`` (method ``distill``): white-box distillation -- the student learns the teacher's whole
next-token distribution, and optionally its hidden states and attention, not only its sampled text.

    stage: train
    method: distill
    name: demo-distill
    model: student-base                     # the student: a run (e.g. from `train make-student`) or `shape:`
    teacher: smollm2-135m-instruct          # online; or teachers: [{ref: a, weight: 2}, {ref: b}]
    datasets: [{ref: demo-sft, split: train}]
    loss: {logits: 1.0, ce: 0.1, hidden: 0.0, attention: 0.0}
    divergence: forward_kl                  # reverse_kl | jsd | skew_forward_kl | skew_reverse_kl | tv
    temperature: 2.0                        # both sides tempered; the loss is scaled by T^2
    max_steps: 40

**Where the teacher's outputs come from.** ``teacher``/``teachers``: the teacher runs are loaded beside
the student, frozen (replicated on every process, in bf16 on GPUs that have it), and run on the same batch;
several teachers' distributions are mixed per position by weight. ``teacher_outputs:`` instead names a
dataset from ``distillery train teacher-logits`` (top-k ids and log-probs per answer position): the
teacher is not loaded at all; its tokenizer, the data version and every example's token hash are checked
first. ``on_policy: {fraction: 0.5}`` (GKD): that share of the batches is replaced by the student's own
sampled answers to the same prompts, scored by the online teacher.

**The losses** (``train/distill_losses.py``, each tested against a direct computation), weighted by
``loss``: ``logits`` (the divergence, on the answer positions, computed a chunk of positions at a time
with the chunk's logits recomputed in the backward, so no [tokens x vocabulary] tensor is kept for
either side; ``top_k`` keeps the teacher's k most likely tokens, ``leftover`` drops the rest of its mass
or spreads it over the other tokens), ``ce`` (the ordinary next-token cross-entropy on the same
positions), ``hidden`` (MSE or cosine between mapped layers' hidden states on every real token, through
a learned projection when the widths differ: it is saved beside the checkpoint as
``projections.safetensors`` and not part of the model), ``attention`` (KL between the mapped layers'
attention rows, head-averaged when the head counts differ; the models run with eager attention, the only
kind that returns the weights). Every term is a sum over its positions divided by the answer tokens
of the batch (as the SFT loss is), so that gradient accumulation and several processes train what one
process trains; ``metrics.jsonl`` logs each component per step, as a mean per position.

**Stages**: ``stages: [{steps: 20, loss: {hidden: 1, logits: 0}}, {steps: 40, temperature: 1}]`` run
one after another in one run (each stage overrides the loss weights, divergence or temperature), and
every stage ends in a checkpoint. The core is the SFT one (``train/sft.py``): TRL's trainer, PEFT, DDP /
FSDP / DeepSpeed, guard rails, exact resume, evaluation on a held-out split (``eval_loss`` is the
student's own cross-entropy, comparable with an SFT run's).

The run's parents are the datasets, the student's base (``base_model``), each teacher (``teacher``) or
the stored outputs (``teacher_outputs``); the resolved recipe holds the losses, weights, temperature and
layer maps.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import time
from functools import partial
from typing import Any, Literal

from pydantic import Field, model_validator

from manifests.chat_labels import IGNORED
from manifests.data import read_table
from manifests.errors import DistilleryError, RunFailed
from manifests.model_runs import require_causal_lm
from manifests.models import CHECKPOINT_DIR, checkpoint_path, load_causal_lm, load_tokenizer
from manifests.publish import Publisher
from manifests.recipes import RecipeConfig, parse_config
from manifests.schema import Manifest
from manifests.store import Store
from train.checkpoint import trainer_work_folder
from train.data import DatasetInput, pinned, resolve_datasets
from train.distill_losses import (
    Divergence,
    Leftover,
    attention_loss,
    divergence,
    hidden_state_loss,
    layer_map,
    mix_teachers,
    teacher_log_probs_from_topk,
    topk_log_probs,
)
from train.launch import as_a_job_of_one
from train.peft_config import build_peft_config, check_target_modules, model_load_kwargs
from train.pretrain import ModelShape
from train.sft import (
    LOGITS_PER_CHUNK,
    REPORTING_FIELDS,
    SFTRecipe,
    architecture,
    chat_template_text,
    check_trainer_recipe,
    count_parameters,
    deepspeed_contradictions,
    sft_arguments,
    train_watched,
    trainer_watch,
)
from train.strategy import zero_stage
from train.teacher_logits import (
    distill_examples,
    is_prompt_learning,
    labelled_targets,
    require_plain_head,
    sequence_sha256,
    teacher_logits,
    tokenizer_fingerprint,
)

LayerSpec = Literal["uniform"] | dict[str, int] | list[tuple[int, int]]
COMPONENTS = ("logits", "ce", "hidden", "attention")


class TeacherInput(RecipeConfig):
    ref: str
    """Run reference of a teacher (the student's tokenizer)."""
    weight: float = Field(default=1.0, gt=0)
    """Its share of the mixed distribution (relative to the other teachers')."""


class LossWeights(RecipeConfig):
    logits: float = Field(default=1.0, ge=0)
    """The divergence between the teacher's and the student's next-token distributions."""
    ce: float = Field(default=0.0, ge=0)
    """The ordinary cross-entropy on the data's answer tokens."""
    hidden: float = Field(default=0.0, ge=0)
    """Hidden states of the mapped layers (``hidden_layers``, ``hidden_loss``)."""
    attention: float = Field(default=0.0, ge=0)
    """Attention distributions of the mapped layers (``attention_layers``)."""


class DistillStage(RecipeConfig):
    steps: int = Field(ge=1)
    loss: LossWeights | None = None
    divergence: Divergence | None = None
    temperature: float | None = Field(default=None, gt=0)


class OnPolicy(RecipeConfig):
    fraction: float = Field(default=0.0, ge=0, le=1)
    """Share of the batches (λ) whose answers the student samples itself, for the online teacher to score."""
    max_new_tokens: int = Field(default=64, ge=1)
    temperature: float = Field(default=1.0, gt=0)


class DistillRecipe(SFTRecipe):
    """White-box distillation of a student from teacher runs or stored teacher outputs."""

    method: Literal["distill"] = "distill"
    model: str | None = None
    """The student to start from (a run reference: ``train make-student`` keeps every k-th teacher layer);
    or ``shape`` for a fresh random one with the teacher's tokenizer."""
    shape: ModelShape | None = None
    datasets: list[DatasetInput] = Field(default_factory=list)
    """The training data; with ``teacher_outputs`` it defaults to the data those outputs were made for."""
    teachers: list[TeacherInput] = Field(default_factory=list)
    teacher_outputs: str | None = None
    """A dataset from ``distillery train teacher-logits`` instead of online teachers."""
    loss: LossWeights = Field(default_factory=LossWeights)  # type: ignore[assignment]
    divergence: Divergence = "forward_kl"
    temperature: float = Field(default=1.0, gt=0)
    beta: float = Field(default=0.5, ge=0, le=1)
    """``jsd``: 0 is forward KL, 1 reverse KL, between them the generalised Jensen-Shannon divergence."""
    alpha: float = Field(default=0.1, ge=0, le=1)
    """``skew_*_kl``: the share of the divergence's own side in the mixture it is compared with."""
    top_k: int | None = Field(default=None, ge=1)
    """Keep the teacher's k most likely tokens per position (stored outputs: at most their k)."""
    leftover: Leftover = "spread"
    """With ``top_k``: ``spread`` the rest of the teacher's mass uniformly over the other tokens, or ``drop`` it."""
    hidden_layers: LayerSpec = "uniform"
    """``uniform`` (student layer i with teacher layer round(i*T/S)), ``{last: n}``, or ``[[s, t], ...]``
    (1-based layer outputs; 0 is the embeddings)."""
    hidden_loss: Literal["mse", "cosine"] = "mse"
    attention_layers: LayerSpec = Field(default_factory=lambda: {"last": 1})
    on_policy: OnPolicy = Field(default_factory=OnPolicy)
    stages: list[DistillStage] = Field(default_factory=list)
    """Progressive distillation: stages run in order, each overriding loss weights, divergence or temperature."""

    @model_validator(mode="before")
    @classmethod
    def _one_teacher(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("shape") is not None and "peft" not in data:
            data = data | {"peft": {"method": "none"}}  # a fresh student trains in full
        if isinstance(data, dict) and "teacher" in data:
            data = dict(data)
            teacher = data.pop("teacher")
            if teacher is None:  # (``--set teacher=null`` removes a recipe's teacher)
                return data
            if "teachers" in data:
                raise ValueError("give 'teacher' or 'teachers', not both")
            data["teachers"] = [{"ref": teacher}]
        return data

    @model_validator(mode="after")
    def _consistent(self) -> DistillRecipe:
        if bool(self.teachers) == bool(self.teacher_outputs):
            raise ValueError(
                "give the teacher runs (teacher: or teachers:) or stored teacher_outputs:, not both"
            )
        if (self.model is None) == (self.shape is None):
            raise ValueError("give the student as 'model' (a run) or 'shape' (a fresh model), not both")
        if self.shape is not None and self.peft.method != "none":
            raise ValueError("a 'shape' student is fresh and trains in full: peft.method must be none")
        if self.packing:
            raise ValueError("packing: distillation batches are padded (packing: false)")
        if self.stages:
            total = sum(s.steps for s in self.stages)
            if "max_steps" in self.model_fields_set and self.max_steps != total:
                raise ValueError(
                    f"max_steps {self.max_steps} differs from the stages' {total} steps; drop it"
                )
            self.__dict__["max_steps"] = total  # (an assignment would validate the model again)
        for step_settings in self.all_settings():
            w = step_settings["loss"]
            if not any(getattr(w, c) for c in COMPONENTS):
                raise ValueError(
                    "loss: every weight is 0 (in a stage, too); give logits, ce, hidden or attention"
                )
            if self.teacher_outputs and (w.hidden or w.attention):
                raise ValueError(
                    "hidden-state and attention distillation need the teacher online (teacher:), not teacher_outputs"
                )
            kind = step_settings["divergence"]
            reverse = kind == "reverse_kl" or (kind == "jsd" and self.beta == 1)
            reverse = reverse or (kind == "skew_reverse_kl" and self.alpha == 0)
            if reverse and self.leftover == "drop" and (self.top_k or self.teacher_outputs):
                raise ValueError(
                    f"{kind} is reverse KL here, infinite where the teacher's dropped tokens have student mass; "
                    "use leftover: spread (or jsd / skew_reverse_kl between the ends)"
                )
        if self.teacher_outputs and self.on_policy.fraction:
            raise ValueError("on_policy needs an online teacher to score the student's answers (teacher:)")
        return self

    def all_settings(self) -> list[dict[str, Any]]:
        """The loss settings of each stage (one entry without stages)."""
        if not self.stages:
            return [{"loss": self.loss, "divergence": self.divergence, "temperature": self.temperature}]
        return [
            {"loss": self.loss.model_copy(update=s.loss.model_dump(exclude_unset=True)) if s.loss else self.loss,
             "divergence": s.divergence or self.divergence, "temperature": s.temperature or self.temperature}
            for s in self.stages
        ]  # fmt: skip

    def settings_at(self, step: int) -> dict[str, Any]:
        ends = 0
        for stage, settings in zip(self.stages, self.all_settings(), strict=False):
            ends += stage.steps
            if step < ends:
                return settings
        return self.all_settings()[-1]

    def stage_ends(self) -> list[int]:
        ends, total = [], 0
        for stage in self.stages:
            total += stage.steps
            ends.append(total)
        return ends

    def uses(self, component: str) -> bool:
        return any(getattr(s["loss"], component) for s in self.all_settings())


def _tempered_chunk(cfg: DistillRecipe, settings: dict[str, Any], teacher_weights: list[float], head, hidden,
                    teacher_heads, teacher_hidden, stored_ids, stored_logprobs, targets):  # fmt: skip
    """(summed divergence, summed cross-entropy) of one chunk of answer positions: the student's logits
    and the teacher's log-probs are made here, and remade in the backward (checkpointed)."""
    import torch.nn.functional as F

    logits = head(hidden).float()
    vocab = logits.size(-1)
    if stored_ids is not None:
        teacher = teacher_log_probs_from_topk(stored_ids, stored_logprobs, vocab, cfg.leftover)
    else:
        each = []
        for t_head, t_hidden in zip(teacher_heads, teacher_hidden, strict=True):
            t_logits = teacher_logits(t_head, t_hidden)[..., :vocab]
            each.append(
                topk_log_probs(t_logits, cfg.top_k, cfg.leftover) if cfg.top_k else t_logits.log_softmax(-1)
            )
        teacher = mix_teachers(each, teacher_weights) if len(each) > 1 else each[0]
    kind, temperature = settings["divergence"], settings["temperature"]
    div = divergence(logits, teacher, kind, temperature, cfg.beta, cfg.alpha).sum()
    import torch

    return torch.stack([div, F.cross_entropy(logits, targets, reduction="sum")])


def distill_trainer(cfg: DistillRecipe, teachers: list, hidden_pairs, attention_pairs, projections,
                    stored_k: int | None = None, **kwargs):  # fmt: skip
    """TRL's SFTTrainer whose training loss is the distillation loss (evaluation: the student's own)."""
    import torch
    from torch.utils.checkpoint import checkpoint
    from trl import SFTTrainer

    weights = [w / sum(t.weight for t in cfg.teachers) for w in (t.weight for t in cfg.teachers)] or [1.0]

    class DistillTrainer(SFTTrainer):
        def __init__(self, **kw):
            super().__init__(**kw)
            if projections is not None:  # attached after PEFT wrapped the student: no adapter on them
                projections.to(next(kw["model"].parameters()).device)  # (the Trainer has placed the model)
                kw["model"].distill_projections = projections
            self.tokens_seen = 0
            self.logged: dict[str, list[float]] = {}
            self.draws = (-1, 0)  # (step, micro-batch) of the on-policy draw
            if projections is not None:  # PEFT froze every weight but the adapter's: these learn, too
                for p in projections.parameters():
                    p.requires_grad_(True)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            stored = [inputs.pop(k, None) for k in ("teacher_ids", "teacher_logprobs")]
            if return_outputs or not model.training:  # held-out loss: the student's own cross-entropy
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            settings = cfg.settings_at(self.state.global_step)
            sampled = bool(cfg.on_policy.fraction) and self._draw() < cfg.on_policy.fraction
            if sampled:  # (cross-entropy on the student's own samples would be self-training, not GKD)
                inputs = self._on_policy(model, inputs)
                settings = settings | {"loss": settings["loss"].model_copy(update={"ce": 0.0})}
            labels = inputs["labels"]
            device = labels.device
            for t in teachers:
                t.to(device)
            w = settings["loss"]
            attentions = bool(w.attention)
            forward = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels", "use_cache")}
            options = {"use_cache": False, "output_hidden_states": True, "output_attentions": attentions,
                       "logits_to_keep": torch.empty(0, dtype=torch.long, device=device)}  # fmt: skip
            out = model(**forward, **options)
            with torch.no_grad():
                t_outs = [t(**forward, **options) for t in teachers]
            length = labels.size(1)
            s_hidden = [h[:, -length:] for h in out.hidden_states]
            targets = labels[:, 1:]
            mask = targets != IGNORED
            labelled = mask.sum()
            parts: dict[str, Any] = {}
            if w.logits or w.ce:
                parts["logits"], parts["ce"] = self._logit_terms(
                    settings, s_hidden[-1], t_outs, stored, mask, targets
                )
            valid = inputs["attention_mask"].bool()
            if w.hidden:
                parts["hidden"] = self._hidden_term(s_hidden, t_outs, valid)
            if w.attention:
                parts["attention"] = self._attention_term(out.attentions, t_outs, valid)
            # Every term is a sum over positions, divided as the SFT loss is (train/sft.py): by the answer
            # tokens of the whole accumulated batch (of all processes) when the Trainer counts them, so that
            # micro-batches and processes of any size weigh every position alike.
            # With on-policy batches the Trainer's count (of the data's answers) is not what is trained on:
            # each micro-batch is then its own token mean, and micro-batches weigh alike.
            counted = num_items_in_batch is not None and not cfg.on_policy.fraction
            count = num_items_in_batch if counted else labelled
            token_scale = 1 / torch.as_tensor(count, device=device).clamp(min=1)
            if counted and self.args.average_tokens_across_devices:
                token_scale = token_scale * (self.accelerator.num_processes // self.get_tp_size())
            elif num_items_in_batch is not None and self.model_accepts_loss_kwargs:
                token_scale = token_scale / self.current_gradient_accumulation_steps
            # Weights a stage leaves unused (the LM head in a hidden-states stage, the projections in a
            # logits stage) still join the graph with a zero: DDP expects a gradient for every parameter.
            unused = [*(projections.parameters() if projections is not None else [])]
            if not (w.logits or w.ce):
                unused += list(self.model.get_output_embeddings().parameters())
            loss = sum(p.sum() * 0.0 for p in unused) if unused else 0.0
            for name, value in parts.items():
                loss = loss + getattr(w, name) * value * token_scale
                # (shown per position: per answer token, per real token for hidden states and attention)
                shown = value / (labelled if name in ("logits", "ce") else valid.sum()).clamp(min=1)
                total, n = self.logged.get(f"distill_{name}", [0.0, 0])
                self.logged[f"distill_{name}"] = [total + float(shown.detach()), n + 1]
            self.tokens_seen += int(self.accelerator.gather(inputs["attention_mask"].sum().reshape(1)).sum())
            return loss

        def _logit_terms(self, settings, hidden, t_outs, stored, mask, targets):
            hidden = hidden[:, :-1][mask]
            t_hidden = [o.hidden_states[-1][:, :-1][mask] for o in t_outs]
            ids, logprobs = stored
            if ids is not None:
                k = stored_k or ids.numel() // max(1, len(hidden))
                if ids.numel() != k * len(hidden):
                    raise RunFailed(
                        "the stored teacher outputs do not line up with the batch's answer positions"
                    )
                ids, logprobs = ids.view(-1, k).long(), logprobs.view(-1, k).float()
                if cfg.top_k and cfg.top_k < k:
                    ids, logprobs = ids[:, : cfg.top_k], logprobs[:, : cfg.top_k]
            head = self.model.get_output_embeddings()
            heads = [t.get_output_embeddings() for t in teachers]
            vocab = self.model.config.get_text_config().vocab_size  # (ZeRO-3 partitions the head's weight)
            rows = max(1, LOGITS_PER_CHUNK // (4 * vocab))
            chunk = partial(_tempered_chunk, cfg, settings, weights)
            sums = sum(
                checkpoint(
                    chunk,
                    head,
                    hidden[i : i + rows],
                    heads,
                    [t[i : i + rows] for t in t_hidden],
                    None if ids is None else ids[i : i + rows],
                    None if logprobs is None else logprobs[i : i + rows],
                    targets[mask][i : i + rows],
                    use_reentrant=False,
                )  # fmt: skip
                for i in range(0, max(1, len(hidden)), rows)
            )
            return sums[0], sums[1]

        def _hidden_term(self, s_hidden, t_outs, valid):
            import torch

            total = torch.zeros((), device=valid.device)
            for j, (t_out, weight) in enumerate(zip(t_outs, weights, strict=True)):
                for s, t in hidden_pairs[j]:
                    student = s_hidden[s][valid]
                    key = f"t{j}_l{s}"
                    if projections is not None and key in projections:
                        student = projections[key](student.float())
                    term = hidden_state_loss(student, t_out.hidden_states[t][valid].float(), cfg.hidden_loss)
                    total = total + weight * term.sum() / len(hidden_pairs[j])
            return total

        def _attention_term(self, s_att, t_outs, valid):
            import torch

            total = torch.zeros((), device=valid.device)
            for j, (t_out, weight) in enumerate(zip(t_outs, weights, strict=True)):
                for s, t in attention_pairs[j]:
                    kl = attention_loss(s_att[s - 1], t_out.attentions[t - 1].float(), valid)
                    total = total + weight * kl / len(attention_pairs[j])
            return total

        def _draw(self) -> float:
            """The seeded draw of whether this micro-batch is on-policy (the same after a resume)."""
            step, micro = self.draws
            self.draws = (self.state.global_step, micro + 1 if step == self.state.global_step else 0)
            return random.Random(f"{cfg.seed}-{self.draws[0]}-{self.draws[1]}").random()

        def _on_policy(self, model, inputs):
            """The batch's prompts with the student's own sampled answers (labelled) instead of the data's."""
            import torch

            ids, labels = inputs["input_ids"], inputs["labels"]
            prompts = []
            for row in range(len(ids)):
                where = (labels[row] != IGNORED).nonzero()
                first = int(where[0]) if len(where) else int(inputs["attention_mask"][row].sum())
                prompts.append(ids[row, :first])
            pad = self.processing_class.pad_token_id
            pad = pad if pad is not None else self.processing_class.eos_token_id
            width = max(len(p) for p in prompts)
            left = torch.full((len(prompts), width), pad, dtype=ids.dtype, device=ids.device)
            attention = torch.zeros_like(left)
            for row, p in enumerate(prompts):
                left[row, width - len(p) :], attention[row, width - len(p) :] = p, 1
            student = self.accelerator.unwrap_model(model)
            student.eval()
            with torch.no_grad():
                made = student.generate(input_ids=left, attention_mask=attention, do_sample=True, top_k=0,
                                        max_new_tokens=cfg.on_policy.max_new_tokens, top_p=1.0,
                                        temperature=cfg.on_policy.temperature, pad_token_id=pad)[:, width:]  # fmt: skip
            student.train()
            ends = student.generation_config.eos_token_id
            ends = set(ends if isinstance(ends, list) else [ends]) | {self.processing_class.eos_token_id, pad}
            ends = torch.tensor(sorted(e for e in ends if e is not None), device=made.device)
            rows = []
            for p, answer in zip(prompts, made, strict=True):
                stop = torch.isin(answer, ends).nonzero()
                answer = answer[: int(stop[0]) + 1] if len(stop) else answer
                rows.append((torch.cat([p, answer]), torch.cat([torch.full_like(p, IGNORED), answer])))
            width = max(len(r[0]) for r in rows)
            batch = {
                "input_ids": torch.full((len(rows), width), pad, dtype=ids.dtype, device=ids.device),
                "labels": torch.full((len(rows), width), IGNORED, dtype=ids.dtype, device=ids.device),
                "attention_mask": torch.zeros((len(rows), width), dtype=ids.dtype, device=ids.device),
            }
            for row, (tokens, answer_labels) in enumerate(rows):
                batch["input_ids"][row, : len(tokens)] = tokens
                batch["labels"][row, : len(tokens)] = answer_labels
                batch["attention_mask"][row, : len(tokens)] = 1
            return batch

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            if "loss" in logs:
                logs["num_tokens"] = float(self.tokens_seen)
                for key, (total, n) in self.logged.items():
                    logs[key] = total / max(1, n)
                settings = cfg.settings_at(max(0, self.state.global_step - 1))
                logs["temperature"] = settings["temperature"]
                self.logged = {}
            super().log(logs, start_time)

    return DistillTrainer(**kwargs)


def stored_outputs_collator(pad_token_id: int):
    """TRL's padding collator, with the stored teacher outputs of the batch's examples concatenated in
    the order of their answer positions (the order the loss visits them)."""
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    base = DataCollatorForLanguageModeling(pad_token_id=pad_token_id)

    def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
        stored = [(e.pop("teacher_ids", None), e.pop("teacher_logprobs", None)) for e in examples]
        batch = base([{k: e[k] for k in ("input_ids", "labels")} for e in examples])
        if stored[0][0] is not None:
            batch["teacher_ids"] = torch.tensor([i for ids, _ in stored for i in ids], dtype=torch.int32)
            batch["teacher_logprobs"] = torch.tensor([v for _, lp in stored for v in lp], dtype=torch.float16)
        return batch

    return collate


def _stored_outputs(cfg: DistillRecipe, store: Store) -> tuple[Manifest, list[Manifest], list[DatasetInput]]:
    """The teacher-outputs dataset and the data it was made for (the recipe's datasets must be those)."""
    outputs = store.resolve(cfg.teacher_outputs, kind="dataset")
    if outputs.producer.stage != "train.teacher-logits":
        raise DistilleryError(
            f"teacher_outputs: {outputs.ref} was made by {outputs.producer.stage}, not 'distillery train "
            "teacher-logits'"
        )
    names = {p.id: p.name for p in outputs.parents}
    made_for = [
        DatasetInput(**d | {"ref": f"{names[d['ref']]}@{d['ref']}"})
        for d in outputs.producer.recipe["datasets"]
    ]
    inputs = cfg.datasets or made_for
    datasets = resolve_datasets(inputs, store, ["id"], "distillation", cfg.curriculum)
    wanted = sorted((m.id, d.split) for m, d in zip(datasets, inputs, strict=True))
    if wanted != sorted((d.ref.split("@")[1], d.split) for d in made_for):
        have = ", ".join(f"{d.ref[: d.ref.index('@') + 13]}:{d.split}" for d in made_for)
        asked = ", ".join(f"{m.ref}:{d.split}" for m, d in zip(datasets, inputs, strict=True))
        raise DistilleryError(
            f"teacher_outputs {outputs.ref} were made for {have}, not {asked}; run 'distillery train "
            "teacher-logits' on this data (or drop datasets: to train on theirs)"
        )
    return outputs, datasets, inputs


def _attach_stored(examples: list[dict[str, Any]], outputs: Manifest, top_k: int | None) -> int:
    """Each example's stored teacher outputs, checked against its tokens; the number kept per position."""
    stored_k = int(outputs.stats["top_k"])
    if top_k and top_k > stored_k:
        raise DistilleryError(
            f"top_k {top_k} is more than the {stored_k} tokens per position {outputs.ref} stores"
        )
    table = read_table(
        outputs, columns=["parents", "sequence_sha256", "positions", "teacher_ids", "teacher_logprobs"]
    )
    by_example = {row["parents"][0]: row for row in table.to_pylist()}
    for example in examples:
        row = by_example.get(example["id"])
        if row is None:
            raise DistilleryError(f"teacher_outputs {outputs.ref} hold nothing for example {example['id']}")
        if row["sequence_sha256"] != sequence_sha256(example["input_ids"]) or row[
            "positions"
        ] != labelled_targets(example["labels"]):
            raise DistilleryError(
                f"example {example['id']}: its tokens differ from those teacher_outputs {outputs.ref} were made "
                "for (another chat template or max_length?); use the teacher-logits recipe's settings"
            )
        example["teacher_ids"], example["teacher_logprobs"] = row["teacher_ids"], row["teacher_logprobs"]
    return stored_k


def _check_teacher(student_tok, teacher_tok, teacher: Manifest, student_ref: str) -> None:
    if tokenizer_fingerprint(student_tok) != tokenizer_fingerprint(teacher_tok):
        raise DistilleryError(
            f"teacher {teacher.ref} ({len(teacher_tok)} tokens) and student {student_ref} ({len(student_tok)} "
            "tokens) have different tokenizers; distillation compares the same token ids -- use a teacher of the "
            "student's tokenizer (cross-tokenizer distillation is not supported)"
        )


def _layer_pairs(spec: LayerSpec, student, teacher, what: str, attention: bool) -> list[list[int]]:
    """The layer map of ``spec`` between two model configs, checked against their layer counts."""
    try:
        pairs = [[s, t] for s, t in layer_map(spec, student.num_hidden_layers, teacher.num_hidden_layers)]
    except ValueError as e:
        raise DistilleryError(f"{what}: {e}") from None
    if attention and any(s < 1 or t < 1 for s, t in pairs):
        raise DistilleryError(
            f"{what}: layer 0 is the embeddings, which have no attention; map layers 1 and up"
        )
    return pairs


def _projections(student, teachers, hidden_pairs, seed: int):
    """A learned linear map per mapped layer where the student's width differs from the teacher's
    (``student`` and ``teachers`` are model configs)."""
    import torch

    torch.manual_seed(seed)
    width = student.hidden_size
    layers = {
        f"t{j}_l{s}": torch.nn.Linear(width, t.hidden_size, bias=False)
        for j, t in enumerate(teachers)
        if t.hidden_size != width
        for s, _ in hidden_pairs[j]
    }
    return torch.nn.ModuleDict(layers) if layers else None


def _projection_saver(projections):
    """Write the projections into every Trainer checkpoint (a PEFT checkpoint holds only the adapter)."""
    from safetensors.torch import save_file
    from transformers import TrainerCallback

    class SaveProjections(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
                os.makedirs(folder, exist_ok=True)
                save_file({k: v.detach().cpu().contiguous() for k, v in projections.state_dict().items()},
                          os.path.join(folder, "projections.safetensors"))  # fmt: skip
            return control

    return SaveProjections()


def _stage_saves(ends: list[int]):
    from transformers import TrainerCallback

    class SaveAtStageEnds(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in ends:
                control.should_save = True
            return control

    return SaveAtStageEnds()


def _student_plan(cfg: DistillRecipe, store: Store, teacher_runs: list[Manifest], outputs: Manifest | None):
    """(the run the student starts from, its tokenizer, its model config), read without any weights: a
    run, or a fresh ``shape`` with the (first) teacher's tokenizer."""
    if cfg.model is not None:
        base = require_causal_lm(store.resolve(cfg.model, kind="run"), store)
        return base, load_tokenizer(base), architecture(base, store).config
    source = teacher_runs[0] if teacher_runs else store.get(outputs.producer.recipe["teacher"])
    tokenizer = load_tokenizer(source)
    config = cfg.shape.llama_config(tokenizer, cfg.max_length)
    return source, tokenizer, config


def _load_student(cfg: DistillRecipe, store: Store, base: Manifest, config, attention: bool):
    import torch

    extra = {"attn_implementation": "eager"} if attention else {}
    if cfg.model is not None:
        return load_causal_lm(base, store, **model_load_kwargs(cfg.peft), **extra)[0]
    from transformers import LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    if attention:
        config._attn_implementation = "eager"
    return LlamaForCausalLM(config)


def train_distill(cfg: DistillRecipe, store: Store) -> Manifest | None:
    import torch

    check_trainer_recipe(cfg)
    if cfg.peft.is_prompt_learning:
        raise DistilleryError(
            f"peft.method {cfg.peft.method}: its virtual tokens have no teacher counterpart; use lora or ia3"
        )
    if cfg.guard.action == "rollback":
        raise DistilleryError("guard.action rollback needs method pretrain; for distill use skip or stop")
    outputs = None
    if cfg.teacher_outputs:
        outputs, datasets, inputs = _stored_outputs(cfg, store)
    else:
        if not cfg.datasets:
            raise DistilleryError(
                "datasets: give the data to distil on (with online teachers it has no default)"
            )
        inputs = cfg.datasets
        datasets = resolve_datasets(inputs, store, ["id"], "distillation", cfg.curriculum)
    teacher_runs = [require_causal_lm(store.resolve(t.ref, kind="run"), store) for t in cfg.teachers]
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    cfg.check_launch(processes, torch.cuda.is_available())
    attention = cfg.uses("attention")
    # Every check first, from tokenizers and configs: a mistake costs no model load.
    base, tokenizer, config = _student_plan(cfg, store, teacher_runs, outputs)
    if cfg.chat_template:
        tokenizer.chat_template = chat_template_text(cfg.chat_template)
    student_ref = base.ref if cfg.model else f"shape {cfg.shape.model_dump()}"
    vocab = config.vocab_size
    if cfg.top_k and cfg.top_k > vocab:
        raise DistilleryError(f"top_k {cfg.top_k} is larger than the vocabulary ({vocab} tokens)")
    require_plain_head(base, config, "student")
    for run in teacher_runs:
        _check_teacher(tokenizer, load_tokenizer(run), run, student_ref)
        if is_prompt_learning(run):
            raise DistilleryError(
                f"teacher {run.ref} is a prompt-learning adapter; give a full run or a LoRA/IA3 one"
            )
    if outputs is not None and outputs.stats.get("tokenizer_sha256") != tokenizer_fingerprint(tokenizer):
        raise DistilleryError(
            f"teacher_outputs {outputs.ref} were made with another tokenizer than student {student_ref}'s; "
            "distillation compares the same token ids -- make them with a teacher of the student's tokenizer"
        )
    if cfg.peft.target_modules and cfg.model:
        check_target_modules(cfg.peft.target_modules, architecture(base, store), base.ref)
    t_configs = [architecture(run, store).config for run in teacher_runs]
    for run, t_config in zip(teacher_runs, t_configs, strict=True):
        require_plain_head(run, t_config, "teacher")
        if t_config.vocab_size < vocab:
            raise DistilleryError(
                f"teacher {run.ref}'s head has {t_config.vocab_size} rows, fewer than student {student_ref}'s {vocab}; "
                "use a student whose embedding table is not padded beyond the teacher's"
            )
    if outputs is not None and int(outputs.stats.get("vocab_size", 0)) > vocab:
        raise DistilleryError(
            f"teacher_outputs {outputs.ref} hold token ids up to {outputs.stats['vocab_size'] - 1}, beyond student "
            f"{student_ref}'s vocabulary of {vocab}"
        )
    hidden_pairs = [_layer_pairs(cfg.hidden_layers, config, t, "hidden_layers", False) for t in t_configs]
    attention_pairs = [
        _layer_pairs(cfg.attention_layers, config, t, "attention_layers", True) for t in t_configs
    ]
    if not cfg.uses("hidden"):
        hidden_pairs = [[] for _ in t_configs]
    if not attention:
        attention_pairs = [[] for _ in t_configs]
    examples = distill_examples(datasets, inputs, tokenizer, cfg.max_length, cfg.seed, cfg.curriculum)
    stored_k = _attach_stored(examples, outputs, cfg.top_k) if outputs is not None else None
    projections = _projections(config, t_configs, hidden_pairs, cfg.seed)
    if projections is not None and (zero_stage(cfg.strategy) == 3 or cfg.strategy == "fsdp"):
        raise DistilleryError(
            f"hidden-state projections (student and teacher widths differ) need ddp or deepspeed-zero1/2, not "
            f"{cfg.strategy}, which would shard them"
        )
    model = _load_student(cfg, store, base, config, attention)
    gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    # The teacher is frozen: bf16 halves its memory and time and loses no precision to updates.
    teacher_dtype = torch.bfloat16 if gpu_bf16 else torch.float32
    teachers = []
    for run in teacher_runs:
        extra = {"attn_implementation": "eager"} if attention else {}
        teacher, _ = load_causal_lm(run, store, dtype=teacher_dtype, **extra)
        teachers.append(teacher.eval().requires_grad_(False))
    from datasets import Dataset

    eval_data = None
    if cfg.eval_split:
        held_out = [d.model_copy(update={"split": cfg.eval_split, "weight": None}) for d in inputs]
        sets = resolve_datasets(held_out, store, ["id"], "distillation evaluation")
        rows = distill_examples(sets, held_out, tokenizer, cfg.max_length, cfg.seed)
        eval_data = Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in rows])
    train_data = Dataset.from_list([{k: v for k, v in e.items() if k != "id"} for e in examples])

    recipe = {k: v for k, v in cfg.resolved().items() if k != "resume"}
    recipe |= {"model": base.id if cfg.model else None, "datasets": pinned(inputs, datasets),
               "teachers": [t.resolved() | {"ref": r.id} for t, r in zip(cfg.teachers, teacher_runs, strict=True)],
               "teacher_outputs": outputs.id if outputs else None,
               "layer_maps": {"hidden": hidden_pairs, "attention": attention_pairs}}  # fmt: skip
    plan = {k: v for k, v in recipe.items() if k not in REPORTING_FIELDS}
    main = int(os.environ.get("RANK", "0")) == 0
    work, last, metrics = trainer_work_folder(store, cfg.name, plan, cfg.resume, main)
    if last is not None and projections is not None:
        from safetensors.torch import load_file

        projections.load_state_dict(load_file(str(last / "projections.safetensors")))
    parents = [*datasets, *([base] if cfg.model else []), *teacher_runs, *([outputs] if outputs else [])]
    roles = {r.id: "teacher" for r in teacher_runs} | ({outputs.id: "teacher_outputs"} if outputs else {})
    roles |= {base.id: "base_model"} if cfg.model else {}
    publisher = Publisher(store, kind="run", name=cfg.name, stage="train.distill", recipe=recipe, parents=parents,
                          parent_roles=roles, seed=cfg.seed, execution={"resume": cfg.resume})  # fmt: skip
    alone = as_a_job_of_one(zero_stage(cfg.strategy) is not None)
    with publisher if main else contextlib.nullcontext() as pub, alone:
        torch.manual_seed(cfg.seed)
        peft_config = build_peft_config(cfg.peft, model, str(checkpoint_path(base))) if cfg.model else None
        args = sft_arguments(cfg, work, model, processes)
        args.remove_unused_columns = False  # the stored teacher outputs travel with each example
        savers = [_projection_saver(projections)] if projections is not None else []
        teacher_flops = sum(2 * count_parameters(t.parameters()) for t in teachers)  # (a forward a token)
        watch = trainer_watch(
            cfg, model, metrics, processes, teacher_flops, [*savers, _stage_saves(cfg.stage_ends())]
        )
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        with deepspeed_contradictions():
            trainer = distill_trainer(cfg, teachers, hidden_pairs, attention_pairs, projections, stored_k, model=model,
                                      args=args, train_dataset=train_data, eval_dataset=eval_data,
                                      processing_class=tokenizer, peft_config=peft_config, callbacks=watch.callbacks,
                                      data_collator=stored_outputs_collator(pad))  # fmt: skip
        trainable = count_parameters(p for p in trainer.model.parameters() if p.requires_grad)
        started = time.time()
        result = train_watched(trainer, last, watch, cfg.name, main)
        if result is None:
            return None
        if projections is not None:  # not part of the student's architecture: saved beside it
            del model.distill_projections  # (the object PEFT, DDP and DeepSpeed wrap)
        trainer.save_model(str(pub.dir / CHECKPOINT_DIR if main else work / "unused"))
        if not main:
            return None
        (pub.dir / CHECKPOINT_DIR / "training_args.bin").unlink(missing_ok=True)
        tokenizer.save_pretrained(pub.dir / CHECKPOINT_DIR)
        if projections is not None:
            from safetensors.torch import save_file

            save_file({k: v.detach().cpu().contiguous() for k, v in projections.state_dict().items()},
                      str(pub.dir / "projections.safetensors"))  # fmt: skip
        shutil.copy(metrics, pub.dir / "metrics.jsonl")
        records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
        logged = [r for r in records if "loss" in r] or [{"loss": None}]
        evaluated = [r["eval_loss"] for r in records if "eval_loss" in r]
        stats = {
            "method": "distill", "peft": cfg.peft.method, "steps": result.global_step, "train_rows": len(train_data),
            "tokens_seen": int(logged[-1].get("num_tokens", 0)), "first_loss": logged[0]["loss"],
            "final_loss": logged[-1]["loss"], "train_loss": result.training_loss,
            "components": {c: logged[-1].get(f"distill_{c}") for c in COMPONENTS if f"distill_{c}" in logged[-1]},
            "teachers": [r.id for r in teacher_runs], "teacher_outputs": outputs.id if outputs else None,
            "stage_ends": cfg.stage_ends(), "wall_s": round(time.time() - started, 2),
            "trainable_parameters": trainable, "guard_triggers": watch.monitor.triggers,
            "processes": trainer.accelerator.num_processes, "distributed": trainer.accelerator.distributed_type.value,
            "eval_loss": evaluated[-1] if evaluated else None,
            "projections": sorted(projections.keys()) if projections is not None else [],
        }  # fmt: skip
        manifest = pub.publish(stats=stats)
    shutil.rmtree(work, ignore_errors=True)
    return manifest


def run_recipe(data: dict[str, Any], store: Store, source: str) -> Manifest | None:
    return train_distill(parse_config(DistillRecipe, data, source), store)
