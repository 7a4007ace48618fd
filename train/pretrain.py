"""``train`` (method ``pretrain``): a causal LM from packed token shards, from scratch or continued.

    stage: train
    method: pretrain
    name: tiny-lm
    datasets: [{ref: demo-packed}]          # from `distillery train pack`: input_ids of seq_len tokens
    tokenizer: smollm2-135m-instruct         # from scratch: whose tokenizer (or `model:` to continue)
    shape: {hidden_size: 128, layers: 4, heads: 4}
    max_steps: 200
    per_device_batch_size: 8
    gradient_accumulation_steps: 2
    learning_rate: 3.0e-4                    # AdamW; linear warmup, then cosine to min_lr_ratio
    warmup_steps: 20
    precision: bf16                          # autocast where the hardware has it
    guard: {action: rollback}                # NaN/inf and loss spikes: skip | rollback | stop

From setup to save in one place: data (``train/data.py``), the model, AdamW with weight decay on
matrices only, the schedule, the loop (gradient accumulation, clipping, guards), evaluation on the
validation split, checkpoints (``train/checkpoint.py``: atomic, exact resume) and the published
run: ``checkpoint/`` (model + tokenizer), ``metrics.jsonl``, and a manifest whose parents are the
datasets (and the base model or tokenizer) and whose stats hold the losses and every guard trigger.

The packed rows are not loaded: each shard is copied once to an Arrow file in the run's work
folder and batches are read from it memory-mapped (``train/data.py``), so memory does not grow with
the corpus (``benchmarks/train/pretrain_memory.py``). Data order is a seeded permutation per epoch
of the global sequence indexes; each optimizer step
takes ``per_device_batch_size * processes * gradient_accumulation_steps`` of them and each process
its own slice, so 2 processes of 2 see what 1 process of 4 sees (``--nproc``, ``train/launch.py``).
With a ``curriculum`` (a numeric column of the packed rows; ``train/curriculum.py``) the order is the
curriculum's instead, the same in every epoch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from manifests.errors import DistilleryError, RunFailed
from manifests.hashing import canonical_json
from manifests.models import CHECKPOINT_DIR, load_causal_lm, load_tokenizer
from manifests.publish import Publisher
from manifests.recipes import Name, RecipeConfig, parse_config
from manifests.schema import Manifest
from manifests.store import OWNER_PREFIX, Store, claim_work_folder
from train import checkpoint
from train.curriculum import Curriculum
from train.data import DatasetInput, load_mixture, pinned, resolve_datasets
from train.launch import Dist, setup, teardown
from train.monitor import GuardConfig, Monitor, flops_per_token, peak_flops
from train.strategy import Strategy, strategy_problem, zero_stage

FAULT_NAN = "DISTILLERY_FAULT_NAN_AT"
"""Fault injection for tests: the loss of the micro-batch holding this global sequence index is NaN."""
FAULT_EXIT = "DISTILLERY_FAULT_EXIT_AFTER_STEP"
"""Fault injection for tests: the process dies (as if killed) right after this step's checkpoint."""
EXECUTION_FIELDS = {"resume"}


class ModelShape(RecipeConfig):
    """A Llama-style decoder built from scratch."""

    hidden_size: int = Field(default=256, ge=8)
    layers: int = Field(default=4, ge=1)
    heads: int = Field(default=4, ge=1)
    kv_heads: int | None = Field(default=None, ge=1)
    intermediate_size: int | None = Field(default=None, ge=8)
    """Default: about 8/3 of ``hidden_size`` (SwiGLU), a multiple of 8."""
    tie_embeddings: bool = True

    def llama_config(self, tokenizer, seq_len: int):
        """The Llama config of this shape for ``tokenizer``'s vocabulary and sequences of ``seq_len``."""
        from transformers import LlamaConfig

        if self.hidden_size % self.heads:
            raise DistilleryError(
                f"shape: hidden_size {self.hidden_size} is not a multiple of heads {self.heads}"
            )
        return LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=self.hidden_size, num_hidden_layers=self.layers,
            num_attention_heads=self.heads, num_key_value_heads=self.kv_heads or self.heads,
            intermediate_size=self.intermediate_size or (self.hidden_size * 8 // 3 + 7) // 8 * 8,
            max_position_embeddings=max(seq_len, 128), tie_word_embeddings=self.tie_embeddings,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip


class PretrainRecipe(RecipeConfig):
    """Pretraining (or continued pretraining) of a causal LM on packed token sequences."""

    name: Name
    method: Literal["pretrain"] = "pretrain"
    datasets: list[DatasetInput] = Field(min_length=1)
    curriculum: Curriculum | None = None
    """Train on the packed rows in the order of a numeric column of theirs (``train/curriculum.py``), e.g.
    ``{by: quality, order: descending, stages: 4}``; without it, a seeded permutation per epoch."""
    model: str | None = None
    """Continue pretraining this checkpoint (a run reference); or give ``tokenizer`` and ``shape``."""
    tokenizer: str | None = None
    """From scratch: the run whose tokenizer the packed data was made with."""
    shape: ModelShape = Field(default_factory=ModelShape)
    max_steps: int = Field(default=100, ge=1)
    per_device_batch_size: int = Field(default=8, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    learning_rate: float = Field(default=3e-4, gt=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    """The cosine ends at this share of ``learning_rate``."""
    warmup_steps: int = Field(default=10, ge=0)
    weight_decay: float = Field(default=0.1, ge=0)
    """On weight matrices only (not on biases, norms or embeddings' scale parameters)."""
    betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: float = Field(default=1.0, gt=0)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """``bf16`` autocasts on CPUs and GPUs that have it; ``fp16`` needs a GPU (with loss scaling)."""
    eval_every: int = Field(default=50, ge=1)
    eval_batches: int = Field(default=4, ge=1)
    save_every: int = Field(default=50, ge=1)
    """Checkpoint every this many steps (and at the end); the run resumes from the newest."""
    strategy: Strategy = "ddp"
    """With several processes: ``ddp`` (a full model per process), ``fsdp`` (parameters, gradients
    and optimizer state sharded across processes: torch FSDP2, each decoder layer a unit) or
    ``deepspeed-zero1/2/3`` (DeepSpeed's engine under this loop, ``train/zero.py``)."""
    guard: GuardConfig = Field(default_factory=GuardConfig)
    peak_tflops: float | None = Field(default=None, gt=0)
    """Peak throughput of one device for MFU, when the device is not a known accelerator."""
    seed: int = 0
    resume: bool = False
    """Continue from the newest checkpoint of an earlier, interrupted run of the same recipe."""

    @model_validator(mode="after")
    def _source(self) -> PretrainRecipe:
        if (self.model is None) == (self.tokenizer is None):
            raise ValueError(
                "give 'model' (continue a checkpoint) or 'tokenizer' (from scratch with 'shape'), not both"
            )
        problem = strategy_problem(self.strategy, self.guard.action)
        if problem:
            raise ValueError(problem)
        return self

    def content_recipe(self) -> dict[str, Any]:
        return {k: v for k, v in self.resolved().items() if k not in EXECUTION_FIELDS}


def _build_model(cfg: PretrainRecipe, store: Store, seq_len: int):
    import torch
    from transformers import LlamaForCausalLM

    if cfg.model is not None:
        base = store.resolve(cfg.model, kind="run")
        model, tokenizer = load_causal_lm(base, store)
        return model, tokenizer, base
    source = store.resolve(cfg.tokenizer, kind="run")
    tokenizer = load_tokenizer(source)
    config = cfg.shape.llama_config(tokenizer, seq_len)
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config), tokenizer, source


def _optimizer(model, cfg: PretrainRecipe):
    import torch

    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=cfg.betas, eps=1e-8)


def _schedule(optimizer, cfg: PretrainRecipe):
    import torch

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class TokenRows:
    """Packed sequences read from disk as they are used (the datasets' Arrow files, memory-mapped), so
    a corpus larger than memory trains: only the rows of the current batches are in memory."""

    def __init__(self, dataset):
        self.data = dataset.with_format("numpy", columns=["input_ids"])
        self.max_token, self.seq_len = self._scan()

    def _scan(self) -> tuple[int, int]:
        """One pass over the rows, a block at a time: every row of one length; the largest token id."""
        top, length = -1, None
        for block in self.data.iter(batch_size=4096):
            ids = block["input_ids"]
            if ids.dtype == object or ids.ndim != 2 or length not in (None, ids.shape[1]):
                raise DistilleryError("packed datasets must hold input_ids of one length (from 'train pack')")
            top, length = max(top, int(ids.max(initial=-1))), ids.shape[1]
        if length is None:
            raise DistilleryError("the packed datasets hold no sequences")
        return top, length

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, rows) -> np.ndarray:
        return self.data[[int(r) for r in rows]]["input_ids"]


class Batches:
    """Global sequence positions in a seeded order, epoch after epoch; each process takes its slice.
    ``shuffle=False``: the rows' own order every epoch (they are already in a curriculum's)."""

    def __init__(self, tokens: TokenRows, seed: int, dist: Dist, per_device: int, shuffle: bool = True):
        self.tokens, self.seed, self.dist, self.per_device = tokens, seed, dist, per_device
        self.shuffle = shuffle
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            rows = len(self.tokens)
            order = (
                np.random.default_rng(self.seed + epoch).permutation(rows)
                if self.shuffle
                else np.arange(rows)
            )
            self._orders = {epoch: order}
        return self._orders[epoch]

    def take(self, position: int):
        """(this process's input_ids for the micro-batch at global ``position``, the next position)."""
        import torch

        size = self.per_device * self.dist.world
        indexes = [
            self._order(p // len(self.tokens))[p % len(self.tokens)] for p in range(position, position + size)
        ]
        mine = indexes[self.dist.rank * self.per_device : (self.dist.rank + 1) * self.per_device]
        return torch.from_numpy(self.tokens[mine].astype(np.int64)), position + size


def train_pretrain(cfg: PretrainRecipe, store: Store) -> Manifest | None:
    import torch

    manifests = resolve_datasets(cfg.datasets, store, ["id", "input_ids"], "pretraining", cfg.curriculum)
    dist = setup()
    try:
        return _train(cfg, store, manifests, dist, torch)
    finally:
        teardown(dist)


def _train(
    cfg: PretrainRecipe, store: Store, manifests: list[Manifest], dist: Dist, torch
) -> Manifest | None:
    # What only reports (evaluation, MFU) may change between a kill and --resume.
    training = {
        k: v
        for k, v in cfg.content_recipe().items()
        if k not in ("eval_every", "eval_batches", "peak_tflops")
    }
    plan = hashlib.sha256(canonical_json(training).encode()).hexdigest()[:16]
    work = store.name_dir("run", cfg.name) / f".work-{plan}"
    if dist.main and not cfg.resume:
        shutil.rmtree(work, ignore_errors=True)
    # The data as Arrow files, memory-mapped (kept for a resume, removed once published): the first
    # process clears a fresh run's folder and writes them while the others wait, then they all read them.
    arrow = work / "arrow"
    if not dist.main:
        torch.distributed.barrier()
    tokens = TokenRows(load_mixture(cfg.datasets, manifests, ["input_ids"], cfg.seed, cache_dir=arrow,
                                    curriculum=cfg.curriculum))  # fmt: skip
    seq_len = tokens.seq_len
    if cfg.per_device_batch_size * dist.world > len(tokens):
        raise DistilleryError(
            f"a batch of {cfg.per_device_batch_size * dist.world} sequences is larger than the data ({len(tokens)} "
            "sequences); lower per_device_batch_size"
        )
    held_out = [m for m in manifests if "validation" in m.splits()]
    validation = [DatasetInput(ref=m.id, split="validation") for m in held_out]
    eval_tokens = (
        TokenRows(load_mixture(validation, held_out, ["input_ids"], cfg.seed, cache_dir=arrow))
        if validation
        else None
    )
    if dist.main and dist.world > 1:
        torch.distributed.barrier()
    model, tokenizer, source = _build_model(cfg, store, seq_len)
    _check_tokens(cfg, manifests, source, tokens, model.config.vocab_size)
    model.to(dist.device)
    if cfg.precision == "fp16" and not dist.device.startswith("cuda"):
        raise DistilleryError("precision fp16 needs a GPU; use bf16 (or fp32) on this machine")
    wrapped, sharded = model, dist.world > 1 and cfg.strategy == "fsdp"
    zero = None
    if dist.world > 1 and zero_stage(cfg.strategy) is not None:
        from train.zero import ZeroEngine

        optimizer = _optimizer(model, cfg)
        scheduler = _schedule(optimizer, cfg)
        zero = ZeroEngine(model, optimizer, scheduler, stage=zero_stage(cfg.strategy), per_device=cfg.per_device_batch_size,
                          accumulation=cfg.gradient_accumulation_steps, max_grad_norm=cfg.max_grad_norm,
                          precision=cfg.precision, processes=dist.world)  # fmt: skip
        wrapped = zero.engine
    elif sharded:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    elif dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [dist.local_rank] if dist.device.startswith("cuda") else None
        wrapped = DistributedDataParallel(model, device_ids=device_ids)
    if zero is None:  # (after FSDP2, whose sharded parameters the optimizer must hold)
        optimizer = _optimizer(model, cfg)
        scheduler = _schedule(optimizer, cfg)

    def restore(path: Path) -> dict[str, Any]:
        return zero.load(path) if zero else checkpoint.load(path, model, optimizer, scheduler, sharded)

    state: dict[str, Any] = {"position": 0, "tokens": 0, "skip": [], "losses": [], "triggers": []}
    resumed = checkpoint.latest(work) if cfg.resume else None
    if resumed is not None:
        state = restore(resumed)
    if dist.main:
        claim_work_folder(work)
        _forget_after(work, None if resumed is None else int(state["step"]))
    parameters = sum(p.numel() for p in model.parameters())
    flops = flops_per_token(parameters, model.config.num_hidden_layers, model.config.hidden_size, seq_len)
    device_name = torch.cuda.get_device_name(dist.local_rank) if dist.device.startswith("cuda") else "cpu"
    peak = peak_flops(device_name, cfg.peak_tflops * 1e12 if cfg.peak_tflops else None)
    monitor = Monitor(work if dist.main else None, cfg.guard, flops, peak * dist.world if peak else None)
    monitor.triggers = list(state["triggers"])
    monitor.resume_at(state["tokens"])
    for loss in state["losses"][-cfg.guard.window :]:
        monitor.good(loss)
    batches = Batches(tokens, cfg.seed, dist, cfg.per_device_batch_size, shuffle=cfg.curriculum is None)
    fault = int(os.environ.get(FAULT_NAN, "-1"))
    autocast = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
    autocast = None if zero is not None else autocast  # DeepSpeed casts the model itself
    device_type = "cuda" if dist.device.startswith("cuda") else "cpu"
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" and zero is None else None
    step, started = int(state.get("step", 0)), time.time()
    micro_size = cfg.per_device_batch_size * dist.world
    model.train()
    if dist.main:
        monitor.start_progress(cfg.max_steps, step)
    try:
        while step < cfg.max_steps:
            step_started = time.perf_counter()
            if zero is None:  # (DeepSpeed's engine clears its gradients after each step itself)
                wrapped.zero_grad(set_to_none=True)
            total, positions = 0.0, []
            for micro in range(cfg.gradient_accumulation_steps):
                position = state["position"]
                while position in state["skip"]:
                    position += micro_size
                ids, state["position"] = batches.take(position)
                positions.append(position)
                ids = ids.to(dist.device)
                poison = position <= fault < position + micro_size
                if zero is not None:  # the engine steps after the last micro-batch
                    total += zero.micro_step(ids, poison)
                    continue
                sync = micro == cfg.gradient_accumulation_steps - 1 or dist.world == 1
                if sharded:  # FSDP reduces gradients on the last micro-batch only
                    model.set_requires_gradient_sync(sync)
                context = wrapped.no_sync() if not sync and not sharded else contextlib.nullcontext()
                with context, torch.autocast(device_type, dtype=autocast, enabled=autocast is not None):
                    loss = wrapped(input_ids=ids, labels=ids).loss / cfg.gradient_accumulation_steps
                    if poison:
                        loss = loss * float("nan")
                (scaler.scale(loss) if scaler else loss).backward()
                total += float(loss.detach())
            if zero is not None:
                grad_norm = zero.grad_norm()  # of the step just applied
            else:
                if scaler:
                    scaler.unscale_(optimizer)
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                grad_norm = float(
                    norm.full_tensor() if hasattr(norm, "full_tensor") else norm
                )  # DTensor: FSDP
            total = _mean_over_processes(total, dist, torch)
            reason = monitor.check(step, total, grad_norm)
            if reason is not None:
                _on_trigger(
                    cfg, monitor, step, reason, total, grad_norm, positions, state, work, optimizer, restore
                )
                if cfg.guard.action == "rollback":
                    step = int(state["step"])
                continue
            if zero is None:
                (scaler.step(optimizer), scaler.update()) if scaler else optimizer.step()
                scheduler.step()
            step += 1
            state["tokens"] += micro_size * cfg.gradient_accumulation_steps * seq_len
            monitor.good(total)
            state["losses"].append(total)
            seconds = time.perf_counter() - step_started  # the step's own time (not evaluation or saving)
            record: dict[str, Any] = {"loss": total, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm}
            if eval_tokens is not None and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                record["eval_loss"] = _evaluate(wrapped, eval_tokens, cfg, dist, torch, device_type, autocast)
                state["eval_loss"] = record["eval_loss"]
            if dist.main:
                monitor.log(step, state["tokens"], seconds=seconds, **record)
            if step % cfg.save_every == 0 or step == cfg.max_steps:
                state["triggers"] = monitor.triggers
                if zero is not None:
                    zero.save(work, step, state, dist.main)
                else:
                    checkpoint.save(
                        work, step, model, optimizer, scheduler, state, sharded=sharded, write=dist.main
                    )
                if dist.world > 1:
                    torch.distributed.barrier()
                if os.environ.get(FAULT_EXIT) == str(step):
                    os._exit(137)
    finally:
        monitor.close()
    weights = checkpoint.full_states(model, optimizer, sharded)[0] if sharded else None  # collective
    if zero is not None and dist.main:  # the last step was saved: its partitions, gathered
        weights = zero.full_weights(checkpoint.latest(work))
    if weights is not None and model.config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)  # gathered as a copy; tied again when the model loads
    if not dist.main:
        return None
    return _publish(cfg, store, manifests, source, model, tokenizer, work, state, monitor, parameters, started,
                    weights, dist.world)  # fmt: skip


def _forget_after(work: Path, step: int | None) -> None:
    """What a killed run wrote after the checkpoint it resumes from (``step``), or, with nothing to
    resume from, everything but the data's Arrow files: the steps are trained again."""
    metrics = work / "metrics.jsonl"
    if step is None:
        for path in work.iterdir():
            if path.name != "arrow" and not path.name.startswith(OWNER_PREFIX):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    elif metrics.is_file():
        kept = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= step]
        metrics.write_text("".join(line + "\n" for line in kept))


def _check_tokens(cfg: PretrainRecipe, manifests: list[Manifest], source: Manifest, tokens: TokenRows,
                  vocab: int) -> None:  # fmt: skip
    """Data packed with another tokenizer than the model's would train on nonsense: refuse it."""
    if cfg.tokenizer is not None:
        for m in manifests:
            packed_with = m.producer.recipe.get("tokenizer") if m.producer.stage == "train.pack" else None
            if packed_with and packed_with != source.id:
                raise DistilleryError(
                    f"dataset {m.ref} was packed with tokenizer run {packed_with[:12]}, not {source.ref}; "
                    "pretrain with the tokenizer the data was packed with"
                )
    top = tokens.max_token
    if top >= vocab:
        raise DistilleryError(
            f"the packed data holds token id {top}, beyond the model's vocabulary of {vocab}"
        )


def _mean_over_processes(value: float, dist: Dist, torch) -> float:
    if dist.world == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=dist.device)
    torch.distributed.all_reduce(tensor)
    return float(tensor[0]) / dist.world


def _on_trigger(
    cfg, monitor, step, reason, loss, grad_norm, positions, state, work, optimizer, restore
) -> None:
    """Apply the guard's action to the step that went wrong (recorded in every case)."""
    action = cfg.guard.action
    if len(monitor.triggers) >= cfg.guard.max_triggers:
        action = "stop"
    monitor.trigger(step, reason, loss, grad_norm, action, positions=positions)
    state["triggers"] = monitor.triggers
    optimizer.zero_grad(set_to_none=True)
    if action == "stop":
        raise RunFailed(
            f"{cfg.name}: {reason.replace('_', ' ')} at step {step} (loss {loss}, grad norm {grad_norm}); stopped as "
            f"guard.action says -- the checkpoints are in {work}; 'guard: {{action: rollback}}' would skip the data"
        )
    if action == "skip":
        return
    last = checkpoint.latest(work)
    skip = sorted(set(state["skip"]) | set(positions))
    triggers = monitor.triggers
    if last is None:  # nothing saved yet: back to the start, minus the offending data
        raise RunFailed(
            f"{cfg.name}: {reason.replace('_', ' ')} at step {step} before the first checkpoint; lower save_every "
            "or use 'guard: {action: skip}'"
        )
    restored = restore(last)
    state.clear()
    state.update(restored | {"skip": skip, "triggers": triggers})
    monitor.recent.clear()
    for value in state["losses"][-cfg.guard.window :]:
        monitor.good(value)


def _evaluate(
    model, tokens: TokenRows, cfg: PretrainRecipe, dist: Dist, torch, device_type: str, autocast
) -> float:
    model.eval()
    losses = []
    with torch.no_grad():
        for b in range(cfg.eval_batches):
            rows = [(b * cfg.per_device_batch_size * dist.world + dist.rank * cfg.per_device_batch_size + i) % len(tokens)
                    for i in range(cfg.per_device_batch_size)]  # fmt: skip
            ids = torch.from_numpy(tokens[rows].astype(np.int64)).to(dist.device)
            with torch.autocast(device_type, dtype=autocast, enabled=autocast is not None):
                losses.append(float(model(input_ids=ids, labels=ids).loss))
    model.train()
    return _mean_over_processes(float(np.mean(losses)), dist, torch)


def _publish(cfg, store, manifests, source, model, tokenizer, work, state, monitor, parameters, started,
             weights, processes) -> Manifest:  # fmt: skip
    recipe = cfg.content_recipe() | {"datasets": pinned(cfg.datasets, manifests)}
    role = "base_model" if cfg.model is not None else "tokenizer"
    parents = [*manifests, source]
    with Publisher(store, kind="run", name=cfg.name, stage="train.pretrain", recipe=recipe, parents=parents,
                   parent_roles={source.id: role}, seed=cfg.seed, execution={"resume": cfg.resume}) as pub:  # fmt: skip
        model.save_pretrained(pub.dir / CHECKPOINT_DIR, state_dict=weights)  # weights: gathered FSDP shards
        tokenizer.save_pretrained(pub.dir / CHECKPOINT_DIR)
        shutil.copy(work / "metrics.jsonl", pub.dir / "metrics.jsonl")
        losses = state["losses"]
        stats = {
            "method": "pretrain", "steps": len(losses), "parameters": parameters, "tokens": state["tokens"],
            "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
            "eval_loss": state.get("eval_loss"), "guard_triggers": monitor.triggers,
            "skipped_positions": state["skip"], "wall_s": round(time.time() - started, 2),
            "processes": processes, "strategy": cfg.strategy if processes > 1 else "single",
        }  # fmt: skip
        manifest = pub.publish(stats=stats)
    shutil.rmtree(work, ignore_errors=True)
    return manifest


def run_recipe(data: dict[str, Any], store: Store, source: str) -> Manifest | None:
    return train_pretrain(parse_config(PretrainRecipe, data, source), store)
