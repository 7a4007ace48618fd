"""Published Parquet files carry page checksums, and readers of published shards check them.

Verification trusts a file whose size and mtime are unchanged since it was last hashed; a byte that
rots inside a compressed page can still decode (to other rows) without an error. With checksums the
reader names the file instead, and ``manifests verify`` (which re-hashes) reports it altered.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from manifests.data import read_table
from manifests.errors import DistilleryError
from manifests.verify import ensure_verified

from .conftest import assert_one_line_error, docs, write_jsonl, write_recipe


def _build(cli, store, tmp_path: Path, inputs: str, name: str):
    recipe = write_recipe(tmp_path / f"{name}.yaml", f"stage: corpus.build\nname: {name}\ninputs:\n{inputs}")
    return cli("--store", store.root, "corpus", "build", recipe)


def _rot_silently(path: Path, column: str) -> None:
    """Flip one byte inside ``column``'s pages such that a reader without checksums still returns rows
    (other ones than were written), and keep the file's size and mtime: what the fast path trusts."""
    stat = path.stat()
    original = path.read_bytes()
    expected = pq.read_table(path)
    chunk = pq.ParquetFile(path).metadata.row_group(0).column(expected.schema.get_field_index(column))
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    # From the chunk's end backwards: page payloads (not page headers) are where a flip decodes quietly.
    for at in range(start + chunk.total_compressed_size - 1, start, -1):
        data = bytearray(original)
        data[at] ^= 0x01
        path.write_bytes(bytes(data))
        try:
            if not pq.read_table(path).equals(expected):
                break
        except (OSError, pa.ArrowException):
            continue
    else:
        pytest.fail(f"no byte of {path.name}'s column {column} decodes quietly when flipped")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.fixture
def base(cli, store, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", docs(300))
    assert _build(cli, store, tmp_path, f"  - {{path: {src}}}\n", "base").code == 0
    manifest = store.resolve("base")
    ensure_verified(manifest)  # the verification cache now trusts every file's size and time
    return manifest


def test_a_shard_rotted_in_place_is_one_error_line_naming_it(cli, store, tmp_path, base):
    shard = base.location / base.data_files()[0].path
    _rot_silently(shard, "text")
    result = _build(cli, store, tmp_path, "  - {dataset: base}\n", "again")
    assert_one_line_error(result)
    assert shard.name in result.err and "checksum" in result.err
    assert "run 'distillery manifests verify base" in result.err
    assert not list(store.root.glob("datasets/again/*/manifest.json"))
    with pytest.raises(DistilleryError, match=shard.name):
        read_table(store.resolve("base"))
    # A full verification re-hashes and names the file.
    result = cli("--store", store.root, "manifests", "verify", "base")
    assert result.code != 0 and f"altered: {base.data_files()[0].path}" in result.err


def test_the_ledger_is_checked_too(cli, store, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", docs(300) + [{"text": ""}] * 50)
    recipe = write_recipe(
        tmp_path / "l.yaml",
        f"stage: corpus.build\nname: l\ninputs:\n  - {{path: {src}}}\n"
        "steps: [{type: min_words, min_words: 3}]\n",
    )
    assert cli("--store", store.root, "corpus", "build", recipe).code == 0
    manifest = store.resolve("l")
    ledger = manifest.location / manifest.ledger[0].path
    _rot_silently(ledger, "id")
    with pytest.raises(OSError, match="checksum"):
        pq.read_table(ledger, page_checksum_verification=True)


def test_dedup_index_reads_of_a_rotted_shard_name_the_file(cli, store, tmp_path, base):
    from corpus.dedup_index import LoadedIndex, indexed_texts

    result = cli("--store", store.root, "corpus", "dedup-index", "base", "--name", "idx")
    assert result.code == 0, result.err
    index = store.resolve("idx", kind="run")
    ensure_verified(index)  # the fast path now trusts the index's files by size and time
    assert len(indexed_texts(index.location, np.array([0, 1]))) == 2
    # The indexed dataset's texts are read when a build checks near-duplicate candidates.
    shard = base.location / base.data_files()[0].path
    _rot_silently(shard, "text")
    with pytest.raises(DistilleryError, match=f"{shard.name}.*manifests verify base"):
        indexed_texts(index.location, np.array([0, 1]))
    # The index's own keys.
    keys = index.location / "index" / "keys.parquet"
    _rot_silently(keys, "id")
    with pytest.raises(DistilleryError, match=r"keys\.parquet: cannot read this file of run idx@"):
        LoadedIndex(index, case_fold=True, minhash=None)


def test_trace_report_and_tokenizer_reads_of_a_rotted_shard_name_it(cli, store, tmp_path, base):
    from manifests.data import shard_batches

    record = read_table(base, columns=["id"]).column("id")[0].as_py()
    shard = base.location / base.data_files()[0].path
    _rot_silently(shard, "text")
    # Every command that reads published rows: one line naming the file, never rows of garbage.
    for args in (["manifests", "trace", record, "--in", "base"], ["manifests", "report", "base",
                 "--out", str(tmp_path / "r.html")]):  # fmt: skip
        result = cli("--store", store.root, *args)
        assert_one_line_error(result)
        assert shard.name in result.err and "manifests verify base" in result.err
    assert not (tmp_path / "r.html").exists()
    tokenizer = write_recipe(
        tmp_path / "tok.yaml",
        "stage: train.tokenizer\nname: tok\ndatasets: [{ref: base}]\nvocab_size: 300\n"
        "eos_token: '<|endoftext|>'\npad_token: '<|pad|>'\n",
    )
    result = cli("--store", store.root, "train", "tokenizer", tokenizer)
    assert_one_line_error(result)
    assert shard.name in result.err
    with pytest.raises(DistilleryError, match="checksum"):
        list(shard_batches(shard, "base"))


def test_a_build_refuses_a_tampered_dedup_index(cli, store, tmp_path, base):
    assert cli("--store", store.root, "corpus", "dedup-index", "base", "--name", "idx").code == 0
    index = store.resolve("idx", kind="run")
    settings = index.location / "index" / "settings.json"
    settings.write_text(settings.read_text() + " ")  # an edited index decides which rows are dropped
    src = write_jsonl(tmp_path / "new.jsonl", docs(5))
    result = _build(
        cli, store, tmp_path, f"  - {{path: {src}}}\ndedup: {{exact: true, against: [idx]}}\n", "n"
    )
    assert_one_line_error(result, code=1)  # a verification failure, as for any tampered input
    assert "idx@" in result.err and "altered: index/settings.json" in result.err
    assert not list(store.root.glob("datasets/n/*/manifest.json"))
