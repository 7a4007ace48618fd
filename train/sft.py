"""``train`` (method ``sft``): supervised fine-tuning from dataset manifests with TRL, full or PEFT.

    stage: train
    method: sft
    name: demo-sft-run
    model: student-base            # run reference of the base checkpoint
    datasets: [{ref: demo-sft, split: train}]
    peft: {method: lora, r: 8, alpha: 16, target_modules: [q_proj, v_proj]}
    packing: true
    max_steps: 30

The data format is chosen by the columns present (every dataset of a mixture has the same one):

- ``messages`` — a chat, single- or multi-turn (``synth.generate`` and ``synth.cot`` rows). The loss
  is on the assistant turns only. TRL's ``assistant_only_loss`` needs ``{% generation %}`` markers
  that SmolLM2's ChatML template lacks, so each conversation is labelled by
  ``manifests.chat_labels`` (every assistant turn's answer and end-of-turn), the same labels
  ``eval`` perplexity scores. For one turn this is exactly TRL's prompt–completion masking.
- ``prompt`` + ``completion`` — strings, or message lists (chat): TRL's prompt–completion format,
  loss on the completion.

The chat template is the tokenizer's own, or ``chat_template:`` (Jinja text or a ``.jinja`` file),
saved with the checkpoint so that inference uses the template the model was trained with.

``packing: true`` packs examples into rows of ``max_length`` tokens (TRL's best-fit decreasing, an
example longer than a row is truncated) and runs them padding-free: one flattened row per batch
whose position ids restart at 0 at every example. Without flash-attention (CPU: sdpa or eager),
transformers derives a block-diagonal causal mask from those position ids, so an example never
attends to another: ``tests/test_train_sft.py`` checks that every example's loss in a packed batch
equals its loss alone. Prompt-learning adapters cannot pack (their virtual tokens would precede only
the first example of a flattened row).

The loss (``loss: labelled_positions``, the default) is this module's own: the model runs without
its LM head, and the head and cross-entropy are computed only at the positions that have a label (the
answers), a chunk of positions at a time, each chunk's logits recomputed in the backward instead of
kept. On a small model the vocabulary projection is most of the work (SmolLM2: 49k x 576 per
position), so skipping the prompts' positions trains about 2x faster than scoring every position
(``benchmarks/train/sft_speed.py``), with the loss and gradients of the model's own cross-entropy
(``tests/test_train_sft.py``). ``loss: trl`` keeps TRL's SFTTrainer loss as it is.

The run publishes ``checkpoint/`` (the adapter, or the full model, with the tokenizer),
``metrics.jsonl`` (loss per step) and a manifest whose parents are the datasets and the base model.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq
from pydantic import Field

from manifests.chat_labels import IGNORED, labelled_conversation
from manifests.errors import DistilleryError
from manifests.model_runs import require_causal_lm
from manifests.models import (
    CHECKPOINT_DIR,
    base_model_of,
    checkpoint_path,
    is_adapter,
    load_causal_lm,
    load_tokenizer,
)
from manifests.publish import Publisher
from manifests.recipes import Name, RecipeConfig, parse_config
from manifests.schema import Manifest
from manifests.store import Store
from train.checkpoint import trainer_checkpoint_marker, trainer_work_folder
from train.curriculum import Curriculum
from train.data import DatasetInput, load_mixture, pinned, resolve_datasets
from train.launch import as_a_job_of_one
from train.monitor import GuardConfig, Monitor, flops_per_token, guard_stopped, peak_flops, trainer_guard
from train.peft_config import (
    PeftSettings,
    build_peft_config,
    check_target_modules,
    model_load_kwargs,
    require_method_support,
)
from train.strategy import (
    Strategy,
    accelerate_config,
    deepspeed_config,
    layer_classes,
    strategy_problem,
    trainer_arguments,
    zero_stage,
)

SFTFormat = Literal["messages", "prompt-completion"]
SFTLoss = Literal["labelled_positions", "trl"]
REPORTING_FIELDS = {"eval_split", "eval_every", "peak_tflops"}
"""Recipe fields that change what is reported, not what is trained."""
FORMAT_COLUMNS: dict[str, list[str]] = {
    "messages": ["messages"],
    "prompt-completion": ["prompt", "completion"],
}


class SFTRecipe(RecipeConfig):
    """Supervised fine-tuning of a causal LM on chat or prompt–completion data."""

    name: Name
    method: Literal["sft"] = "sft"
    model: str
    """Run reference of the base checkpoint (from ``train import-model``, ``make-student`` or a training run)."""
    datasets: list[DatasetInput] = Field(min_length=1)
    peft: PeftSettings = Field(default_factory=PeftSettings)
    curriculum: Curriculum | None = None
    """Train on the rows in the order of a score, e.g. ``{by: mine_score, order: ascending, stages: 3}``
    (``train/curriculum.py``); without it the Trainer draws them in a seeded random order."""
    max_steps: int = Field(default=30, ge=1)
    per_device_batch_size: int = Field(default=4, ge=1)
    """Examples per step (with packing: packed rows of ``max_length`` tokens per step)."""
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    learning_rate: float = Field(default=2e-4, gt=0)
    warmup_steps: int = Field(default=0, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    max_length: int = Field(default=512, ge=8)
    """Tokens per example (longer ones are truncated); with packing, tokens per packed row."""
    packing: bool = False
    """Pack examples into rows of ``max_length`` tokens, padding-free, attention kept within each example."""
    loss: SFTLoss = "labelled_positions"
    """How the loss is computed. ``labelled_positions``: the LM head and cross-entropy only at the positions
    that have a label (the answers), in chunks, so the prompts' positions are never projected onto the
    vocabulary and the [tokens x vocabulary] logits never exist at once; the same loss and gradients as the
    model's own cross-entropy, faster. ``trl``: TRL's SFTTrainer loss as is (on CPU it projects every
    position); needed for models that soft-cap or scale their logits, or add a router loss (MoE)."""
    chat_template: str | None = None
    """A Jinja chat template (the text, or a path to a ``.jinja`` file) instead of the tokenizer's own."""
    bf16: bool = False
    strategy: Strategy = "ddp"
    """With several processes (``--nproc``): ``ddp``, ``fsdp`` or ``deepspeed-zero1/2/3``
    (``train/strategy.py``); DeepSpeed needs the ``deepspeed`` extra."""
    offload: bool = False
    """With ``fsdp`` or a DeepSpeed strategy: keep optimizer states (and sharded parameters) in CPU memory."""
    save_every: int = Field(default=50, ge=1)
    """Checkpoint every this many steps (the newest two are kept until the run is published)."""
    eval_split: str | None = None
    """Evaluate on this split of the same datasets (``test``, ``validation``…) every ``eval_every``
    steps and at the end: ``eval_loss`` in ``metrics.jsonl`` and in the manifest."""
    eval_every: int = Field(default=50, ge=1)
    peak_tflops: float | None = Field(default=None, gt=0)
    """Peak throughput of one device, for MFU in ``metrics.jsonl``, when it is not a known accelerator."""
    resume: bool = False
    """Continue from the newest checkpoint of an interrupted run of the same recipe (``--resume``)."""
    guard: GuardConfig = Field(default_factory=GuardConfig)
    """NaN/inf gradients are caught before the step (``skip`` drops it, ``stop`` ends the run); loss
    spikes are recorded and ``stop`` ends the run (``rollback`` is for ``method: pretrain``)."""
    seed: int = 0

    def check_launch(self, processes: int, gpus: bool) -> None:
        """Refuse what the Trainer would silently run otherwise (called before torchrun starts, too)."""
        if self.strategy == "fsdp" and processes > 1 and not gpus:
            raise DistilleryError(
                "strategy fsdp: accelerate applies FSDP to GPU processes only, so on CPUs it would run as plain DDP; "
                "use strategy deepspeed-zero3 (sharded on CPUs too) or ddp"
            )

    def resolved(self) -> dict[str, Any]:
        data = super().resolved()
        data["peft"] = {k: v for k, v in data["peft"].items() if v is not None}  # only the method's options
        return data


def data_format(manifests: list[Manifest]) -> SFTFormat:
    """The one format of all ``manifests``, from their columns (``messages`` first)."""
    formats: dict[str, tuple[SFTFormat, tuple[str, ...]]] = {}
    for m in manifests:
        schema = pq.read_schema(m.location / m.data_files()[0].path)
        if "messages" in schema.names:
            fmt: SFTFormat = "messages"
        elif "prompt" in schema.names and "completion" in schema.names:
            fmt = "prompt-completion"
        else:
            raise DistilleryError(
                f"dataset {m.ref} lacks column(s) messages (or prompt and completion) needed for SFT; "
                f"it has: {', '.join(schema.names)}"
            )
        formats[m.ref] = (fmt, tuple(str(schema.field(c).type) for c in FORMAT_COLUMNS[fmt]))
    if len(set(formats.values())) > 1:
        described = ", ".join(f"{ref} ({fmt}: {', '.join(types)})" for ref, (fmt, types) in formats.items())
        raise DistilleryError(
            f"datasets: a mixture needs one format and column types, got {described}; train them separately "
            "or convert one (a prompt/completion chat becomes messages = prompt + completion)"
        )
    return next(iter(formats.values()))[0]


def chat_template_text(value: str) -> str:
    """The template a recipe's ``chat_template`` names: Jinja text as is, or the text of a file."""
    if "{%" in value or "{{" in value:
        return value
    path = Path(value)
    if not path.is_file():
        raise DistilleryError(
            f"chat_template: {value}: no such file (give a .jinja file or the template text)"
        )
    return path.read_text(encoding="utf-8")


def training_rows(mixture, fmt: SFTFormat, tokenizer):
    """The mixture in a form TRL's SFTTrainer takes: tokenized chats, or its prompt–completion format."""
    if fmt == "prompt-completion":
        return mixture.select_columns(["prompt", "completion"])
    return mixture.map(
        lambda row: labelled_conversation(row["messages"], tokenizer, row["id"]),
        remove_columns=mixture.column_names, desc="Tokenizing conversations",
    )  # fmt: skip


def metrics_callback(path: Path, flops_token: float, peak: float | None, processes: int):
    from transformers import TrainerCallback

    class MetricsWriter(TrainerCallback):
        """Appends every logged step (loss, learning rate, grad norm, tokens, tokens/s, MFU where the
        device's peak is known) and every evaluation (``eval_loss``) to ``metrics.jsonl``."""

        def __init__(self) -> None:
            self.started = time.time()
            self.last: tuple[float, float] | None = None  # (time, tokens) at the previous log
            self.evaluating = 0.0  # seconds of evaluation since then: not training time
            self.flops_token = flops_token

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or not ({"loss", "eval_loss"} & logs.keys()) or not state.is_world_process_zero:
                return
            now = time.time()
            record = {"step": state.global_step, "elapsed_s": round(now - self.started, 3)}
            record |= {k: float(v) for k, v in logs.items() if isinstance(v, int | float)}
            self.evaluating += float(logs.get("eval_runtime", 0.0))
            if "num_tokens" in logs and "loss" in logs:  # all processes' tokens so far (TRL)
                if self.last is not None and now - self.last[0] - self.evaluating > 0:
                    rate = (logs["num_tokens"] - self.last[1]) / (now - self.last[0] - self.evaluating)
                    record["tokens_per_s"] = round(rate, 1)
                    if peak:
                        record["mfu"] = round(rate * self.flops_token / (peak * processes), 4)
                self.last, self.evaluating = (now, float(logs["num_tokens"])), 0.0
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")

    return MetricsWriter()


LOGITS_PER_CHUNK = 1 << 24
"""Logits one chunk of labelled positions projects at a time (float32: 64 MiB; 341 positions of
SmolLM2's vocabulary): bounds the memory, and is large enough for an efficient matrix product (chunks a
quarter of this size made a step 1.3x slower on CPU)."""


def _chunk_nll(lm_head, hidden, targets):
    import torch.nn.functional as F

    logits = lm_head(hidden).float()  # the model's own loss upcasts its logits the same way
    return F.cross_entropy(logits, targets, reduction="sum")


def labelled_positions_nll(model, inputs: dict[str, Any], lm_head, vocab_size: int):
    """(Summed negative log-likelihood, count) of the labelled tokens of a batch, the LM head applied
    only where a position has a label, a chunk at a time.

    ``model`` runs with ``output_hidden_states`` and no logits kept (``logits_to_keep`` empty): through
    its wrappers (DDP, DeepSpeed, PEFT), so each does what it does around a forward. ``lm_head`` is then
    called as a module, chunk by chunk, so hooks that gather sharded weights (ZeRO-3) run. Each chunk
    is checkpointed: its logits are recomputed in the backward instead of kept. Labels are shifted as
    the model's own loss shifts them (or taken as given in ``shift_labels``); in a padding-free row the
    collator has already set the label at every example's first position to -100.
    """
    import torch
    from torch.utils.checkpoint import checkpoint

    labels = inputs["labels"]
    forward = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels", "use_cache")}
    none_kept = torch.empty(0, dtype=torch.long, device=labels.device)
    outputs = model(**forward, use_cache=False, output_hidden_states=True, logits_to_keep=none_kept)
    # Prompt-learning adapters put their virtual tokens first: keep the real positions.
    hidden = outputs.hidden_states[-1][:, -labels.size(1) :]
    if inputs.get("shift_labels") is not None:
        targets = inputs["shift_labels"]
    else:
        hidden, targets = hidden[:, :-1], labels[:, 1:]
    mask = targets != IGNORED
    hidden, targets = hidden[mask], targets[mask]
    rows = max(1, LOGITS_PER_CHUNK // vocab_size)
    # At least one chunk, also when nothing is labelled: a zero still connected to every weight, so
    # a micro-batch without answers backpropagates (and DDP sees every parameter used).
    nll = sum(
        checkpoint(_chunk_nll, lm_head, hidden[i : i + rows], targets[i : i + rows], use_reentrant=False)
        for i in range(0, max(1, len(targets)), rows)
    )
    return nll, mask.sum()


def lm_head_problem(config) -> str | None:
    """Why ``loss: labelled_positions`` would not be the model's own loss, or None: a forward that
    changes the logits after the LM head (soft-capping, scaling), which a bare head call skips."""
    text = config.get_text_config()
    for key in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                "logits_scaling"):  # fmt: skip
        value = getattr(text, key, None)
        if value is not None and value != 1:
            return f"its forward changes the LM head's logits ({key}: {value})"
    return None


def sft_trainer(loss: SFTLoss, **kwargs):
    """TRL's SFTTrainer whose loss is ``loss`` (``labelled_positions``: ``labelled_positions_nll``)."""
    import torch
    from trl import SFTTrainer

    class LabelledPositionsSFTTrainer(SFTTrainer):
        """SFTTrainer with the loss on labelled positions only; ``loss: trl`` leaves TRL's own."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.loss_kind = loss
            self.tokens_seen = 0  # all processes' tokens trained on (real tokens: no padding)
            config = self.model.config
            problem = lm_head_problem(config) or (
                "it adds a router loss (MoE)" if self.aux_loss_enabled else None
            )
            if loss == "labelled_positions" and problem:
                raise DistilleryError(
                    f"loss: labelled_positions computes the model's LM head itself, but {problem}; set loss: trl"
                )
            self.vocab_size = config.get_text_config().vocab_size

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # TRL's own loss; also when the logits are wanted (for compute_metrics): its path builds them.
            if self.loss_kind == "trl" or return_outputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            head = self.model.get_output_embeddings()
            nll, labelled = labelled_positions_nll(model, inputs, head, self.vocab_size)
            # Normalised as TRL 1.16 normalises (``SFTTrainer.compute_loss``), so that Trainer's gradient
            # accumulation and DDP averaging treat both losses alike: by the labelled tokens of all
            # accumulated micro-batches (of all processes) when the Trainer counts them, by this batch's
            # otherwise; a batch without labels gives a finite zero.
            count = labelled if num_items_in_batch is None else num_items_in_batch
            loss_value = nll / torch.as_tensor(count, device=nll.device).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss_value = loss_value * (self.accelerator.num_processes // self.get_tp_size())
            if self.model.training:
                # Real tokens as TRL counts them: the attention mask's ones, or the flattened row's length.
                if "attention_mask" in inputs:
                    local = inputs["attention_mask"].sum()
                else:
                    local = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
                self.tokens_seen += int(self.accelerator.gather(local.reshape(1)).sum())
            return loss_value

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            if self.loss_kind == "labelled_positions" and "loss" in logs:
                logs["num_tokens"] = float(self.tokens_seen)
            super().log(logs, start_time)

    return LabelledPositionsSFTTrainer(**kwargs)


def architecture(manifest: Manifest, store: Store):
    """The model of a run without its weights (on the meta device): its layer names, in no time."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    while is_adapter(manifest):
        manifest = base_model_of(manifest, store)
    config = AutoConfig.from_pretrained(checkpoint_path(manifest))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def launch_configs(cfg: SFTRecipe, store: Store, processes: int, machines: int, deepspeed_file: str):
    """The accelerate config for this recipe on ``machines`` nodes, ``processes`` processes in all,
    and for a DeepSpeed strategy the DeepSpeed config (to be written to ``deepspeed_file``): what the
    recipe also sets (batch sizes, clipping, precision) is ``auto``, filled in from the recipe."""
    stage = zero_stage(cfg.strategy)
    base = require_causal_lm(store.resolve(cfg.model, kind="run"), store)
    layers = layer_classes(architecture(base, store))
    ds = deepspeed_config(stage, offload=cfg.offload) if stage is not None else None
    accelerate = accelerate_config(cfg.strategy, processes=processes, machines=machines, layers=layers,
                                   bf16=cfg.bf16, deepspeed_file=deepspeed_file if ds else None, offload=cfg.offload)  # fmt: skip
    return accelerate, ds


def check_trainer_recipe(cfg: SFTRecipe) -> None:
    if cfg.curriculum is not None:
        check_sequential_sampling(cfg)
    if cfg.packing and cfg.peft.is_prompt_learning:
        raise DistilleryError(
            f"packing: true does not work with peft.method {cfg.peft.method}: its virtual tokens would precede "
            "only the first example of a packed row; set packing: false"
        )
    require_method_support(cfg.peft)
    problem = strategy_problem(cfg.strategy, cfg.guard.action)
    if problem:
        raise DistilleryError(problem)
    if cfg.offload and cfg.strategy == "ddp":
        raise DistilleryError(
            "offload: true needs strategy fsdp or deepspeed-zero1/2/3 (ddp keeps a whole model)"
        )


def check_sequential_sampling(cfg: SFTRecipe) -> None:
    """That the Trainer can take the rows in the curriculum's order. Its default sampler is random; its
    public ``train_sampling_strategy: sequential`` (``sft_arguments``) gives a SequentialSampler, which
    accelerate shards by batch -- each process takes its share of every step from the one global order --
    and which ``--resume`` skips into as into any other. No private sampler hook is overridden. Packing
    would reorder the examples (TRL packs by length, best-fit decreasing), so it is refused."""
    from transformers import TrainingArguments

    if "train_sampling_strategy" not in TrainingArguments.__dataclass_fields__:
        import transformers

        raise DistilleryError(
            f"curriculum: the Trainer of transformers {transformers.__version__} draws rows at random and "
            "has no train_sampling_strategy to take them in order; install a newer transformers or drop "
            "curriculum:"
        )
    if cfg.packing:
        raise DistilleryError(
            "curriculum: packing: true reorders the examples (TRL packs them by length, best-fit "
            "decreasing), so the curriculum's order would not hold; set packing: false"
        )


@contextmanager
def deepspeed_contradictions():
    """A DeepSpeed file (``accelerate launch``) whose numbers contradict the recipe: one line."""
    try:
        yield
    except ValueError as e:
        if "DeepSpeed config values that mismatch" not in str(e):
            raise
        found = "; ".join(line.strip("- ") for line in str(e).splitlines()[1:] if line.startswith("- "))
        raise DistilleryError(
            f'the DeepSpeed config contradicts the recipe ({found}); set those to "auto" there (the recipe\'s '
            "values are used)"
        ) from None


def count_parameters(parameters) -> int:
    """Elements of ``parameters``, whole also when ZeRO-3 has partitioned them."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in parameters)


def sft_arguments(cfg: SFTRecipe, work: Path, model, processes: int, config_class=None, **extra):
    """The Trainer arguments of a recipe on the shared core: TRL's ``SFTConfig``, or ``config_class``
    (another TRL config, e.g. ``RewardConfig``) with ``extra`` fields of its own."""
    import torch
    from trl import SFTConfig

    config_class = config_class or SFTConfig
    fields = config_class.__dataclass_fields__
    # transformers 5 renamed gradient checkpointing; the old name still works there, with a warning.
    no_checkpointing = {next(k for k in ("activation_checkpointing", "gradient_checkpointing")
                             if k in fields): False}  # fmt: skip
    specific = {"max_length": cfg.max_length, "packing": cfg.packing, "packing_strategy": "bfd",
                "padding_free": cfg.packing}  # fmt: skip
    return config_class(
        output_dir=work, max_steps=cfg.max_steps, per_device_train_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        bf16=cfg.bf16, seed=cfg.seed, data_seed=cfg.seed, logging_steps=1, report_to="none",
        **({"train_sampling_strategy": "sequential"} if cfg.curriculum is not None else {}),
        save_strategy="steps", save_steps=cfg.save_every, save_total_limit=2,
        eval_strategy="steps" if cfg.eval_split else "no", eval_steps=cfg.eval_every,
        per_device_eval_batch_size=cfg.per_device_batch_size,
        dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(), logging_nan_inf_filter=False,
        **{k: v for k, v in specific.items() if k in fields}, **no_checkpointing,
        **trainer_arguments(cfg.strategy, model, processes=processes, offload=cfg.offload), **extra,
    )  # fmt: skip


FAULT_NAN_STEP = "DISTILLERY_FAULT_NAN_AT_STEP"
"""Fault injection for tests: the gradients of this optimizer step are made NaN."""


FAULT_EXIT_STEP = "DISTILLERY_FAULT_EXIT_AFTER_STEP"
"""Fault injection for tests: the process dies (as if killed) right after this step's checkpoint."""


def planted_faults() -> list:
    nan_step, exit_step = os.environ.get(FAULT_NAN_STEP), os.environ.get(FAULT_EXIT_STEP)
    if nan_step is None and exit_step is None:
        return []
    from transformers import TrainerCallback

    class PlantFaults(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if nan_step is not None and state.global_step == int(nan_step):
                next(p for p in model.parameters() if p.grad is not None).grad.fill_(float("nan"))
            return control

        def on_save(self, args, state, control, **kwargs):
            if exit_step is not None and state.global_step == int(exit_step):
                os._exit(137)
            return control

    return [PlantFaults()]


@dataclass
class Watch:
    """What watches a Trainer-based run: its callbacks, and the monitor and guard they report to."""

    callbacks: list
    monitor: Monitor
    guard: Any
    writer: Any
    flops: float
    """Training FLOPs per token (the writer's, for MFU)."""


def trainer_watch(cfg, model, metrics: Path, processes: int, extra_flops: float = 0.0, extra=()) -> Watch:
    """The callbacks every Trainer-based run has -- ``metrics.jsonl`` (tokens/s, MFU where the device's peak
    is known), ``extra`` ones, checkpoint markers, planted faults (tests), the guards -- in that order."""
    import torch

    monitor = Monitor(None, cfg.guard, 0.0, None)
    guard = trainer_guard(monitor)
    c = model.config
    flops = flops_per_token(count_parameters(model.parameters()), c.num_hidden_layers, c.hidden_size,
                            cfg.max_length) + extra_flops  # fmt: skip
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = peak_flops(device, cfg.peak_tflops * 1e12 if cfg.peak_tflops else None)
    writer = metrics_callback(metrics, flops, peak, processes)
    callbacks = [writer, *extra, trainer_checkpoint_marker(), *planted_faults(), guard]
    return Watch(callbacks, monitor, guard, writer, flops)


def train_watched(trainer, last: Path | None, watch: Watch, name: str, main: bool):
    """``trainer.train()`` (from checkpoint ``last``); a guard's stop is one error on the first process and
    None on the others."""
    with deepspeed_contradictions():
        result = trainer.train(resume_from_checkpoint=str(last) if last else None)
    if watch.guard.stopped is not None:
        if main:
            raise guard_stopped(name, watch.guard.stopped)
        return None
    return result


def train_sft(cfg: SFTRecipe, store: Store) -> Manifest | None:
    check_trainer_recipe(cfg)
    if cfg.guard.action == "rollback":
        raise DistilleryError("guard.action rollback needs method pretrain; for SFT use skip or stop")
    datasets = resolve_datasets(cfg.datasets, store, ["id"], "SFT", cfg.curriculum)
    # Held out: each dataset's split once (a weighted mixture would repeat rows of the smaller ones).
    eval_inputs = [d.model_copy(update={"split": cfg.eval_split, "weight": None}) for d in cfg.datasets]
    eval_inputs = eval_inputs if cfg.eval_split else []
    eval_sets = resolve_datasets(eval_inputs, store, ["id"], "SFT evaluation") if eval_inputs else []
    fmt = data_format(datasets)
    base = require_causal_lm(store.resolve(cfg.model, kind="run"), store)
    template = chat_template_text(cfg.chat_template) if cfg.chat_template else None

    import torch

    processes = int(os.environ.get("WORLD_SIZE", "1"))
    cfg.check_launch(processes, torch.cuda.is_available())

    mixture = load_mixture(
        cfg.datasets, datasets, ["id", *FORMAT_COLUMNS[fmt]], cfg.seed, curriculum=cfg.curriculum
    )
    tokenizer = load_tokenizer(base)
    if template is not None:
        tokenizer.chat_template = template
    conversational = fmt == "messages" or not isinstance(mixture[0]["prompt"], str)
    if conversational and not tokenizer.chat_template:
        raise DistilleryError(
            f"model {base.ref} has no chat template and the data are chats; set chat_template: in the recipe"
        )
    if cfg.peft.target_modules:
        check_target_modules(cfg.peft.target_modules, architecture(base, store), base.ref)
    train_data = training_rows(mixture, fmt, tokenizer)
    columns = ["id", *FORMAT_COLUMNS[fmt]]
    eval_data = (
        training_rows(load_mixture(eval_inputs, eval_sets, columns, cfg.seed), fmt, tokenizer)
        if eval_sets
        else None
    )
    recipe = {k: v for k, v in cfg.resolved().items() if k != "resume"}  # resuming does not change the run
    recipe |= {"model": base.id, "datasets": pinned(cfg.datasets, datasets)}
    # What only reports (evaluation, MFU) may change between a kill and --resume.
    plan = {k: v for k, v in recipe.items() if k not in REPORTING_FIELDS}
    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun, the first process writes and publishes
    work, last, metrics = trainer_work_folder(store, cfg.name, plan, cfg.resume, main)
    roles = {base.id: "base_model"}
    publisher = Publisher(store, kind="run", name=cfg.name, stage="train.sft", recipe=recipe, parents=[*datasets, base],
                          parent_roles=roles, seed=cfg.seed, execution={"resume": cfg.resume})  # fmt: skip
    alone = as_a_job_of_one(zero_stage(cfg.strategy) is not None)  # DeepSpeed needs a process group
    with publisher if main else contextlib.nullcontext() as pub, alone:
        # ZeRO-3 loads the weights already partitioned when the DeepSpeed config exists first.
        early = zero_stage(cfg.strategy) == 3 and not is_adapter(base)
        args = sft_arguments(cfg, work, None, processes) if early else None
        if args is not None:  # partitioning needs the process group, and DeepSpeed's view of it
            import deepspeed
            from accelerate import PartialState

            PartialState()  # joins the process group (as the Trainer would, later)
            deepspeed.init_distributed()
        torch.manual_seed(cfg.seed)
        model, _ = load_causal_lm(base, store, **model_load_kwargs(cfg.peft))
        loaded_partitioned = hasattr(next(model.parameters()), "ds_numel")
        peft_config = build_peft_config(cfg.peft, model, str(checkpoint_path(base)))
        args = args or sft_arguments(cfg, work, model, processes)
        watch = trainer_watch(cfg, model, metrics, processes)
        with deepspeed_contradictions():
            trainer = sft_trainer(cfg.loss, model=model, args=args, train_dataset=train_data, eval_dataset=eval_data,
                                  processing_class=tokenizer, peft_config=peft_config, callbacks=watch.callbacks)  # fmt: skip
        # Frozen weights (PEFT) get no weight gradients: 4 FLOPs a parameter a token instead of 6.
        trainable = count_parameters(p for p in trainer.model.parameters() if p.requires_grad)
        watch.writer.flops_token = watch.flops - 2 * max(
            0, count_parameters(trainer.model.parameters()) - trainable
        )
        started = time.time()
        result = train_watched(trainer, last, watch, cfg.name, main)
        if result is None:
            return None
        # Every process takes part: FSDP and ZeRO-3 gather the whole weights; only the first writes them.
        trainer.save_model(str(pub.dir / CHECKPOINT_DIR if main else work / "unused"))
        if not main:
            return None
        (pub.dir / CHECKPOINT_DIR / "training_args.bin").unlink(missing_ok=True)  # a pickle of local paths
        tokenizer.save_pretrained(pub.dir / CHECKPOINT_DIR)
        shutil.copy(metrics, pub.dir / "metrics.jsonl")
        records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
        logged = [r for r in records if "loss" in r] or [{"loss": None}]  # (a resumed run may lose its file)
        evaluated = [
            r["eval_loss"] for r in records if "eval_loss" in r
        ]  # (the Trainer evaluates at the end)
        stats = {
            "method": "sft", "peft": cfg.peft.method, "format": fmt, "packing": cfg.packing,
            "steps": result.global_step, "train_rows": len(train_data), "tokens_seen": int(logged[-1].get("num_tokens", 0)),
            "first_loss": logged[0]["loss"], "final_loss": logged[-1]["loss"], "train_loss": result.training_loss,
            "wall_s": round(time.time() - started, 2),
            "trainable_parameters": trainable,
            "guard_triggers": watch.monitor.triggers, "processes": trainer.accelerator.num_processes,
            "distributed": trainer.accelerator.distributed_type.value, "eval_loss": evaluated[-1] if evaluated else None,
            "deepspeed": args.hf_deepspeed_config.config if args.deepspeed else None,
            "loaded_partitioned": loaded_partitioned,
        }  # fmt: skip
        manifest = pub.publish(stats=stats)
    shutil.rmtree(work, ignore_errors=True)  # published: the checkpoints are no longer needed
    return manifest


def run_recipe(data: dict[str, Any], store: Store, source: str) -> Manifest:
    return train_sft(parse_config(SFTRecipe, data, source), store)
