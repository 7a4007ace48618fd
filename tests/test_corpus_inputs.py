"""Corpus inputs: truncated WARC/WET files, globs in ``path``, the input's own fields, and the
build's failure modes (empty inputs, ``--workers 0``, nothing left behind, damaged shards)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from manifests.data import read_table
from manifests.verify import ensure_verified

from .conftest import assert_one_line_error, docs, write_jsonl, write_recipe


def _build(cli, store, tmp_path: Path, inputs: str, name: str = "c", extra: str = ""):
    recipe = write_recipe(
        tmp_path / f"{name}.yaml", f"stage: corpus.build\nname: {name}\ninputs:\n{inputs}{extra}"
    )
    return cli("--store", store.root, "corpus", "build", recipe)


def _ledger(manifest) -> list[dict]:
    rows: list[dict] = []
    for f in manifest.ledger:
        rows += pq.read_table(manifest.location / f.path).to_pylist()
    return rows


# --- truncated WARC and WET files ------------------------------------------------------------------


def _texts(n: int) -> list[str]:
    # Documents of different lengths, so that no cut falls on a record boundary by chance.
    return [f"document {i} " + " ".join(f"word{i}x{j}" for j in range(40 + 17 * i)) for i in range(n)]


def _warc(path: Path, texts: list[str], *, gz: bool, wet: bool = False) -> list[int]:
    """Write one record per text (``text/plain`` responses, or WET conversions); returns where each starts."""
    starts = []
    with open(path, "wb") as f:
        writer = WARCWriter(f, gzip=gz)
        for i, text in enumerate(texts):
            starts.append(f.tell())
            payload = io.BytesIO(text.encode())
            if wet:
                record = writer.create_warc_record(f"https://ex.org/{i}", "conversion", payload=payload,
                                                   warc_content_type="text/plain")  # fmt: skip
            else:
                headers = StatusAndHeaders("200 OK", [("Content-Type", "text/plain")], protocol="HTTP/1.1")
                record = writer.create_warc_record(f"https://ex.org/{i}", "response", payload=payload,
                                                   http_headers=headers)  # fmt: skip
            writer.write_record(record)
    return starts


def _cut(path: Path, at: int) -> None:
    path.write_bytes(path.read_bytes()[:at])


def _assert_cut_record_dropped(
    cli,
    store,
    tmp_path,
    path: Path,
    fmt: str,
    texts: list[str],
    whole: int,
    starts: list[int],
    url: bool = True,
):
    result = _build(cli, store, tmp_path, f"  - {{path: {path}, format: {fmt}}}\n")
    assert result.code == 0, result.err
    m = store.resolve("c")
    published = read_table(m).column("text").to_pylist()
    # Only whole documents are published: the fragment of the cut one is not.
    assert published == texts[:whole]
    read = m.stats["funnel"][0]
    assert read["removed"] == {"truncated_record": 1} and read["in"] == whole + 1
    (entry,) = [e for e in _ledger(m) if e["reason"] == "truncated_record"]
    assert entry["step"] == "corpus.build.read" and entry["action"] == "drop"
    detail = json.loads(entry["detail"])
    assert detail["offset"] == starts[whole]
    # Cut before its WARC-Target-URI header, a record's URL is unknown.
    assert detail["url"] == (f"https://ex.org/{whole}" if url else None)


def test_gzipped_warc_cut_at_60_percent_drops_the_cut_record_with_a_ledger_row(cli, store, tmp_path):
    texts = _texts(6)
    path = tmp_path / "crawl.warc.gz"
    starts = _warc(path, texts, gz=True)
    cut = int(path.stat().st_size * 0.6)
    assert cut not in starts
    _cut(path, cut)
    whole = sum(1 for s in starts[1:] if s <= cut)
    _assert_cut_record_dropped(cli, store, tmp_path, path, "warc", texts, whole, starts)


def test_plain_warc_cut_mid_record_drops_the_cut_record(cli, store, tmp_path):
    texts = _texts(5)
    path = tmp_path / "crawl.warc"
    starts = _warc(path, texts, gz=False)
    _cut(path, (starts[3] + starts[4]) // 2)  # inside the fourth record's payload
    _assert_cut_record_dropped(cli, store, tmp_path, path, "warc", texts, 3, starts)


@pytest.mark.parametrize("into", [0.05, 0.5])  # inside the header block (no URL, no length yet); the payload
def test_wet_cut_mid_record_drops_the_cut_record(cli, store, tmp_path, into):
    texts = _texts(5)
    path = tmp_path / "dump.warc.wet"
    starts = _warc(path, texts, gz=False, wet=True)
    _cut(path, int(starts[2] + (starts[3] - starts[2]) * into))
    _assert_cut_record_dropped(cli, store, tmp_path, path, "wet", texts, 2, starts, url=into > 0.05)


def test_gzipped_wet_cut_drops_the_cut_record(cli, store, tmp_path):
    texts = _texts(5)
    path = tmp_path / "dump.warc.wet.gz"
    starts = _warc(path, texts, gz=True, wet=True)
    _cut(path, (starts[3] + starts[4]) // 2)
    _assert_cut_record_dropped(cli, store, tmp_path, path, "wet", texts, 3, starts)


def test_a_file_that_is_no_warc_is_one_error_line_without_binary(cli, store, tmp_path):
    path = tmp_path / "crawl.warc.gz"
    path.write_bytes(bytes(range(256)) * 8)
    result = _build(cli, store, tmp_path, f"  - {{path: {path}, format: warc}}\n")
    assert_one_line_error(result)
    assert "crawl.warc.gz" in result.err and "WARC" in result.err
    assert result.err.isascii() and all(c.isprintable() for c in result.err.strip())
    assert store.list() == []


def test_whole_warc_files_have_no_truncation_rows(cli, store, tmp_path):
    texts = _texts(3)
    for suffix, gz in ((".warc", False), (".warc.gz", True)):
        path = tmp_path / f"whole{suffix}"
        _warc(path, texts, gz=gz)
        result = _build(cli, store, tmp_path, f"  - {{path: {path}, format: warc}}\n")
        assert result.code == 0, result.err
        m = store.resolve("c")
        assert read_table(m).column("text").to_pylist() == texts
        assert m.stats["funnel"][0]["removed"] == {}


# --- globs in path -----------------------------------------------------------------------------------


def _glob_tree(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    write_jsonl(data / "b.jsonl", docs(2, offset=10))
    write_jsonl(data / "a.jsonl", docs(2, offset=0))
    write_jsonl(data / "sub" / "c.jsonl", docs(2, offset=20))
    write_jsonl(data / ".hidden.jsonl", docs(2, offset=30))
    (data / "notes.txt").write_text("not jsonl")
    return data


def test_a_glob_in_path_reads_the_matching_files_in_sorted_order(cli, store, tmp_path):
    data = _glob_tree(tmp_path)
    result = _build(cli, store, tmp_path, f"  - {{path: '{data}/*.jsonl'}}\n", name="g")
    assert result.code == 0, result.err
    rows = read_table(store.resolve("g")).to_pylist()
    assert [Path(r["source"]["uri"]).name for r in rows] == ["a.jsonl", "a.jsonl", "b.jsonl", "b.jsonl"]
    # Record ids are those of the same files named one by one.
    listed = "".join(f"  - {{path: {data / n}}}\n" for n in ("a.jsonl", "b.jsonl"))
    assert _build(cli, store, tmp_path, listed, name="listed").code == 0
    assert [r["id"] for r in rows] == read_table(store.resolve("listed")).column("id").to_pylist()


def test_a_recursive_glob_in_path_and_a_relative_one(cli, store, tmp_path, monkeypatch):
    data = _glob_tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    result = _build(cli, store, tmp_path, "  - {path: 'data/**/*.jsonl'}\n", name="g")
    assert result.code == 0, result.err
    uris = read_table(store.resolve("g")).column("source").to_pylist()
    assert sorted({s["uri"] for s in uris}) == ["data/a.jsonl", "data/b.jsonl", "data/sub/c.jsonl"]
    # The folder form still works.
    result = _build(cli, store, tmp_path, f"  - {{path: {data}, glob: '*.jsonl'}}\n", name="folder")
    assert result.code == 0, result.err


def test_a_glob_matching_nothing_is_an_error_naming_the_pattern(cli, store, tmp_path):
    _glob_tree(tmp_path)
    result = _build(cli, store, tmp_path, f"  - {{path: '{tmp_path}/data/*.parquet'}}\n")
    assert_one_line_error(result)
    assert "data/*.parquet" in result.err and "no files match" in result.err
    result = _build(cli, store, tmp_path, f"  - {{path: '{tmp_path}/data/*.jsonl', glob: '*.jsonl'}}\n")
    assert_one_line_error(result)
    assert "'path' or in 'glob'" in result.err


# --- the input's own fields --------------------------------------------------------------------------


def _fields_input(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "in.jsonl", [
        {"text": "alpha beta gamma one", "url": "https://a/1", "doc_id": "A1", "score": 1, "tags": ["x", "y"],
         "meta": {"k": 1}, "ok": True},
        {"text": "alpha beta gamma two", "doc_id": "A2", "score": 2.5, "license": "cc-by"},
        {"text": "alpha beta gamma three", "doc_id": "A3", "score": None},
    ])  # fmt: skip


def test_jsonl_fields_become_columns_with_one_type_each(cli, store, tmp_path):
    src = _fields_input(tmp_path)
    assert _build(cli, store, tmp_path, f"  - {{path: {src}}}\n").code == 0
    table = read_table(store.resolve("c"))
    schema = table.schema
    assert schema.names == [
        "id",
        "parents",
        "text",
        "source",
        "doc_id",
        "score",
        "tags",
        "meta",
        "ok",
        "license",
    ]
    assert schema.field("score").type == pa.float64() and schema.field("ok").type == pa.bool_()
    assert schema.field("tags").metadata == {b"distillery.encoding": b"json"}
    rows = {r["doc_id"]: r for r in table.to_pylist()}
    assert [rows[k]["score"] for k in ("A1", "A2", "A3")] == [1.0, 2.5, None]
    assert json.loads(rows["A1"]["tags"]) == ["x", "y"] and json.loads(rows["A1"]["meta"]) == {"k": 1}
    assert rows["A2"]["tags"] is None and rows["A2"]["license"] == "cc-by" and rows["A1"]["license"] is None
    assert rows["A1"]["source"]["url"] == "https://a/1" and "url" not in schema.names


def test_keep_fields_chooses_the_columns(cli, store, tmp_path):
    src = _fields_input(tmp_path)
    assert _build(cli, store, tmp_path, f"  - {{path: {src}, keep_fields: [license, doc_id]}}\n").code == 0
    table = read_table(store.resolve("c"))
    assert table.schema.names[4:] == ["license", "doc_id"]
    assert table.column("doc_id").to_pylist() == ["A1", "A2", "A3"]
    assert _build(cli, store, tmp_path, f"  - {{path: {src}, keep_fields: []}}\n", name="none").code == 0
    assert read_table(store.resolve("none")).schema.names == ["id", "parents", "text", "source"]
    result = _build(cli, store, tmp_path, f"  - {{path: {src}, keep_fields: [titel]}}\n", name="typo")
    assert_one_line_error(result)
    assert "titel" in result.err and "keep_fields" in result.err


def test_inputs_with_different_fields_give_the_union_of_columns(cli, store, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "one two three four", "title": "T"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "five six seven eight", "domain": "news", "rank": 3}])
    assert _build(cli, store, tmp_path, f"  - {{path: {a}}}\n  - {{path: {b}}}\n").code == 0
    rows = read_table(store.resolve("c")).drop_columns(["id", "parents", "source"]).to_pylist()
    assert rows == [{"text": "one two three four", "title": "T", "domain": None, "rank": None},
                    {"text": "five six seven eight", "title": None, "domain": "news", "rank": 3}]  # fmt: skip


@pytest.mark.parametrize("field", ["id", "source", "parents"])
def test_a_field_named_like_a_build_column_is_an_error(cli, store, tmp_path, field):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "one two three four", field: "mine"}])
    result = _build(cli, store, tmp_path, f"  - {{path: {src}}}\n")
    assert_one_line_error(result)
    assert f"'{field}'" in result.err and "keep_fields" in result.err and "rename" in result.err
    result = _build(cli, store, tmp_path, f"  - {{path: {src}, keep_fields: [{field}]}}\n")
    assert_one_line_error(result)
    # Leaving it out is the way through.
    assert _build(cli, store, tmp_path, f"  - {{path: {src}, keep_fields: []}}\n").code == 0


def test_a_field_with_two_types_is_an_error_naming_both_places(cli, store, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "one two three", "year": 2020},
                                              {"text": "four five six", "year": "2021"}])  # fmt: skip
    result = _build(cli, store, tmp_path, f"  - {{path: {src}}}\n")
    assert_one_line_error(result)
    assert "'year'" in result.err and "line 2" in result.err and "line 1" in result.err
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "one two three", "year": 2020}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "four five six", "year": "2021"}])
    result = _build(cli, store, tmp_path, f"  - {{path: {a}}}\n  - {{path: {b}}}\n")
    assert_one_line_error(result)
    assert "'year'" in result.err and "a.jsonl" in result.err and "b.jsonl" in result.err


def test_a_field_a_step_writes_is_an_error(cli, store, tmp_path):
    rows = [{"text": d["text"], "language": "mine"} for d in docs(3)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    result = _build(
        cli, store, tmp_path, f"  - {{path: {src}}}\n", extra="steps: [{type: language, keep: [en]}]\n"
    )
    assert_one_line_error(result)
    assert "'language'" in result.err and "keep_fields" in result.err


def _many_tasks_input(tmp_path: Path) -> Path:
    # Fields that first appear, and widen from int to float, in later tasks of a split file.
    rows = []
    for i, d in enumerate(docs(120)):
        row = {"text": d["text"], "n": i}
        if i > 60:
            row["late"] = f"v{i}"
        if i > 90:
            row["n"] = i + 0.5
        rows.append(row)
    return write_jsonl(tmp_path / "many.jsonl", rows)


def test_kept_fields_survive_dedup_and_do_not_depend_on_workers(cli, store, tmp_path):
    src = _many_tasks_input(tmp_path)
    extra = "split_bytes: 1024\nshard_rows: 25\ndedup: {exact: true, minhash: {threshold: 0.8}, lines: {unit: line}}\n"
    ids = []
    for workers in (1, 2):
        result = _build(cli, store, tmp_path, f"  - {{path: {src}}}\n", name=f"w{workers}",
                        extra=extra + f"workers: {workers}\n")  # fmt: skip
        assert result.code == 0, result.err
        m = store.resolve(f"w{workers}")
        ids.append([f.sha256 for f in m.files])
        table = read_table(m)
    assert ids[0] == ids[1]
    assert table.schema.field("n").type == pa.float64() and table.schema.field("late").type == pa.string()
    lines = {json.loads(line)["text"]: json.loads(line) for line in src.read_text().splitlines()}
    for row in table.to_pylist():
        original = lines[row["text"]]
        assert row["n"] == original["n"] and row["late"] == original.get("late")


def test_trace_shows_the_kept_fields(cli, store, tmp_path):
    src = _fields_input(tmp_path)
    assert _build(cli, store, tmp_path, f"  - {{path: {src}}}\n").code == 0
    rid = read_table(store.resolve("c")).to_pylist()[1]["id"]
    result = cli("--store", store.root, "manifests", "trace", rid)
    assert result.code == 0, result.err
    assert "doc_id: A2" in result.out and "license: cc-by" in result.out


def test_parquet_columns_are_kept_and_null_texts_are_ledger_rows(cli, store, tmp_path):
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": ["one two three", None, "four five six"], "title": ["a", "b", "c"],
                             "stars": pa.array([1, 2, 3], pa.int32())}), path)  # fmt: skip
    assert _build(cli, store, tmp_path, f"  - {{path: {path}, format: parquet}}\n").code == 0
    m = store.resolve("c")
    table = read_table(m)
    assert table.schema.field("stars").type == pa.int32()
    assert table.drop_columns(["id", "parents", "source"]).to_pylist() == [
        {"text": "one two three", "title": "a", "stars": 1}, {"text": "four five six", "title": "c", "stars": 3}]  # fmt: skip
    assert m.stats["funnel"][0]["removed"] == {"null_text": 1}
    assert [e["reason"] for e in _ledger(m)] == ["null_text"]
    pq.write_table(pa.table({"id": ["x"], "text": ["one two three"]}), tmp_path / "ids.parquet")
    result = _build(
        cli, store, tmp_path, f"  - {{path: {tmp_path / 'ids.parquet'}, format: parquet}}\n", name="ids"
    )
    assert_one_line_error(result)
    assert "'id'" in result.err and "keep_fields" in result.err


# --- the build's failure modes -----------------------------------------------------------------------


def test_workers_zero_on_the_command_line_is_refused(cli, store, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", docs(3))
    recipe = write_recipe(tmp_path / "r.yaml", f"stage: corpus.build\nname: c\ninputs: [{{path: {src}}}]\n")
    result = cli("--store", store.root, "corpus", "build", recipe, "--workers", "0")
    assert_one_line_error(result)
    assert "workers" in result.err
    assert store.list() == []


def test_an_empty_input_is_named_as_empty(cli, store, tmp_path):
    src = tmp_path / "empty.jsonl"
    src.write_text("\n")
    result = _build(cli, store, tmp_path, f"  - {{path: {src}}}\n")
    assert_one_line_error(result)
    assert "empty.jsonl is empty" in result.err


def test_a_failed_build_leaves_nothing_and_keeps_the_published_version(cli, store, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "one two three"}\n{not json\n')
    assert_one_line_error(_build(cli, store, tmp_path, f"  - {{path: {bad}}}\n"))
    assert not (store.root / "datasets" / "c").exists()
    good = write_jsonl(tmp_path / "good.jsonl", docs(3))
    assert _build(cli, store, tmp_path, f"  - {{path: {good}}}\n").code == 0
    before = store.resolve("c")
    assert_one_line_error(_build(cli, store, tmp_path, f"  - {{path: {bad}}}\n"))
    assert [p.name for p in (store.root / "datasets" / "c").iterdir() if not p.name.startswith(".")] != []
    assert not [p for p in (store.root / "datasets" / "c").iterdir() if p.name.startswith((".work", ".tmp"))]
    after = store.resolve("c")
    assert after.id == before.id
    ensure_verified(after)


@pytest.mark.parametrize("damage", ["footer", "page"])
def test_a_damaged_shard_read_as_a_table_input_names_the_file(cli, store, tmp_path, damage):
    src = write_jsonl(tmp_path / "in.jsonl", docs(200))
    assert _build(cli, store, tmp_path, f"  - {{path: {src}}}\n", name="base").code == 0
    base = store.resolve("base")
    ensure_verified(base)  # the verification cache now trusts the shard's size and time
    shard = base.location / base.data_files()[0].path
    stat = shard.stat()
    data = bytearray(shard.read_bytes())
    if damage == "footer":
        data[-4:] = b"XXXX"  # the footer's magic
    else:  # the text column's first page header: the footer still reads, the rows do not
        start = pq.ParquetFile(shard).metadata.row_group(0).column(2).data_page_offset
        data[start : start + 16] = b"\xff" * 16
    shard.write_bytes(bytes(data))  # same size and time: the cache still trusts the file
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    result = _build(cli, store, tmp_path, "  - {dataset: base}\n", name="again")
    assert_one_line_error(result)
    assert shard.name in result.err and "manifests verify" in result.err
    # Other readers of published shards say the same.
    result = cli("--store", store.root, "corpus", "dedup-index", "base", "--name", "idx")
    assert_one_line_error(result)
    assert shard.name in result.err and "manifests verify" in result.err


def test_a_jsonl_file_with_a_byte_order_mark_is_read(cli, store, tmp_path):
    src = tmp_path / "bom.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(d) + "\n" for d in docs(2)).encode())
    result = _build(cli, store, tmp_path, f"  - {{path: {src}}}\n")
    assert result.code == 0, result.err
    assert read_table(store.resolve("c")).column("text").to_pylist() == [d["text"] for d in docs(2)]
