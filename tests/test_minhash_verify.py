"""The verify phase of the phased MinHash: tasks sized for the workers, each text read and shingled once."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import corpus.minhash_phases as phases
from corpus.minhash import MinHashConfig, band_keys, shingle_sets

ROOT = Path(__file__).resolve().parent.parent
CFG = MinHashConfig(threshold=0.7, keep="longest")


class ListTexts:
    """A dedup index's texts by position, as ``Part.index_texts`` (counting its calls)."""

    def __init__(self, texts: list[str]):
        self.texts, self.calls = texts, 0

    def __call__(self, rows: np.ndarray) -> list[str]:
        self.calls += 1
        return [self.texts[i] for i in rows]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """Originals of the sample with 1-3 edited copies each, shuffled, plus unrelated documents."""
    docs = [
        json.loads(line)["text"] for line in (ROOT / "examples/sample/web.jsonl").read_text().splitlines()
    ]
    docs = [t for t in docs if len(t.split()) > 60]
    rng = random.Random(5)
    rows = docs[:30]
    for i, text in enumerate(docs[:14]):
        for k in range(1 + i % 3):
            words = text.split()
            for _ in range(k + 1):
                words[rng.randrange(len(words))] = f"edit{rng.randrange(1000)}"
            rows.append(" ".join(words) + " copy" * (k + 1))
    rng.shuffle(rows)
    return rows


def _parts(texts: list[str], folder: Path, index: ListTexts | None = None) -> list[phases.Part]:
    """Task files of 7 documents (row groups of 3) with their band keys; the first ``index`` documents,
    if given, as a dedup index: band keys in their own file, texts only through ``index``."""
    parts, first = [], 0
    if index is not None:
        path = folder / "index-keys.parquet"
        pq.write_table(pa.table({"band_keys": band_keys(index.texts, CFG)}), path)
        parts.append(phases.Part(0, len(index.texts), str(path), "band_keys", index))
        first = len(index.texts)
    for k, lo in enumerate(range(first, len(texts), 7)):
        chunk = pa.table({"text": texts[lo : lo + 7]})
        chunk = chunk.append_column("keys", band_keys(chunk.column("text"), CFG))
        path = folder / f"task-{k:05d}.parquet"
        pq.write_table(chunk, path, row_group_size=3)
        parts.append(phases.Part(lo, chunk.num_rows, str(path), "keys"))
    return parts


def in_process(label, fn, jobs):
    return [fn(*job) for job in jobs]


@pytest.fixture
def small(monkeypatch):
    """Many buckets and verify tasks of a few pairs, and as many tasks as workers even for few pairs."""
    monkeypatch.setattr(phases, "BUCKET_ENTRIES", 64)
    monkeypatch.setattr(phases, "VERIFY_TASK_PAIRS", 5)
    monkeypatch.setattr(phases, "VERIFY_MIN_TASK_PAIRS", 1)
    monkeypatch.setattr(phases, "PAIRS_AT_ONCE", 3)


def _folder(work: Path) -> Path:
    (folder,) = work.glob("minhash-*")
    return folder


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    a, b = set(a.tolist()), set(b.tolist())
    return len(a & b) / len(a | b)


def test_verified_similarities_equal_a_direct_computation(texts, tmp_path, small):
    parts = _parts(texts, tmp_path)
    removed, kept, similarity = phases.near_duplicates(
        parts, np.zeros(0, np.int64), CFG, tmp_path / "w", in_process
    )
    folder = _folder(tmp_path / "w")
    outs = sorted(folder.glob("verify-*-of-*.npy"))
    codes = np.load(folder / "verify-pairs.npy")  # the candidate pairs in the order the tasks took them
    assert np.array_equal(np.sort(codes), np.load(folder / "candidates.npy"))
    assert len(outs) == -(-len(codes) // 5) > 2 and len(parts) > 3
    sets = shingle_sets(texts, CFG)
    span = len(texts)
    u, v = codes // span, codes % span
    assert len({p.path for p in parts for r in (*u, *v) if p.first_row <= r < p.first_row + p.rows}) > 3
    verified = np.concatenate([np.load(f) for f in outs])
    assert verified.tolist() == [_jaccard(sets[a], sets[b]) for a, b in zip(u, v, strict=True)]
    # Every removed row's similarity to its kept row, also where the two were no candidate pair (a chain).
    chained = set(zip(removed.tolist(), kept.tolist(), strict=True)) - {
        (max(a, b), min(a, b)) for a, b in zip(u.tolist(), v.tolist(), strict=True)
    } - set(zip(u.tolist(), v.tolist(), strict=True))  # fmt: skip
    assert len(removed) >= 20 and chained
    assert similarity.tolist() == [_jaccard(sets[r], sets[k]) for r, k in zip(removed, kept, strict=True)]


def test_result_does_not_depend_on_the_number_of_verify_tasks(texts, tmp_path, small, monkeypatch):
    parts = _parts(texts, tmp_path)
    monkeypatch.setattr(phases, "VERIFY_TASK_PAIRS", 10**6)
    results, task_files = {}, {}
    for workers in (1, 3):
        work = tmp_path / f"w{workers}"
        results[workers] = phases.near_duplicates(
            parts, np.zeros(0, np.int64), CFG, work, in_process, workers
        )
        task_files[workers] = sorted(f.name for f in _folder(work).glob("verify-*-of-*"))
    assert task_files == {1: ["verify-00000-of-00001.npy"],
                          3: [f"verify-0000{k}-of-00003.npy" for k in range(3)]}  # fmt: skip
    for a, b in zip(results[1], results[3], strict=True):
        assert np.array_equal(a, b)


def test_verify_tasks_for_the_workers_unless_too_few_pairs(monkeypatch):
    monkeypatch.setattr(phases, "VERIFY_TASK_PAIRS", 100)
    monkeypatch.setattr(phases, "VERIFY_MIN_TASK_PAIRS", 10)
    assert phases.verify_blocks(0, 4) == []
    assert phases.verify_blocks(15, 4) == [(0, 7), (7, 15)]  # two tasks of at least 10 would not fill 4
    assert phases.verify_blocks(80, 4) == [(0, 20), (20, 40), (40, 60), (60, 80)]
    assert phases.verify_blocks(80, 1) == [(0, 80)]
    blocks = phases.verify_blocks(1001, 2)
    assert len(blocks) == 11 and max(hi - lo for lo, hi in blocks) <= 100 and blocks[-1][1] == 1001


class Killed(Exception):
    pass


@pytest.mark.parametrize("resume_workers", [3, 1])
def test_a_killed_verify_phase_resumes_with_the_same_clusters(
    texts, tmp_path, small, monkeypatch, resume_workers
):
    parts = _parts(texts, tmp_path)
    monkeypatch.setattr(phases, "VERIFY_TASK_PAIRS", 10**6)  # as many tasks as workers
    fresh = phases.near_duplicates(parts, np.zeros(0, np.int64), CFG, tmp_path / "fresh", in_process, 3)

    def killed_after_one_verify_task(label, fn, jobs):
        if label != "minhash verify":
            return in_process(label, fn, jobs)
        fn(*jobs[0])
        raise Killed

    work = tmp_path / "w"
    with pytest.raises(Killed):
        phases.near_duplicates(parts, np.zeros(0, np.int64), CFG, work, killed_after_one_verify_task, 3)
    assert [f.name for f in _folder(work).glob("verify-*-of-*")] == ["verify-00000-of-00003.npy"]
    ran = Counter()

    def counting(label, fn, jobs):
        ran[label] += len(jobs)
        return in_process(label, fn, jobs)

    resumed = phases.near_duplicates(parts, np.zeros(0, np.int64), CFG, work, counting, resume_workers)
    # The same split reuses the finished task; another split starts over, under names of its own.
    assert dict(+ran) == {"minhash verify": 2 if resume_workers == 3 else 1}
    for a, b in zip(fresh, resumed, strict=True):
        assert np.array_equal(a, b)


def test_a_verify_task_reads_each_task_file_once(texts, tmp_path, small, monkeypatch):
    index = ListTexts(texts[:9])
    parts = _parts(texts, tmp_path, index)
    reads: list[Counter] = [Counter()]  # the last one counts the reads now
    original = phases.part_texts

    def counted(part, local):
        reads[-1][part.path] += 1
        return original(part, local)

    monkeypatch.setattr(phases, "part_texts", counted)
    verify_reads = []

    def per_task(label, fn, jobs):
        out = []
        for job in jobs:
            reads.append(Counter())
            calls = index.calls
            out.append(fn(*job))
            if label == "minhash verify":
                verify_reads.append(reads[-1])
                assert index.calls - calls == reads[-1][parts[0].path]
        reads.append(Counter())
        return out

    phases.near_duplicates(parts, np.zeros(0, np.int64), CFG, tmp_path / "w", per_task)
    assert len(verify_reads) > 2 and any(len(r) > 2 for r in verify_reads)
    assert all(max(r.values()) == 1 for r in verify_reads)
    assert any(r[parts[0].path] for r in verify_reads)  # the index's documents were verified too
    assert sum(reads[-1].values()) > 0  # the chained pairs' texts, read in the main process


def test_part_texts_reads_the_wanted_rows_of_a_task_file(texts, tmp_path):
    (part,) = _parts(texts[:7], tmp_path)
    for local in ([0], [6], [1, 2, 5], [0, 3, 4, 6], list(range(7))):
        assert phases.part_texts(part, np.array(local)).to_pylist() == [texts[i] for i in local]


def test_pairs_grouped_by_component_for_the_verify_tasks():
    u, v = np.array([0, 0, 1, 2, 3, 5]), np.array([4, 7, 6, 5, 8, 9])  # {0,4,7} {1,6} {2,5,9} {3,8}
    order = phases.by_component(u, v)
    assert order.tolist() == [0, 1, 2, 3, 5, 4]
