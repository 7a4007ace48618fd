"""Pretraining data: ``train tokenizer`` (byte-level BPE) and ``train pack`` (fixed-length rows that
say which document's tokens sit where)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter, defaultdict

import numpy as np
import pyarrow.parquet as pq
import pytest

from manifests.cli import main
from manifests.data import read_table
from manifests.models import load_tokenizer
from manifests.store import Store
from train.pack import SequencePacker, _percentiles, split_of

from .conftest import ROOT, add_imported_smollm2, assert_one_line_error, write_recipe

CORPUS = "examples/recipes/demo-corpus.yaml"
TOKENIZER = "examples/recipes/demo-tokenizer.yaml"
SEQ_LEN = 64


def pack_recipe(tmp_path, name: str = "packed", extra: str = "") -> str:
    return str(write_recipe(
        tmp_path / f"{name}.yaml",
        f"stage: train.pack\nname: {name}\ndataset: demo-corpus\ntokenizer: demo-bpe\nseq_len: {SEQ_LEN}\n"
        f"validation_fraction: 0.2\n{extra}",
    ))  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A store with demo-corpus, the demo BPE tokenizer and the corpus packed with it."""
    tmp = tmp_path_factory.mktemp("pack")
    store = Store(tmp / "store")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        for args in (["corpus", "build", CORPUS], ["train", "tokenizer", TOKENIZER],
                     ["train", "pack", pack_recipe(tmp)]):  # fmt: skip
            assert main(["--store", str(store.root), *args]) == 0, args
    return store, tmp


@pytest.fixture(scope="module")
def documents(built):
    """Corpus record id → (text, its tokens with the separator) under the demo tokenizer."""
    store, _ = built
    tokenizer = load_tokenizer(store.resolve("demo-bpe"))
    rows = read_table(store.resolve("demo-corpus"), columns=["id", "text"]).to_pylist()
    encoded = tokenizer([r["text"] for r in rows], add_special_tokens=False)["input_ids"]
    return {
        r["id"]: (r["text"], [*ids, tokenizer.eos_token_id]) for r, ids in zip(rows, encoded, strict=True)
    }


def packed_rows(store: Store, name: str = "packed") -> dict[str, list[dict]]:
    manifest = store.resolve(name)
    return {split: read_table(manifest, split=split).to_pylist() for split in manifest.splits()}


def test_tokenizer_run_loads_round_trips_and_has_its_special_tokens(built, documents):
    store, _ = built
    run, corpus = store.resolve("demo-bpe"), store.resolve("demo-corpus")
    assert run.kind == "run" and run.producer.stage == "train.tokenizer"
    assert [p.id for p in run.parents] == [corpus.id]
    tokenizer = load_tokenizer(run)
    assert tokenizer.is_fast and 1500 < len(tokenizer) <= 2000
    assert (tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token) == ("<|endoftext|>",) * 2 + (
        "<|pad|>",
    )
    assert tokenizer.eos_token_id == 0 and run.stats["documents"] == corpus.stats["rows_out"]
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}], tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip
    assert chat == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 3
    for text, tokens in list(documents.values())[:50]:
        assert tokenizer.decode(tokens[:-1]) == text  # byte-level BPE loses nothing


def test_tokenizer_training_is_deterministic_across_processes_and_threads(built):
    store, _ = built
    first = store.resolve("demo-bpe")
    env = os.environ | {"RAYON_NUM_THREADS": "1", "PYTHONHASHSEED": "7"}
    code = f"from manifests.cli import main; raise SystemExit(main(['--store', {str(store.root)!r}, 'train', 'tokenizer', {TOKENIZER!r}]))"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, capture_output=True)
    again = store.resolve("demo-bpe")
    assert again.id == first.id
    assert [(f.path, f.sha256) for f in again.files] == [(f.path, f.sha256) for f in first.files]


def test_every_row_is_seq_len_and_its_sources_cover_each_position_once(built, documents):
    store, _ = built
    rows = packed_rows(store)
    assert set(rows) == {"train", "validation"}
    for split_rows in rows.values():
        for row in split_rows:
            assert len(row["input_ids"]) == SEQ_LEN
            positions = [p for s in row["sources"] for p in range(s["start"], s["end"])]
            assert positions == list(range(SEQ_LEN))  # in order, no gap, no overlap
            assert row["parents"] == list(dict.fromkeys(s["id"] for s in row["sources"]))
            for s in row["sources"]:
                _, tokens = documents[s["id"]]
                assert (
                    row["input_ids"][s["start"] : s["end"]]
                    == tokens[s["offset"] : s["offset"] + s["end"] - s["start"]]
                )


def test_sources_decode_back_to_the_documents_texts(built, documents):
    store, _ = built
    tokenizer = load_tokenizer(store.resolve("demo-bpe"))
    pieces: dict[str, list[tuple[int, list[int]]]] = defaultdict(list)
    for split_rows in packed_rows(store).values():
        for row in split_rows:
            for s in row["sources"]:
                ids = row["input_ids"][s["start"] : s["end"]]
                decoded = tokenizer.decode(ids, skip_special_tokens=True)
                text, _ = documents[s["id"]]
                assert (
                    "\ufffd" in decoded or decoded in text
                )  # a cut inside a UTF-8 character decodes as U+FFFD
                pieces[s["id"]].append((s["offset"], ids))
    whole = 0
    for doc, parts in pieces.items():
        text, tokens = documents[doc]
        joined = [t for _, ids in sorted(parts) for t in ids]
        assert joined == tokens[: len(joined)]  # each document's pieces join up without a gap
        if len(joined) == len(tokens):
            whole += 1
            assert tokenizer.decode(joined, skip_special_tokens=True) == text
    assert whole > 0.9 * len(documents)


def test_stats_ledger_and_splits_by_document(built, documents):
    store, _ = built
    manifest = store.resolve("packed")
    rows = packed_rows(store)
    stats = manifest.stats
    assert (
        stats["tokenizer"]["run"] == store.resolve("demo-bpe").id
        and len(stats["tokenizer"]["files_sha256"]) == 64
    )
    assert manifest.producer.recipe["tokenizer_files_sha256"] == stats["tokenizer"]["files_sha256"]
    assert {p.role for p in manifest.parents} == {"input", "tokenizer"}
    seen: dict[str, str] = {}
    for split, split_rows in rows.items():
        counts = stats["splits"][split]
        assert counts["sequences"] == len(split_rows)
        assert counts["tokens"] == counts["sequences"] * SEQ_LEN + counts["tokens_dropped"]
        for row in split_rows:
            for doc in row["parents"]:
                assert seen.setdefault(doc, split) == split  # a document's tokens never straddle splits
                assert split_of(doc, 0, 0.2) == split
    assert stats["documents"] == len(documents) and stats["tokens"] == sum(
        len(t) for _, t in documents.values()
    )
    lengths = sorted(len(t) - 1 for _, t in documents.values())
    assert (
        stats["tokens_per_document"]["max"] == lengths[-1]
        and stats["tokens_per_document"]["min"] == lengths[0]
    )
    ledger = pq.read_table(manifest.location / manifest.ledger[0].path).to_pylist()
    assert sum(json.loads(e["detail"])["tokens_dropped"] for e in ledger) == stats["tokens_dropped"] > 0
    assert {e["reason"] for e in ledger} <= {"pack_remainder", "pack_remainder_cut"}
    assert not set(e["id"] for e in ledger if e["action"] == "drop") & set(seen)


def test_same_recipe_same_id_and_a_new_seed_moves_documents(built, cli):
    store, tmp = built
    first = store.resolve("packed")
    assert cli("--store", store.root, "train", "pack", pack_recipe(tmp)).code == 0
    assert store.resolve("packed").id == first.id
    assert cli("--store", store.root, "train", "pack", pack_recipe(tmp, "reseeded", "seed: 1\n")).code == 0
    other = store.resolve("reseeded")
    assert other.id != first.id
    held_out = [{d for r in read_table(m, split="validation").column("parents").to_pylist() for d in r}
                for m in (first, other)]  # fmt: skip
    assert held_out[0] != held_out[1]


def test_trace_of_a_packed_row_reaches_corpus_records_and_their_lines(built, cli):
    store, _ = built
    row = packed_rows(store)["train"][3]
    result = cli("--store", store.root, "manifests", "trace", row["id"])
    assert result.code == 0, result.err
    assert "stage train.pack" in result.out
    for doc in row["parents"]:
        assert f"(stage corpus.build) record {doc}" in result.out
    assert "source: examples/sample/" in result.out and " line " in result.out


def test_remainder_pad_keeps_every_token(built, cli):
    store, tmp = built
    assert (
        cli("--store", store.root, "train", "pack", pack_recipe(tmp, "padded", "remainder: pad\n")).code == 0
    )
    manifest = store.resolve("padded")
    assert (
        manifest.stats["tokens_dropped"] == 0 and manifest.stats["tokens_padded"] > 0 and not manifest.ledger
    )
    pad = load_tokenizer(store.resolve("demo-bpe")).pad_token_id
    for split_rows in packed_rows(store, "padded").values():
        last = split_rows[-1]
        end = last["sources"][-1]["end"]
        assert len(last["input_ids"]) == SEQ_LEN and end < SEQ_LEN
        assert set(last["input_ids"][end:]) == {pad}


def test_packer_and_percentiles_units():
    packer = SequencePacker(4)
    rows = [r for doc, n in (("a", 3), ("b", 6), ("c", 1)) for r in packer.add(doc, np.arange(n))]
    assert [[(d, o, len(t)) for d, o, t in r] for r in rows] == [[("a", 0, 3), ("b", 0, 1)], [("b", 1, 4)]]
    assert [(d, o, len(t)) for d, o, t in packer.pieces] == [("b", 5, 1), ("c", 0, 1)]
    assert _percentiles(Counter({1: 1, 2: 1, 10: 2})) == {
        "mean": 5.75,
        "min": 1,
        "p50": 2,
        "p90": 10,
        "p99": 10,
        "max": 10,
    }


def test_bad_inputs_are_one_line_and_publish_nothing(built, cli, tmp_path):
    store, _ = built
    before = sorted(m.id for m in store.list())
    result = cli(
        "--store", store.root, "train", "pack", pack_recipe(tmp_path, "bad"), "--set", "dataset=packed"
    )
    assert_one_line_error(result)
    assert "lacks column(s) text needed for packing; it has: id, parents, input_ids, sources" in result.err

    result = cli("--store", store.root, "train", "pack", pack_recipe(tmp_path, "bad"), "--set", "seq_len=1")
    assert_one_line_error(result)
    assert "'seq_len'" in result.err and "greater than or equal to 2" in result.err

    result = cli(
        "--store", store.root, "train", "pack", pack_recipe(tmp_path, "bad"), "--set", "tokenizer=demo-corpus"
    )
    assert_one_line_error(result)
    assert (
        "tokenizer: demo-corpus@" in result.err and "is a dataset, not a run with a tokenizer" in result.err
    )

    result = cli(
        "--store", store.root, "train", "pack", pack_recipe(tmp_path, "bad"), "--set", "eos_token=<nope>"
    )
    assert_one_line_error(result)
    assert "'<nope>' is not in its vocabulary" in result.err

    result = cli(
        "--store", store.root, "train", "pack", pack_recipe(tmp_path, "bad"), "--set", "seq_len=1000000"
    )
    assert_one_line_error(result)
    assert "not one row of seq_len 1000000" in result.err

    tok = write_recipe(
        tmp_path / "tok.yaml", "stage: train.tokenizer\nname: t\ndatasets: [{ref: packed}]\nvocab_size: 300\n"
    )
    result = cli("--store", store.root, "train", "tokenizer", tok)
    assert_one_line_error(result)
    assert "lacks column(s) text needed for tokenizer training" in result.err
    result = cli("--store", store.root, "train", "tokenizer", tok, "--set", "vocab_size=260")
    assert_one_line_error(result)
    assert "leaves no room for merges" in result.err
    result = cli(
        "--store",
        store.root,
        "train",
        "tokenizer",
        TOKENIZER,
        "--set",
        "datasets=[{ref: demo-corpus, split: test}]",
    )
    assert_one_line_error(result)
    assert "has no split 'test' (splits: train)" in result.err

    result = cli("--store", store.root, "train", "pack", TOKENIZER)
    assert_one_line_error(result)
    assert "stage 'train.tokenizer' is not a train.pack stage" in result.err
    assert sorted(m.id for m in store.list()) == before


@pytest.mark.slow
@pytest.mark.xdist_group("smollm2")
def test_demo_pack_with_the_smollm2_tokenizer(built, imported_smollm2, cli):
    store, _ = built
    # The run `train import-model` makes (imported once for the session: most of a minute).
    add_imported_smollm2(imported_smollm2, store)
    assert cli("--store", store.root, "train", "pack", "examples/recipes/demo-pack.yaml").code == 0
    manifest = store.resolve("demo-pack")
    tokenizer = load_tokenizer(store.resolve("smollm2-135m-instruct"))
    texts = {
        r["id"]: r["text"]
        for r in read_table(store.resolve("demo-corpus"), columns=["id", "text"]).to_pylist()
    }
    assert manifest.stats["tokenizer"]["eos_id"] == tokenizer.convert_tokens_to_ids("<|endoftext|>") == 0
    assert set(manifest.splits()) == {"train", "validation"}
    for row in read_table(manifest).to_pylist():
        assert len(row["input_ids"]) == 256
        for s in row["sources"]:
            decoded = tokenizer.decode(row["input_ids"][s["start"] : s["end"]], skip_special_tokens=True)
            assert "\ufffd" in decoded or decoded in texts[s["id"]]
