"""Watching a training run: ``metrics.jsonl``, TensorBoard when installed, and guard rails.

Every optimizer step appends one line to ``metrics.jsonl``::

    {"step": 12, "loss": 3.41, "lr": 0.00028, "grad_norm": 0.93, "tokens": 49152, "tokens_per_s": 5120.4,
     "mfu": 0.41, "elapsed_s": 9.6}

(``eval_loss`` on evaluation steps; ``mfu`` only where the hardware's peak is known.)

The guards look at each step before the optimizer applies it: a NaN or infinite loss or gradient
norm, or a loss spike -- a robust z-score (median and MAD over the last ``window`` good steps, so
one earlier spike does not hide the next) above ``spike_zscore``. The recipe chooses what a trigger
does: ``skip`` the batch (no update), ``rollback`` to the last good checkpoint and skip the data
that caused it, or ``stop`` with a clear message. Every trigger is kept and goes into the run's
manifest.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from manifests.errors import RunFailed
from manifests.recipes import RecipeConfig


class GuardConfig(RecipeConfig):
    """What counts as a run going wrong, and what to do then."""

    action: Literal["skip", "rollback", "stop"] = "stop"
    """``skip`` the batch, ``rollback`` to the last good checkpoint and skip its data, or ``stop``."""
    spike_zscore: float | None = Field(default=6.0, gt=0)
    """A loss this many robust standard deviations above the recent median is a spike (None: off)."""
    window: int = Field(default=50, ge=5)
    """Good steps the spike test looks back on."""
    min_history: int = Field(default=10, ge=3)
    """Good steps needed before spikes are looked for."""
    max_triggers: int = Field(default=10, ge=1)
    """More triggers than this stop the run whatever the action (it is not recovering)."""


# Peak dense bf16 throughput (FLOP/s) of accelerators by name, for MFU; CPUs vary too much to list.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}


def peak_flops(device_name: str, configured: float | None = None) -> float | None:
    if configured:
        return configured
    return next((v for k, v in PEAK_FLOPS.items() if k in device_name.upper()), None)


def flops_per_token(parameters: int, layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 per parameter plus attention (PaLM appendix B)."""
    return 6 * parameters + 12 * layers * hidden * seq_len


class Monitor:
    """Writes metrics (rank 0 only) and checks each step against the guards. ``peak`` is the job's
    peak FLOP/s (one device's times the processes), for MFU; None where unknown."""

    def __init__(self, folder: Path | None, guard: GuardConfig, flops_token: float, peak: float | None):
        self.path = folder / "metrics.jsonl" if folder else None
        self.guard = guard
        self.flops_token, self.peak = flops_token, peak
        self.recent: deque[float] = deque(maxlen=guard.window)
        self.triggers: list[dict[str, Any]] = []
        self.started = time.time()
        self._last = (time.perf_counter(), 0)
        self._board = None
        self._progress = None
        if folder is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._board = SummaryWriter(str(folder / "tensorboard"))
            except ImportError:  # TensorBoard is optional
                pass

    def start_progress(self, total: int, done: int) -> None:
        """A rich progress line: steps, loss, learning rate, tokens/s, time left."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        from manifests.console import make_console

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=make_console(),
                                  transient=True)  # fmt: skip
        self._progress.start()
        self._bar = self._progress.add_task("train", total=total, completed=done, info="")

    def check(self, step: int, loss: float, grad_norm: float) -> str | None:
        """The reason this step must not be applied (``nan_loss``, ``nan_grad``, ``loss_spike``), or None."""
        if not math.isfinite(loss):
            return "nan_loss"
        if not math.isfinite(grad_norm):
            return "nan_grad"
        if self.guard.spike_zscore is not None and len(self.recent) >= self.guard.min_history:
            history = np.array(self.recent)
            median = float(np.median(history))
            mad = float(np.median(np.abs(history - median))) or 1e-8
            if 0.6745 * (loss - median) / mad > self.guard.spike_zscore:
                return "loss_spike"
        return None

    def good(self, loss: float) -> None:
        self.recent.append(loss)

    def trigger(
        self, step: int, reason: str, loss: float, grad_norm: float, action: str, **detail: Any
    ) -> None:
        record = {"step": step, "reason": reason, "loss": _number(loss), "grad_norm": _number(grad_norm),
                  "action": action} | detail  # fmt: skip
        self.triggers.append(record)
        self._write({"step": step, "guard": record})

    def resume_at(self, tokens_total: int) -> None:
        """The run continues a checkpoint that had seen ``tokens_total`` tokens."""
        self._last = (time.perf_counter(), tokens_total)

    def log(
        self, step: int, tokens_total: int, seconds: float | None = None, **values: float
    ) -> dict[str, Any]:
        """Write one step's record; tokens/s over ``seconds`` (the step's own time) when given, else
        since the previous record."""
        now = time.perf_counter()
        then, tokens_then = self._last
        self._last = (now, tokens_total)
        rate = (tokens_total - tokens_then) / max(seconds if seconds is not None else now - then, 1e-9)
        record: dict[str, Any] = {"step": step, **{k: _number(v) for k, v in values.items()},
                                  "tokens": tokens_total, "tokens_per_s": round(rate, 1)}  # fmt: skip
        if self.peak:
            record["mfu"] = round(rate * self.flops_token / self.peak, 4)
        record["elapsed_s"] = round(time.time() - self.started, 3)
        self._write(record)
        if self._progress is not None:
            info = f"loss {record.get('loss')}  lr {values.get('lr', 0):.2e}  {rate:.0f} tok/s"
            self._progress.update(self._bar, completed=step, info=info)
        if self._board is not None:
            for key, value in record.items():
                if isinstance(value, int | float) and key != "step":
                    self._board.add_scalar(key, value, step)
        return record

    def _write(self, record: dict[str, Any]) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._board is not None:
            self._board.close()


def _number(value: float) -> float | str:
    """JSON has no NaN: non-finite values are written as strings."""
    value = float(value)
    return round(value, 6) if math.isfinite(value) else str(value)


def guard_stopped(run: str, trigger: dict[str, Any]) -> RunFailed:
    """The error a Trainer-based run ends with when a guard stopped it (``trainer_guard``'s ``stopped``)."""
    return RunFailed(
        f"{run}: {trigger['reason'].replace('_', ' ')} at step {trigger['step']} (loss {trigger['loss']}, grad "
        f"norm {trigger['grad_norm']}); stopped as guard.action says -- 'guard: {{action: skip}}' drops such steps"
    )


def trainer_guard(monitor: Monitor):
    """The guards as a ``transformers`` callback, for methods run by TRL's trainers.

    A non-finite gradient norm is caught before the optimizer step: ``skip`` drops the step's
    gradients (the optimizer leaves parameters without one untouched), ``stop`` ends training. A loss
    spike (or a NaN loss) is only seen in the step's log, after it was applied: it is recorded, and
    ``stop`` ends training. ``rollback`` needs the project's own loop (``method: pretrain``).
    After ``trainer.train()``, ``callback.stopped`` holds the trigger that stopped it, if any.
    """
    import torch
    from transformers import TrainerCallback

    class GuardCallback(TrainerCallback):
        stopped: dict[str, Any] | None = None

        def _act(self, state, control, reason: str, loss: float, grad_norm: float) -> bool:
            action = "stop" if len(monitor.triggers) >= monitor.guard.max_triggers else monitor.guard.action
            monitor.trigger(state.global_step, reason, loss, grad_norm, action)
            if action == "stop":
                self.stopped = monitor.triggers[-1]
                control.should_training_stop = True
            return action == "skip"

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            if not grads:
                return control
            norm = float(
                torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            )
            if not math.isfinite(norm) and self._act(state, control, "nan_grad", float("nan"), norm):
                for p in model.parameters():
                    p.grad = None
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return control
            loss, grad_norm = float(logs["loss"]), float(logs.get("grad_norm", 0.0) or 0.0)
            reason = monitor.check(state.global_step, loss, grad_norm)
            if reason == "nan_grad":  # handled before the step
                return control
            if reason is None:
                monitor.good(loss)
            else:
                self._act(state, control, reason, loss, grad_norm)
            return control

    return GuardCallback()
