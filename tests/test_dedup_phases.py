"""MinHash dedup at build scale: phases on the executor, many buckets, resume after a kill in any phase."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from manifests.data import read_table
from manifests.store import Store

from .conftest import ROOT, write_jsonl, write_recipe

SMALL = "import corpus.minhash_phases as m; m.BUCKET_ENTRIES = 64; m.VERIFY_TASK_PAIRS = 3"


def _corpus(tmp_path: Path) -> tuple[Path, list[str]]:
    """40 documents: 12 originals, each with 1-3 edited copies spread over the file, plus singles."""
    texts = [
        json.loads(line)["text"] for line in (ROOT / "examples/sample/web.jsonl").read_text().splitlines()
    ]
    texts = [t for t in texts if len(t.split()) > 60]
    originals, singles = texts[:12], texts[12:22]
    rows = list(originals) + singles
    for i, text in enumerate(originals):
        for k in range(1 + i % 3):
            rows.append(text.replace(" the ", " a ", 1 + k) + f" Edited {k}.")
    return write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in rows]), originals + singles


def _recipe(tmp_path: Path, source: Path, workers: int) -> Path:
    return write_recipe(
        tmp_path / f"r{workers}.yaml",
        f"stage: corpus.build\nname: n\ninputs: [{{path: {source}}}]\nsplit_bytes: 4096\nworkers: {workers}\n"
        "shard_rows: 7\ndedup: {exact: true, minhash: {threshold: 0.7, keep: longest}}\n",
    )


def _small(monkeypatch) -> None:
    import corpus.minhash_phases as phases

    monkeypatch.setattr(phases, "BUCKET_ENTRIES", 64)
    monkeypatch.setattr(phases, "VERIFY_TASK_PAIRS", 3)


def _fingerprint(m) -> list[tuple[str, str]]:
    return [(f.path, f.sha256) for f in m.files + m.ledger]


def test_clusters_do_not_depend_on_buckets_blocks_or_workers(cli, tmp_path, monkeypatch):
    source, kept = _corpus(tmp_path)
    one = Store(tmp_path / "one")
    assert cli("--store", one.root, "corpus", "build", _recipe(tmp_path, source, 1)).code == 0
    _small(monkeypatch)
    many = Store(tmp_path / "many")
    result = cli("--store", many.root, "corpus", "build", _recipe(tmp_path, source, 2))
    assert result.code == 0, result.err
    a, b = one.resolve("n"), many.resolve("n")
    assert a.id == b.id and _fingerprint(a) == _fingerprint(b)
    rows = read_table(b).to_pylist()
    # keep: longest -- every edited copy is one word longer (" Edited k."), so a copy is kept per cluster
    assert len(rows) == len(set(kept)) and all(0 < f.rows <= 7 for f in b.files) and len(b.files) > 1
    ledger = pq.read_table(b.location / "ledger" / "corpus.build.minhash_dedup.parquet").to_pylist()
    by_id = {r["id"]: r["text"] for r in rows}
    for entry in ledger:
        assert json.loads(entry["detail"])["duplicate_of"] in by_id and entry["score"] >= 0.7


@pytest.mark.parametrize("phase", ["minhash map:2", "minhash reduce:2", "minhash verify:2", "filter:2"])
def test_a_build_killed_in_any_phase_resumes_without_redoing_finished_tasks(
    cli, tmp_path, monkeypatch, phase
):
    source, kept = _corpus(tmp_path)
    store = Store(tmp_path / "store")
    recipe = _recipe(tmp_path, source, 1)
    command = f"{SMALL}; import sys; from manifests.cli import main; sys.exit(main(sys.argv[1:]))"
    killed = subprocess.run(
        [sys.executable, "-c", command, "--store", str(store.root), "corpus", "build", str(recipe)],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "DISTILLERY_FAULT_EXIT_AFTER_TASKS": phase},
    )  # fmt: skip
    assert killed.returncode == 137, killed.stderr
    assert store.list() == []

    import corpus.combine
    import corpus.minhash_phases

    _small(monkeypatch)
    label, _, _ = phase.rpartition(":")
    module, name = {
        "minhash map": (corpus.minhash_phases, "map_task"),
        "minhash reduce": (corpus.minhash_phases, "reduce_task"),
        "minhash verify": (corpus.minhash_phases, "verify_task"),
        "filter": (corpus.combine, "filter_task"),
    }[label]
    calls = []
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a: calls.append(a) or original(*a))
    result = cli("--store", store.root, "corpus", "build", recipe)
    assert result.code == 0, result.err
    resumed = store.resolve("n")
    rows = read_table(resumed).to_pylist()
    assert len(rows) == len({r["id"] for r in rows}) == len(set(kept))

    fresh = Store(tmp_path / "fresh")
    calls_before = len(calls)
    assert cli("--store", fresh.root, "corpus", "build", recipe).code == 0
    total = len(calls) - calls_before
    assert calls_before == total - 2, f"{label}: {calls_before} of {total} tasks redone after 2 were finished"
    assert fresh.resolve("n").id == resumed.id


def test_near_duplicates_of_an_index_found_the_same_by_verify_tasks_in_workers(cli, tmp_path, monkeypatch):
    """The texts of indexed documents reach verify tasks in worker processes through the reader the
    build hands them (the index's texts live in the indexed dataset, not in the task files)."""
    source, kept = _corpus(tmp_path)
    store = Store(tmp_path / "store")
    old = write_jsonl(tmp_path / "old.jsonl", [{"text": t} for t in kept[:6]])
    write_recipe(tmp_path / "old.yaml", f"stage: corpus.build\nname: old\ninputs: [{{path: {old}}}]\n")
    assert cli("--store", store.root, "corpus", "build", tmp_path / "old.yaml").code == 0
    result = cli(
        "--store", store.root, "corpus", "dedup-index", "old", "--name", "idx", "--minhash-threshold", "0.7"
    )
    assert result.code == 0, result.err
    built = {}
    for workers in (1, 2):
        if workers == 2:
            _small(monkeypatch)  # many buckets and verify tasks, run in spawned workers
        recipe = write_recipe(
            tmp_path / f"i{workers}.yaml",
            _recipe(tmp_path, source, workers).read_text().replace("name: n", f"name: n{workers}")
            .replace("keep: longest}", "keep: longest}, against: [idx]"),
        )  # fmt: skip
        result = cli("--store", store.root, "corpus", "build", recipe)
        assert result.code == 0, result.err
        built[workers] = store.resolve(f"n{workers}")
    assert _fingerprint(built[1]) == _fingerprint(built[2])
    ledger = pq.read_table(built[2].location / "ledger" / "corpus.build.minhash_dedup.parquet").to_pylist()
    of_index = [json.loads(e["detail"]) for e in ledger if "index" in json.loads(e["detail"])]
    assert of_index and all(d["index"].startswith("idx@") for d in of_index)
    assert {r["text"] for r in read_table(built[2]).to_pylist()}.isdisjoint(kept[:6])
