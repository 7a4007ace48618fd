"""Memory of pretraining as the packed corpus grows: the rows are read from disk as they are used.

Publishes a packed dataset of N and 10×N random sequences (``seq_len`` tokens each) and a word-level
tokenizer, pretrains a tiny model for a few steps on each in a fresh process, and samples that
process's memory: its private (anonymous) memory, which is what the data would take if it were
held, and its resident size, which also counts the pages of the memory-mapped Arrow files the
kernel currently keeps (reclaimable). It prints both peaks and what holding the tokens in memory
would take.

    .venv/bin/python benchmarks/train/pretrain_memory.py [--rows 20000] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def publish_inputs(store_root: Path, rows: int, seq_len: int, vocab: int = 1000) -> None:
    import numpy as np
    import pyarrow as pa
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from manifests.models import CHECKPOINT_DIR
    from manifests.publish import Publisher
    from manifests.store import Store

    store = Store(store_root)
    words = {f"w{i}": i for i in range(vocab)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="w0")),
                                        pad_token="w0", eos_token="w1", unk_token="w0")  # fmt: skip
    with Publisher(store, kind="run", name="tok", stage="bench", recipe={"vocab": vocab}) as pub:
        tokenizer.save_pretrained(pub.dir / CHECKPOINT_DIR)
        pub.publish(stats={})
    rng = np.random.default_rng(0)
    with Publisher(store, kind="dataset", name="packed", stage="bench", recipe={"rows": rows}) as pub:
        block = 20_000
        for start in range(0, rows, block):
            n = min(block, rows - start)
            ids = rng.integers(0, vocab, size=(n, seq_len), dtype=np.int32)
            column = pa.FixedSizeListArray.from_arrays(pa.array(ids.ravel()), seq_len).cast(
                pa.list_(pa.int32())
            )
            pub.write_table(pa.table({"id": [f"s{start + i}" for i in range(n)], "input_ids": column}))
        pub.publish(stats={})


def sample_memory(pid: int, peaks: dict[str, int], done: threading.Event) -> None:
    while not done.is_set():
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return
        for line in status.splitlines():
            key = line.split(":")[0]
            if key in ("RssAnon", "VmRSS"):
                peaks[key] = max(peaks.get(key, 0), int(line.split()[1]))
        time.sleep(0.05)


def pretrain(store_root: Path, recipe: Path) -> tuple[dict[str, int], float]:
    command = [sys.executable, "-m", "manifests.cli", "--store", str(store_root), "train", "run", str(recipe)]
    started = time.time()
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    peaks: dict[str, int] = {}
    done = threading.Event()
    watcher = threading.Thread(target=sample_memory, args=(process.pid, peaks, done))
    watcher.start()
    _, err = process.communicate()
    done.set()
    watcher.join()
    if process.returncode:
        raise SystemExit(f"pretraining failed: {err[-2000:]}")
    return peaks, time.time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    results = []
    for rows in (args.rows, args.rows * 10):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "store"
            publish_inputs(root, rows, args.seq_len)
            recipe = Path(tmp) / "pretrain.yaml"
            recipe.write_text("stage: train\nmethod: pretrain\nname: lm\ndatasets: [{ref: packed}]\ntokenizer: tok\n"
                              "shape: {hidden_size: 64, layers: 2, heads: 2}\nmax_steps: 5\nper_device_batch_size: 8\n"
                              "save_every: 5\n")  # fmt: skip
            peaks, seconds = pretrain(root, recipe)
            held = rows * args.seq_len * 8 / 2**20  # int64 rows, as an in-memory array would hold them
            results.append((rows, peaks, seconds, held))
            print(f"{rows:>9,} sequences ({rows * args.seq_len / 1e6:,.1f} M tokens): private peak "
                  f"{peaks['RssAnon'] / 1024:,.0f} MiB, resident peak {peaks['VmRSS'] / 1024:,.0f} MiB "
                  f"(tokens held in memory would be {held:,.0f} MiB), {seconds:.1f} s")  # fmt: skip
    (_, a, _, _), (_, b, _, _) = results
    print(
        f"10x the data: private peak x{b['RssAnon'] / a['RssAnon']:.2f}, resident peak x{b['VmRSS'] / a['VmRSS']:.2f}"
    )


if __name__ == "__main__":
    main()
