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
  that SmolLM2's ChatML template lacks, so each conversation is tokenized here: the template is
  rendered up to each assistant turn and through it, and the tokens in between (the answer and its
  end-of-turn) are the turn's labels. For one turn this is exactly TRL's prompt–completion masking;
  a template that does not render a conversation's prefixes as prefixes of the whole is an error.
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

The run publishes ``checkpoint/`` (the adapter, or the full model, with the tokenizer),
``metrics.jsonl`` (loss per step) and a manifest whose parents are the datasets and the base model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq
from pydantic import Field

from manifests.errors import DistilleryError, RunFailed
from manifests.hashing import canonical_json
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
from manifests.store import Store, claim_work_folder
from train.checkpoint import latest_trainer_checkpoint, trainer_checkpoint_marker
from train.data import DatasetInput, load_mixture, pinned, resolve_datasets
from train.launch import as_a_job_of_one
from train.monitor import GuardConfig, Monitor, flops_per_token, peak_flops, trainer_guard
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
REPORTING_FIELDS = {"eval_split", "eval_every", "peak_tflops"}
"""Recipe fields that change what is reported, not what is trained."""
FORMAT_COLUMNS: dict[str, list[str]] = {
    "messages": ["messages"],
    "prompt-completion": ["prompt", "completion"],
}
COMPACT_LM_HEAD_ON_CPU = True
"""Score the LM head only at labelled positions on CPU (``labelled_positions_only``); the benchmark
turns it off to show what packing alone gives."""


class SFTRecipe(RecipeConfig):
    """Supervised fine-tuning of a causal LM on chat or prompt–completion data."""

    name: Name
    method: Literal["sft"] = "sft"
    model: str
    """Run reference of the base checkpoint (from ``train import-model``, ``make-student`` or a training run)."""
    datasets: list[DatasetInput] = Field(min_length=1)
    peft: PeftSettings = Field(default_factory=PeftSettings)
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


def _render(tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> list[int]:
    # Tokenized as TRL tokenizes chats (``trl.data_utils._tokenize``), so both routes give the same ids.
    encoded = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt
    )
    return list(encoded["input_ids"])


def conversation_example(
    messages: list[dict[str, Any]], tokenizer, row_id: str = "?"
) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` of one chat: labels are -100 except on the assistant turns.

    A turn's tokens are those between the conversation rendered up to it (with the generation
    prompt) and rendered through it: its answer and end-of-turn, what the model must learn to say.
    """
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    ids = _render(tokenizer, messages)
    labels = [-100] * len(ids)
    turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if not turns:
        raise DistilleryError(f"row {row_id} has no assistant message; SFT needs one to learn")
    for i in turns:
        start = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else []
        through = _render(tokenizer, messages[: i + 1])
        if ids[: len(start)] != start or ids[: len(through)] != through or len(through) < len(start):
            raise DistilleryError(
                f"row {row_id}: the chat template does not render the conversation up to turn {i} as the start "
                "of the whole conversation, so the assistant's tokens cannot be found; set chat_template: to a "
                "template that renders earlier turns the same way"
            )
        labels[len(start) : len(through)] = ids[len(start) : len(through)]
    return {"input_ids": ids, "labels": labels}


def training_rows(mixture, fmt: SFTFormat, tokenizer):
    """The mixture in a form TRL's SFTTrainer takes: tokenized chats, or its prompt–completion format."""
    if fmt == "prompt-completion":
        return mixture.select_columns(["prompt", "completion"])
    return mixture.map(
        lambda row: conversation_example(row["messages"], tokenizer, row["id"]),
        remove_columns=mixture.column_names, desc="Tokenizing conversations",
    )  # fmt: skip


def _metrics_callback(path: Path, flops_token: float, peak: float | None, processes: int):
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


@contextmanager
def labelled_positions_only():
    """While training: TRL's LM head scores only the positions that have a label, on CPU too.

    TRL's fused LM head projects only the labelled positions (the answers) on CUDA, but every
    position on other devices, to keep tile shapes fixed for compiled backends (Neuron). Nothing is
    compiled on CPU, and the vocabulary projection is most of a small model's work (SmolLM2: 49k x
    576 per position), so skipping the prompt's positions trains 1.3-1.9x faster on synth-like
    data with the same loss (``benchmarks/train``; ``tests/test_train_sft.py`` checks the loss).
    """
    import trl.trainer.utils as trl_utils

    original = getattr(trl_utils, "_use_triton", None)
    if original is None or not COMPACT_LM_HEAD_ON_CPU:  # another TRL: its own behaviour
        yield
        return
    trl_utils._use_triton = lambda device: original(device) or device.type == "cpu"
    try:
        yield
    finally:
        trl_utils._use_triton = original


def _architecture(manifest: Manifest, store: Store):
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
    layers = layer_classes(_architecture(base, store))
    ds = deepspeed_config(stage, offload=cfg.offload) if stage is not None else None
    accelerate = accelerate_config(cfg.strategy, processes=processes, machines=machines, layers=layers,
                                   bf16=cfg.bf16, deepspeed_file=deepspeed_file if ds else None, offload=cfg.offload)  # fmt: skip
    return accelerate, ds


def _check_recipe(cfg: SFTRecipe) -> None:
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


@contextmanager
def _deepspeed_contradictions():
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


def _count(parameters) -> int:
    """Elements of ``parameters``, whole also when ZeRO-3 has partitioned them."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in parameters)


def _trainer_args(cfg: SFTRecipe, work: Path, model, processes: int):
    import torch
    from trl import SFTConfig

    # transformers 5 renamed gradient checkpointing; the old name still works there, with a warning.
    no_checkpointing = {next(k for k in ("activation_checkpointing", "gradient_checkpointing")
                             if k in SFTConfig.__dataclass_fields__): False}  # fmt: skip
    return SFTConfig(
        output_dir=work, max_steps=cfg.max_steps, per_device_train_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        max_length=cfg.max_length, packing=cfg.packing, packing_strategy="bfd", padding_free=cfg.packing,
        bf16=cfg.bf16, seed=cfg.seed, data_seed=cfg.seed, logging_steps=1, report_to="none",
        save_strategy="steps", save_steps=cfg.save_every, save_total_limit=2,
        eval_strategy="steps" if cfg.eval_split else "no", eval_steps=cfg.eval_every,
        per_device_eval_batch_size=cfg.per_device_batch_size,
        dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(), logging_nan_inf_filter=False,
        **no_checkpointing, **trainer_arguments(cfg.strategy, model, processes=processes, offload=cfg.offload),
    )  # fmt: skip


FAULT_NAN_STEP = "DISTILLERY_FAULT_NAN_AT_STEP"
"""Fault injection for tests: the gradients of this optimizer step are made NaN."""


FAULT_EXIT_STEP = "DISTILLERY_FAULT_EXIT_AFTER_STEP"
"""Fault injection for tests: the process dies (as if killed) right after this step's checkpoint."""


def _planted_faults() -> list:
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


def train_sft(cfg: SFTRecipe, store: Store) -> Manifest | None:
    _check_recipe(cfg)
    if cfg.guard.action == "rollback":
        raise DistilleryError("guard.action rollback needs method pretrain; for SFT use skip or stop")
    datasets = resolve_datasets(cfg.datasets, store, ["id"], "SFT")
    # Held out: each dataset's split once (a weighted mixture would repeat rows of the smaller ones).
    eval_inputs = [d.model_copy(update={"split": cfg.eval_split, "weight": None}) for d in cfg.datasets]
    eval_inputs = eval_inputs if cfg.eval_split else []
    eval_sets = resolve_datasets(eval_inputs, store, ["id"], "SFT evaluation") if eval_inputs else []
    fmt = data_format(datasets)
    base = require_causal_lm(store.resolve(cfg.model, kind="run"), store)
    template = chat_template_text(cfg.chat_template) if cfg.chat_template else None

    import torch
    from trl import SFTTrainer

    processes = int(os.environ.get("WORLD_SIZE", "1"))
    cfg.check_launch(processes, torch.cuda.is_available())

    mixture = load_mixture(cfg.datasets, datasets, ["id", *FORMAT_COLUMNS[fmt]], cfg.seed)
    tokenizer = load_tokenizer(base)
    if template is not None:
        tokenizer.chat_template = template
    conversational = fmt == "messages" or not isinstance(mixture[0]["prompt"], str)
    if conversational and not tokenizer.chat_template:
        raise DistilleryError(
            f"model {base.ref} has no chat template and the data are chats; set chat_template: in the recipe"
        )
    if cfg.peft.target_modules:
        check_target_modules(cfg.peft.target_modules, _architecture(base, store), base.ref)
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
    work = (
        store.name_dir("run", cfg.name)
        / f".work-{hashlib.sha256(canonical_json(plan).encode()).hexdigest()[:16]}"
    )
    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun, the first process writes and publishes
    if not cfg.resume and main:
        shutil.rmtree(work, ignore_errors=True)
    last = latest_trainer_checkpoint(work, remove_partial=main) if cfg.resume else None
    if cfg.resume and last is None and main:
        print(f"note: no checkpoint of this recipe to resume from in {work.parent}; training from the start",
              file=sys.stderr)  # fmt: skip
    claim_work_folder(work)
    metrics = work / "metrics.jsonl"
    if main and last is not None and metrics.is_file():  # steps logged after the checkpoint are trained again
        done = int(last.name.rsplit("-", 1)[-1])
        kept = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= done]
        metrics.write_text("".join(line + "\n" for line in kept))
    elif main and metrics.is_file():
        metrics.unlink()
    roles = {base.id: "base_model"}
    publisher = Publisher(store, kind="run", name=cfg.name, stage="train.sft", recipe=recipe, parents=[*datasets, base],
                          parent_roles=roles, seed=cfg.seed, execution={"resume": cfg.resume})  # fmt: skip
    alone = as_a_job_of_one(zero_stage(cfg.strategy) is not None)  # DeepSpeed needs a process group
    with publisher if main else contextlib.nullcontext() as pub, alone:
        # ZeRO-3 loads the weights already partitioned when the DeepSpeed config exists first.
        early = zero_stage(cfg.strategy) == 3 and not is_adapter(base)
        args = _trainer_args(cfg, work, None, processes) if early else None
        if args is not None:  # partitioning needs the process group, and DeepSpeed's view of it
            import deepspeed
            from accelerate import PartialState

            PartialState()  # joins the process group (as the Trainer would, later)
            deepspeed.init_distributed()
        torch.manual_seed(cfg.seed)
        model, _ = load_causal_lm(base, store, **model_load_kwargs(cfg.peft))
        loaded_partitioned = hasattr(next(model.parameters()), "ds_numel")
        peft_config = build_peft_config(cfg.peft, model, str(checkpoint_path(base)))
        args = args or _trainer_args(cfg, work, model, processes)
        monitor = Monitor(None, cfg.guard, 0.0, None)
        guard = trainer_guard(monitor)
        c = model.config
        flops = flops_per_token(
            _count(model.parameters()), c.num_hidden_layers, c.hidden_size, cfg.max_length
        )
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        peak = peak_flops(device, cfg.peak_tflops * 1e12 if cfg.peak_tflops else None)
        writer = _metrics_callback(metrics, flops, peak, processes)
        callbacks = [writer, trainer_checkpoint_marker(), *_planted_faults(), guard]
        with _deepspeed_contradictions():
            trainer = SFTTrainer(model=model, args=args, train_dataset=train_data, eval_dataset=eval_data,
                                 processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)  # fmt: skip
        # Frozen weights (PEFT) get no weight gradients: 4 FLOPs a parameter a token instead of 6.
        trainable = _count(p for p in trainer.model.parameters() if p.requires_grad)
        writer.flops_token = flops - 2 * max(0, _count(trainer.model.parameters()) - trainable)
        started = time.time()
        with labelled_positions_only(), _deepspeed_contradictions():
            result = trainer.train(resume_from_checkpoint=str(last) if last else None)
        if guard.stopped is not None:
            if not main:
                return None
            t = guard.stopped
            raise RunFailed(
                f"{cfg.name}: {t['reason'].replace('_', ' ')} at step {t['step']} (loss {t['loss']}, grad norm "
                f"{t['grad_norm']}); stopped as guard.action says -- 'guard: {{action: skip}}' drops such steps"
            )
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
            "guard_triggers": monitor.triggers, "processes": trainer.accelerator.num_processes,
            "distributed": trainer.accelerator.distributed_type.value, "eval_loss": evaluated[-1] if evaluated else None,
            "deepspeed": args.hf_deepspeed_config.config if args.deepspeed else None,
            "loaded_partitioned": loaded_partitioned,
        }  # fmt: skip
        manifest = pub.publish(stats=stats)
    shutil.rmtree(work, ignore_errors=True)  # published: the checkpoints are no longer needed
    return manifest


def run_recipe(data: dict[str, Any], store: Store, source: str) -> Manifest:
    return train_sft(parse_config(SFTRecipe, data, source), store)
