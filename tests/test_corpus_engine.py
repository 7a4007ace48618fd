"""The corpus engine: tasks, workers, resume, WARC ingestion, language ID."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from manifests.data import read_table

from .conftest import ROOT, docs, write_jsonl, write_recipe

FRENCH = "Le chat dort sur le canapé pendant que la pluie tombe doucement sur les toits de la ville ce matin."


def _inputs(tmp_path):
    big = write_jsonl(tmp_path / "big.jsonl", docs(300) + docs(20))  # 20 exact duplicates
    notes = tmp_path / "notes"
    notes.mkdir()
    for i in range(7):
        (notes / f"n{i}.txt").write_text(" ".join(["word"] * 5) + f" note number {i}\n")
    return big, notes


def _recipe(tmp_path, big, notes, workers: int, name: str = "c"):
    # The documents differ only in a number ("doc17"), which MinHash's default normalisation folds
    # (every digit becomes 0): shingled as they are, they stay distinct, as these tests count on.
    return write_recipe(
        tmp_path / f"{name}-{workers}.yaml",
        f"stage: corpus.build\nname: {name}\nsplit_bytes: 4096\nworkers: {workers}\n"
        f"inputs:\n  - {{path: {big}}}\n  - {{path: {notes}, format: text}}\n"
        "steps: [{type: min_words, min_words: 3}]\n"
        "dedup: {exact: true, minhash: {threshold: 0.8, normalize: none}}\n",
    )


def test_output_and_id_do_not_depend_on_the_number_of_workers(cli, tmp_path, store):
    big, notes = _inputs(tmp_path)
    from manifests.store import Store

    ids, shards = [], []
    for workers in (1, 2):
        s = Store(tmp_path / f"store-{workers}")
        result = cli("--store", s.root, "corpus", "build", _recipe(tmp_path, big, notes, workers))
        assert result.code == 0, result.err
        m = s.resolve("c")
        ids.append(m.id)
        shards.append([(f.path, f.sha256) for f in m.files + m.ledger])
        assert m.stats["tasks"] > 3  # the JSONL was cut into byte ranges
        assert m.producer.execution == {"executor": "local", "ray_address": None, "workers": workers}
    assert ids[0] == ids[1] and shards[0] == shards[1]
    assert "exact_duplicate: 20" in result.out  # the funnel table


def test_byte_range_tasks_keep_exact_line_numbers(cli, tmp_path, store):
    big, notes = _inputs(tmp_path)
    assert cli("--store", store.root, "corpus", "build", _recipe(tmp_path, big, notes, 1)).code == 0
    lines = big.read_text().splitlines()
    rows = [r for r in read_table(store.resolve("c")).to_pylist() if r["source"]["uri"].endswith("big.jsonl")]
    assert len(rows) == 300
    for row in rows:
        assert json.loads(lines[row["source"]["line"] - 1])["text"] == row["text"]


def test_a_killed_build_resumes_without_losing_or_duplicating_records(cli, tmp_path, store, monkeypatch):
    big, notes = _inputs(tmp_path)
    recipe = _recipe(tmp_path, big, notes, 1)
    killed = subprocess.run(
        [sys.executable, "-m", "manifests.cli", "--store", str(store.root), "corpus", "build", str(recipe)],
        cwd=ROOT, capture_output=True, text=True, env={**__import__("os").environ, "DISTILLERY_FAULT_EXIT_AFTER_TASKS": "3"},
    )  # fmt: skip
    assert killed.returncode == 137
    assert store.list() == []
    work = next((store.root / "datasets" / "c").glob(".work-*"))
    assert len(list(work.glob("*.done.json"))) == 3

    import corpus.build

    calls = []
    original = corpus.build.run_task
    monkeypatch.setattr(corpus.build, "run_task", lambda *a: calls.append(a[0].index) or original(*a))
    assert cli("--store", store.root, "corpus", "build", recipe).code == 0
    resumed = store.resolve("c")
    assert 0 not in calls and 1 not in calls and 2 not in calls and len(calls) == resumed.stats["tasks"] - 3
    assert not work.exists()
    from manifests.store import Store

    fresh = Store(tmp_path / "fresh")
    assert cli("--store", fresh.root, "corpus", "build", recipe).code == 0
    assert fresh.resolve("c").id == resumed.id
    rows = read_table(resumed)
    assert rows.num_rows == len(set(rows.column("id").to_pylist())) == 300 + 7


def _warc(path, records):
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    with open(path, "wb") as out:
        writer = WARCWriter(out, gzip=True)
        for url, status, content_type, body in records:
            headers = StatusAndHeaders(f"{status} X", [("Content-Type", content_type)], protocol="HTTP/1.1")
            writer.write_record(
                writer.create_warc_record(url, "response", payload=io.BytesIO(body), http_headers=headers)
            )


ARTICLE = "<html><body><nav>Home | About | Shop</nav><article><h1>Bread</h1><p>{}</p></article><footer>(c)</footer></body></html>"


def test_warc_ingestion_extracts_html_and_ledgers_what_it_skips(cli, tmp_path, store):
    text = "Bake the bread slowly in a hot oven until the crust turns a deep brown colour. " * 5
    _warc(tmp_path / "crawl.warc.gz", [
        ("https://a.example/bread", 200, "text/html; charset=utf-8", ARTICLE.format(text).encode()),
        ("https://a.example/logo.png", 200, "image/png", b"\x89PNG\r\n\x1a\n" + bytes(100)),
        ("https://a.example/missing", 404, "text/html", b"<html>not found</html>"),
        ("https://a.example/latin", 200, "text/html", ARTICLE.format(text.replace("colour", "col\xf6ur")).encode("latin-1")),
        ("https://a.example/huge", 200, "text/html", ARTICLE.format("x " * 2000).encode()),
        ("https://a.example/empty", 200, "text/html", b"<html><body></body></html>"),
    ])  # fmt: skip
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"stage: corpus.build\nname: w\ninputs: [{{path: {tmp_path / 'crawl.warc.gz'}, format: warc, max_bytes: 3000}}]\n",
    )
    result = cli("--store", store.root, "corpus", "build", recipe)
    assert result.code == 0, result.err
    m = store.resolve("w")
    rows = read_table(m).to_pylist()
    assert [r["source"]["url"] for r in rows] == ["https://a.example/bread", "https://a.example/latin"]
    assert rows[0]["text"].startswith("Bread\nBake the bread") and "Home | About" not in rows[0]["text"]
    assert "\ufffd" in rows[1]["text"]  # invalid UTF-8 replaced, not a crash
    src = rows[0]["source"]
    assert src["http_status"] == 200 and src["content_type"].startswith("text/html") and src["fetch_date"]
    from warcio.archiveiterator import ArchiveIterator

    with open(tmp_path / "crawl.warc.gz", "rb") as f:
        f.seek(src["offset"])
        record = next(iter(ArchiveIterator(f)))
        assert record.rec_headers.get_header("WARC-Target-URI") == "https://a.example/bread"
    ledger = pq.read_table(m.location / "ledger" / "corpus.build.read.parquet").to_pylist()
    reasons = {json.loads(e["detail"])["url"]: e["reason"] for e in ledger}
    assert reasons == {"https://a.example/logo.png": "content_type", "https://a.example/missing": "http_status",
                       "https://a.example/huge": "too_large", "https://a.example/empty": "extract_empty"}  # fmt: skip
    assert m.stats["funnel"][0] == {"step": "read", "in": 6, "out": 2, "removed": {
        "content_type": 1, "extract_empty": 1, "http_status": 1, "too_large": 1}}  # fmt: skip


def test_a_page_that_hangs_the_extractor_is_cut_off(monkeypatch):
    import time

    import trafilatura

    from corpus.extract import ExtractLimits, extract_html

    monkeypatch.setattr(trafilatura, "extract", lambda *a, **k: time.sleep(5))
    started = time.monotonic()
    assert extract_html(b"<html></html>", "text/html", ExtractLimits(timeout_s=0.2)) == (
        None,
        "extract_timeout",
    )
    assert time.monotonic() - started < 2


def test_language_step_scores_every_document_and_keeps_the_listed_languages(cli, tmp_path, store):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": d["text"].replace("doc", "the document is in English, number ")} for d in docs(3)] + [{"text": FRENCH}])  # fmt: skip
    english = "The quick brown fox jumps over the lazy dog while the farmer watches from the old barn door."
    write_jsonl(src, [{"text": english}, {"text": english.upper() + " AGAIN"}, {"text": FRENCH}])
    recipe = write_recipe(tmp_path / "r.yaml", f"stage: corpus.build\nname: l\ninputs: [{{path: {src}}}]\n"
                          "steps: [{type: language, keep: [en]}]\n")  # fmt: skip
    result = cli("--store", store.root, "corpus", "build", recipe)
    assert result.code == 0, result.err
    m = store.resolve("l")
    rows = read_table(m).to_pylist()
    assert [r["language"] for r in rows] == ["en", "en"]
    assert all(r["language_score"] > 0.65 for r in rows)
    ledger = pq.read_table(m.location / "ledger" / "corpus.build.language.parquet").to_pylist()
    assert [(e["reason"], json.loads(e["detail"])["language"]) for e in ledger] == [
        ("language_not_kept", "fr")
    ]


def test_unknown_step_type_lists_the_known_ones(cli, tmp_path, store):
    recipe = write_recipe(
        tmp_path / "r.yaml", "stage: corpus.build\nname: c\ninputs: [{path: x}]\nsteps: [{type: gopher}]\n"
    )
    result = cli("--store", store.root, "corpus", "build", recipe)
    assert result.code == 2
    assert "'steps.0': unknown type 'gopher'; known types: 'min_words', 'language'" in result.err


@pytest.mark.parametrize("bad", ["{dataset: x, path: y}", "{format: jsonl}"])
def test_an_input_needs_exactly_one_location(cli, tmp_path, store, bad):
    recipe = write_recipe(tmp_path / "r.yaml", f"stage: corpus.build\nname: c\ninputs: [{bad}]\n")
    result = cli("--store", store.root, "corpus", "build", recipe)
    assert result.code == 2 and "exactly one of 'path' or 'dataset'" in result.err


@pytest.mark.ray
def test_ray_executor_gives_the_same_dataset(cli, tmp_path, store):
    pytest.importorskip("ray")
    big, notes = _inputs(tmp_path)
    recipe = _recipe(tmp_path, big, notes, 2)
    assert cli("--store", store.root, "corpus", "build", recipe).code == 0
    from manifests.store import Store

    on_ray = Store(tmp_path / "ray-store")
    result = cli("--store", on_ray.root, "corpus", "build", recipe, "--executor", "ray")
    assert result.code == 0, result.err
    assert on_ray.resolve("c").id == store.resolve("c").id
    assert on_ray.resolve("c").producer.execution["executor"] == "ray"


def test_global_decisions_are_the_same_when_keys_are_partitioned(cli, tmp_path, store, monkeypatch):
    big, notes = _inputs(tmp_path)
    recipe = _recipe(tmp_path, big, notes, 1)
    assert cli("--store", store.root, "corpus", "build", recipe).code == 0
    import corpus.combine
    from manifests.store import Store

    monkeypatch.setattr(corpus.combine, "PARTITION_ROWS", 7)  # ~50 partitions
    small = Store(tmp_path / "partitioned")
    assert cli("--store", small.root, "corpus", "build", recipe).code == 0
    a, b = store.resolve("c"), small.resolve("c")
    assert a.id == b.id
    ledger = pq.read_table(b.location / "ledger" / "corpus.build.exact_dedup.parquet").to_pylist()
    assert len(ledger) == 20 and all(json.loads(e["detail"])["duplicate_of"] for e in ledger)


def test_a_task_marker_exists_complete_or_not_at_all(tmp_path, monkeypatch):
    import os

    from corpus.task_markers import save_array, write_atomically, write_marker

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(
        os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd)
    )
    marker = tmp_path / "task-00001.done.json"
    write_marker(marker, {"index": 1, "rows": 3})
    assert json.loads(marker.read_text()) == {"index": 1, "rows": 3}
    # The file's bytes, then the folder's entry for the rename, are on disk before the marker counts.
    assert synced == [str(marker) + ".tmp", str(tmp_path)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [marker.name]

    def dies_halfway(f):
        f.write(b'{"index": 2')
        raise KeyboardInterrupt  # a kill while writing

    with pytest.raises(KeyboardInterrupt):
        write_atomically(tmp_path / "task-00002.done.json", dies_halfway)
    assert not (tmp_path / "task-00002.done.json").exists()

    import numpy as np

    save_array(tmp_path / "pairs-00000.npy", np.arange(5))
    assert np.load(tmp_path / "pairs-00000.npy").tolist() == [0, 1, 2, 3, 4]


def test_corpus_modules_import_no_circle_and_no_private_name():
    """A circle of imports (combine -> minhash_phases -> dedup_index -> combine was one) makes a module
    that cannot be read or moved alone; a private name imported across modules is a missing public one."""
    import ast

    modules = {p.stem: p for p in (ROOT / "corpus").glob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        graph[name] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("corpus."):
                other = node.module.split(".")[1]
                graph[name].add(other)
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"corpus/{name}.py imports private {private} from corpus/{other}.py"
            elif isinstance(node, ast.Import):
                graph[name] |= {a.name.split(".")[1] for a in node.names if a.name.startswith("corpus.")}

    acyclic: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        for other in sorted(graph.get(name, set()) - acyclic):
            assert other not in path, "import circle: " + " -> ".join(path[path.index(other) :] + [other])
            visit(other, path + [other])
        acyclic.add(name)

    for name in sorted(graph):
        visit(name, [name])
