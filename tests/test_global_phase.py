"""The global phase of a corpus build: keys scattered into buckets once, decisions per bucket, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import corpus.combine
import corpus.key_buckets
from manifests.data import read_table
from manifests.store import Store

from .conftest import ROOT, docs, write_jsonl, write_recipe

BOILERPLATE = "Share this page with your friends today"
SMALL = "import corpus.combine as c; c.PARTITION_ROWS = 7"


def _source(tmp_path):
    """Documents with URL duplicates, exact duplicates under other URLs, and a recurring line."""
    rows = docs(300)
    for row in rows[::7]:
        row["text"] += "\n" + BOILERPLATE
    rows += docs(20)  # 20 copies: same URL (and, but for the recurring line, the same text)
    rows += [{"text": r["text"] + " again", "url": r["url"]} for r in docs(10)]  # same URL, other text
    rows += [{"text": r["text"], "url": f"https://y.example/{i}"} for i, r in enumerate(rows[100:115])]
    return write_jsonl(tmp_path / "in.jsonl", rows)


def _recipe(tmp_path, source, workers: int = 1):
    return write_recipe(
        tmp_path / f"g{workers}.yaml",
        f"stage: corpus.build\nname: g\ninputs: [{{path: {source}}}]\nsplit_bytes: 4096\nworkers: {workers}\n"
        "steps: [{type: min_words, min_words: 3}]\ndedup: {exact: true, url: true, lines: {unit: line}}\n",
    )


def _fingerprint(m) -> list[tuple[str, str]]:
    return [(f.path, f.sha256) for f in m.files + m.ledger]


def test_each_task_file_is_read_once_for_its_keys_however_many_buckets(cli, tmp_path, monkeypatch):
    source = _source(tmp_path)
    one = Store(tmp_path / "one")
    assert cli("--store", one.root, "corpus", "build", _recipe(tmp_path, source)).code == 0

    monkeypatch.setattr(corpus.combine, "PARTITION_ROWS", 7)  # ~50 buckets
    reads: Counter = Counter()
    read = corpus.key_buckets.read_key_columns
    monkeypatch.setattr(
        corpus.key_buckets,
        "read_key_columns",
        lambda path, columns: reads.update([path]) or read(path, columns),
    )
    decided = []
    decide = corpus.key_buckets.first_seen_task
    monkeypatch.setattr(corpus.key_buckets, "first_seen_task", lambda *a: decided.append(a) or decide(*a))
    many = Store(tmp_path / "many")
    result = cli("--store", many.root, "corpus", "build", _recipe(tmp_path, source))
    assert result.code == 0, result.err
    m = many.resolve("g")
    assert len(decided) > 2 * 40  # URL and exact dedup, one task per bucket
    assert len(reads) == m.stats["tasks"] > 3 and set(reads.values()) == {1}
    assert m.id == one.resolve("g").id and _fingerprint(m) == _fingerprint(one.resolve("g"))

    removed = {r["step"]: r["removed"] for r in m.stats["funnel"]}
    assert removed["url_dedup"] == {"duplicate_url": 30} and removed["exact_dedup"] == {"exact_duplicate": 15}
    exact = pq.read_table(m.location / "ledger" / "corpus.build.exact_dedup.parquet")
    assert exact.schema.names == ["id", "step", "action", "reason", "score", "detail"]
    kept = {r["id"] for r in read_table(m, columns=["id"]).to_pylist()}
    assert all(json.loads(d)["duplicate_of"] in kept for d in exact.column("detail").to_pylist())
    assert m.stats["funnel"][-1]["changed"] > 0  # the recurring line was cut out

    # In spawned workers too: the bucket counts travel with the tasks.
    monkeypatch.setattr(corpus.key_buckets, "read_key_columns", read)  # the counting wrappers do not pickle
    monkeypatch.setattr(corpus.key_buckets, "first_seen_task", decide)
    workers = Store(tmp_path / "workers")
    assert cli("--store", workers.root, "corpus", "build", _recipe(tmp_path, source, 2)).code == 0
    assert workers.resolve("g").id == m.id


@pytest.mark.parametrize("phase", ["global keys:2", "exact dedup:2"])
def test_a_build_killed_in_the_global_phase_resumes_to_the_same_dataset(cli, tmp_path, monkeypatch, phase):
    source = _source(tmp_path)
    recipe = _recipe(tmp_path, source)
    store = Store(tmp_path / "store")
    command = f"{SMALL}; import sys; from manifests.cli import main; sys.exit(main(sys.argv[1:]))"
    killed = subprocess.run(
        [sys.executable, "-c", command, "--store", str(store.root), "corpus", "build", str(recipe)],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "DISTILLERY_FAULT_EXIT_AFTER_TASKS": phase},
    )  # fmt: skip
    assert killed.returncode == 137, killed.stderr
    assert store.list() == []

    monkeypatch.setattr(corpus.combine, "PARTITION_ROWS", 7)
    label = phase.rpartition(":")[0]
    name, output = {
        "global keys": ("scatter_task", "scatter-"),
        "exact dedup": ("first_seen_task", "exact-"),
    }[label]
    calls = []
    original = getattr(corpus.key_buckets, name)
    monkeypatch.setattr(corpus.key_buckets, name, lambda *a: calls.append(Path(a[-1]).name) or original(*a))
    assert cli("--store", store.root, "corpus", "build", recipe).code == 0
    resumed = store.resolve("g")
    redone = sum(c.startswith(output) for c in calls)

    fresh = Store(tmp_path / "fresh")
    calls.clear()
    assert cli("--store", fresh.root, "corpus", "build", recipe).code == 0
    total = sum(c.startswith(output) for c in calls)
    assert redone == total - 2 > 2, f"{label}: {redone} of {total} tasks redone after 2 were finished"
    assert _fingerprint(fresh.resolve("g")) == _fingerprint(resumed) and fresh.resolve("g").id == resumed.id


def test_a_removed_decision_output_is_decided_again(tmp_path):
    """A bucket's output is the task's marker: without it, that bucket alone is decided again."""
    import numpy as np

    from corpus.executor import run_tasks

    rows = [{"_url_key": (k % 5 + 1).to_bytes(8, "big")} for k in range(40)]
    files = []
    for part in range(4):
        path = tmp_path / f"task-{part}.parquet"
        pq.write_table(pa.table({"_url_key": pa.array([r["_url_key"] for r in rows[part * 10 : part * 10 + 10]],
                                                       pa.binary(8))}), path)  # fmt: skip
        files.append(path)
    offsets = np.arange(0, 50, 10)
    runs = []

    def run(label, fn, jobs):
        runs.append((label, len(jobs)))
        return run_tasks(fn, jobs)

    def plan():
        buckets = corpus.key_buckets.KeyBuckets.plan(files, offsets, ["url"], 8, tmp_path / "work", run)
        buckets.scatter()
        return buckets.first_seen("url", "url", np.array([0, 7], np.int64))

    first = plan()
    kept = {1: 5, 2: 1, 3: 2, 4: 3, 5: 4}  # the first row of each key still kept (row 0 was removed)
    assert dict(zip(first[0].tolist(), first[1].tolist(), strict=True)) == {
        k: kept[k % 5 + 1] for k in range(40) if k not in (0, 7) and k != kept[k % 5 + 1]
    }
    outputs = sorted((tmp_path / "work").glob("keys-*/url-*.npy"))
    assert len(outputs) == 5  # 40 keys, 8 a bucket
    outputs[2].unlink()
    runs.clear()
    again = plan()
    assert runs == [("global keys", 0), ("url dedup", 1)]
    assert [a.tolist() for a in again] == [a.tolist() for a in first]


@pytest.mark.parametrize(
    "value", ["web/00017", 'a "quoted" id', "back\\slash", "tab\there", "é ü 漢字", "\x7f del", "nul\x00", ""]
)
def test_ledger_details_are_the_json_that_json_dumps_writes(value):
    assert corpus.combine.json_text(pa.array([value, "plain"])).to_pylist() == [
        json.dumps(value),
        '"plain"',
    ]
