"""Regression tests for defects found in review of the foundation."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from manifests.errors import DistilleryError
from manifests.publish import Publisher
from manifests.store import Store

from .conftest import assert_one_line_error, corpus_recipe, docs, write_jsonl, write_recipe


@pytest.mark.parametrize("name", ["../../escape", "team/web", "", "*", ".hidden"])
def test_names_that_are_paths_or_globs_are_refused(cli, tmp_path, store, name):
    src = write_jsonl(tmp_path / "in.jsonl", docs(3))
    recipe = write_recipe(
        tmp_path / "r.yaml", f"stage: corpus.build\nname: '{name}'\ninputs: [{{path: {src}}}]\n"
    )
    result = cli("--store", store.root, "corpus", "build", recipe)
    assert_one_line_error(result)
    assert "not a valid name" in result.err
    assert not (tmp_path / "escape").exists()
    with pytest.raises(DistilleryError, match="not a valid name"):
        Publisher(store, kind="dataset", name=name, stage="t", recipe={})


def test_latest_is_the_last_published_even_when_it_existed_before(cli, tmp_path, store):
    src = write_jsonl(tmp_path / "in.jsonl", docs(10) + [{"text": "a b c d"}])
    ids = []
    for min_words in (3, 5, 3):
        recipe = corpus_recipe(tmp_path, src, "c")
        recipe.write_text(recipe.read_text().replace("min_words: 3}", f"min_words: {min_words}}}"))
        assert cli("--store", store.root, "corpus", "build", recipe).code == 0
        ids.append(store.resolve("c").id)
    assert ids[0] == ids[2] != ids[1]
    assert store.resolve("c").id == ids[0]
    assert [m.id for m in store.list(kind="dataset", name="c")] == [ids[1], ids[0]]


def test_verify_catches_a_manifest_edited_to_match_an_altered_shard(cli, tmp_path, store):
    src = write_jsonl(tmp_path / "in.jsonl", docs(10))
    assert cli("--store", store.root, "corpus", "build", corpus_recipe(tmp_path, src)).code == 0
    m = store.resolve("c")
    shard = m.location / m.files[0].path
    pq.write_table(pq.read_table(shard).slice(2), shard)
    from manifests.hashing import sha256_file

    raw = json.loads((m.location / "manifest.json").read_text())
    raw["files"][0]["sha256"] = sha256_file(shard)
    raw["files"][0]["bytes"] = shard.stat().st_size
    (m.location / "manifest.json").write_text(json.dumps(raw))
    result = cli("--store", store.root, "manifests", "verify", "c")
    assert_one_line_error(result, code=1)
    assert "altered: manifest.json" in result.err


def test_appending_to_an_input_keeps_the_ids_of_earlier_lines(cli, tmp_path, store):
    rows = docs(10)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    recipe = corpus_recipe(tmp_path, src)
    assert cli("--store", store.root, "corpus", "build", recipe).code == 0
    old = store.resolve("c")
    write_jsonl(src, rows + docs(1, offset=99))
    assert cli("--store", store.root, "corpus", "build", recipe).code == 0
    result = cli("--store", store.root, "manifests", "diff", old.ref, "c")
    assert "+1 added, -0 removed, 10 kept" in result.out


def test_an_input_listed_twice_is_an_error_not_duplicate_ids(cli, tmp_path, store):
    src = write_jsonl(tmp_path / "in.jsonl", docs(3))
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"stage: corpus.build\nname: c\ndedup: {{exact: false}}\ninputs: [{{path: {src}}}, {{path: {src}}}]\n",
    )
    result = cli("--store", store.root, "corpus", "build", recipe)
    assert_one_line_error(result)
    assert "listed twice" in result.err
    assert store.list() == []


@pytest.mark.parametrize("stage", ["3", "", "[a]", "{x: 1}"])
def test_stage_must_be_a_name(cli, tmp_path, store, stage):
    result = cli(
        "--store", store.root, "run", write_recipe(tmp_path / "r.yaml", f"stage: {stage}\nname: c\n")
    )
    assert_one_line_error(result)
    assert "'stage:' must name a stage" in result.err


def test_non_utf8_recipe_and_input(cli, tmp_path, store):
    bad = tmp_path / "r.yaml"
    bad.write_bytes(b"stage: corpus.build\nname: \xff\xfe\n")
    assert_one_line_error(cli("--store", store.root, "run", bad))
    src = tmp_path / "in.jsonl"
    src.write_bytes(json.dumps(docs(1)[0]).encode() + b"\n" + b'{"text": "caf\xe9 au lait"}\n')
    result = cli("--store", store.root, "corpus", "build", corpus_recipe(tmp_path, src))
    assert_one_line_error(result)
    assert "line 2: not UTF-8" in result.err


def test_parquet_column_that_is_not_text(cli, tmp_path, store):
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), src)
    recipe = write_recipe(
        tmp_path / "r.yaml", f"stage: corpus.build\nname: c\ninputs: [{{path: {src}, format: parquet}}]\n"
    )
    result = cli("--store", store.root, "corpus", "build", recipe)
    assert_one_line_error(result)
    assert "column 'text' holds int64, not text" in result.err


def test_trace_and_diff_of_a_corrupt_shard_are_one_line(cli, tmp_path, store):
    src = write_jsonl(tmp_path / "in.jsonl", docs(5))
    assert cli("--store", store.root, "corpus", "build", corpus_recipe(tmp_path, src)).code == 0
    m = store.resolve("c")
    rid = pq.read_table(m.location / m.files[0].path).column("id")[0].as_py()
    (m.location / m.files[0].path).write_bytes(b"garbage")
    assert_one_line_error(cli("--store", store.root, "manifests", "trace", rid, "--in", "c"), code=1)
    assert_one_line_error(cli("--store", store.root, "manifests", "diff", "c", "c"), code=1)


def test_one_broken_manifest_does_not_hide_the_others(cli, tmp_path, store, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", docs(5))
    assert cli("--store", store.root, "corpus", "build", corpus_recipe(tmp_path, src, "good")).code == 0
    broken = store.root / "datasets" / "bad" / ("0" * 64)
    broken.mkdir(parents=True)
    (broken / "manifest.json").write_text("{not json")
    result = cli("--store", store.root, "manifests", "list")
    assert result.code == 0 and "good@" in result.out
    assert "warning: skipping" in result.err
    assert_one_line_error(cli("--store", store.root, "manifests", "show", str(broken)))


def test_newer_schema_version_is_refused(store, tmp_path):
    src_store = Store(tmp_path / "s")
    with Publisher(src_store, kind="dataset", name="x", stage="t", recipe={}) as pub:
        pub.write_table(pa.table({"id": ["a"]}))
        m = pub.publish()
    raw = json.loads((m.location / "manifest.json").read_text())
    raw["schema_version"] = 99
    (m.location / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(DistilleryError, match="written by a newer distillery"):
        src_store.resolve(str(m.location))


def test_lineage_shows_a_parent_missing_from_the_store(cli, tmp_path, store):
    import shutil

    with Publisher(store, kind="dataset", name="parent", stage="t", recipe={}) as pub:
        pub.write_table(pa.table({"id": ["a"]}))
        parent = pub.publish()
    with Publisher(store, kind="dataset", name="child", stage="t", recipe={}, parents=[parent]) as pub:
        pub.write_table(pa.table({"id": ["b"], "parents": [["a"]]}))
        pub.publish()
    shutil.rmtree(parent.location)
    result = cli("--store", store.root, "manifests", "lineage", "child")
    assert result.code == 0
    assert f"dataset parent@{parent.id[:12]} (input) — missing from this store" in result.out
    trace = cli("--store", store.root, "manifests", "trace", "b")
    assert "record a: not found — its dataset is missing" in trace.out


def test_unknown_metric_is_refused(cli, tmp_path, store):
    recipe = write_recipe(
        tmp_path / "r.yaml", "stage: eval\nname: e\nmetric: bleu\nmodels: [m]\ndataset: {ref: d}\n"
    )
    result = cli("--store", store.root, "run", recipe)
    assert_one_line_error(result)
    assert "'metric'" in result.err


def test_leftovers_of_a_dead_job_are_removed_by_the_next_publish(store):
    import socket

    folder = store.root / "datasets" / "x"
    dead = folder / f".tmp-{socket.gethostname()}-999999999-abc"
    alive = folder / f".tmp-{socket.gethostname()}-{os.getpid()}-def"
    other_host = folder / ".tmp-elsewhere-1-ghi"
    for d in (dead, alive, other_host):
        (d / "data").mkdir(parents=True)
    with Publisher(store, kind="dataset", name="x", stage="t", recipe={}) as pub:
        pub.write_table(pa.table({"id": ["a"]}))
        pub.publish()
    assert not dead.exists() and alive.exists() and other_host.exists()


def test_interrupt_publishes_nothing(cli, tmp_path, store, monkeypatch):
    import corpus.build

    def interrupted(*args, **kwargs):
        yield from ()
        raise KeyboardInterrupt

    monkeypatch.setattr(corpus.build, "read_task", interrupted)
    src = write_jsonl(tmp_path / "in.jsonl", docs(3))
    result = cli("--store", store.root, "corpus", "build", corpus_recipe(tmp_path, src))
    assert_one_line_error(result, code=130)
    assert store.list() == []
    # Only the resumable work folder stays (never listed); no half-published dataset.
    assert [p.name.split("-")[0] for p in (store.root / "datasets" / "c").iterdir()] == [".work"]


def test_model_source_that_is_neither_package_nor_folder(cli, store, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # (the library read the variable when it was imported: without this it tries the network, for ~45 s)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    result = cli(
        "--store", store.root, "train", "import-model", "--source", "Org/Some-Model", "--gguf-file", ""
    )
    assert_one_line_error(result)
    assert "model source 'Org/Some-Model'" in result.err
    result = cli("--store", store.root, "train", "import-model", "--source", "Org/Some-Model")
    assert_one_line_error(result)
    assert "no file SmolLM2-135M-Instruct.Q4_1.gguf" in result.err
