"""What a producer records about itself: code version, libraries, hardware."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

_LIBRARIES = (
    "distillery",
    "pyarrow",
    "pydantic",
    "torch",
    "transformers",
    "trl",
    "peft",
    "datasets",
    "accelerate",
    "deepspeed",
    "gguf",
)


@functools.cache
def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


@functools.cache
def git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the source tree this package runs from, or (None, None) outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None, None
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return commit.stdout.strip(), bool(status.stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        return None, None


def hardware() -> dict[str, object]:
    info: dict[str, object] = {"machine": platform.machine(), "cpus": os.cpu_count()}
    # Only ask torch when the stage already loaded it: importing it costs seconds.
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    if "WORLD_SIZE" in os.environ:  # a job of several processes (torchrun): how many, on how many nodes
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        info["processes"] = int(os.environ["WORLD_SIZE"])
        info["nodes"] = max(1, info["processes"] // max(1, local))
    return info
