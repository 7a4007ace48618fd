"""The files a resumed build trusts: task-done markers and phase outputs, written atomically.

Every phase of a corpus build (phase 1's tasks, the MinHash map/reduce/verify/clusters phases, the
filter phase) decides what to redo by whether a task's output exists. So each such file is written
to a temporary name, fsynced, renamed into place and its folder fsynced: a file that exists is
complete, even after a kill or a power cut, and a task without its marker is simply run again.
The marker is the last file a task writes::

    .work-<plan>/task-00003.done.json      {"index": 3, "rows_in": 1200, "rows_out": 1130, ...}
    .work-<plan>/filter/group-00001.json   {"shards": [...], "rows": 7, "ledger": null}
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np


def write_atomically(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Create ``path`` through ``write(file)`` so that it either exists complete or not at all."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    # The rename is only durable once the folder's entry is on disk.
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_marker(path: Path, result: dict[str, Any]) -> None:
    """A task's done-marker: its result as JSON, written last and atomically."""
    write_atomically(path, lambda f: f.write(json.dumps(result).encode()))


def save_array(path: Path, array: np.ndarray) -> None:
    """Write ``array`` as ``.npy``, atomically: a file that exists is complete."""
    write_atomically(path, lambda f: np.save(f, array))
