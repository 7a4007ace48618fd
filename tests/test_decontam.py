"""Decontamination: the n-gram index of evaluation sets, and the step that drops or flags training
documents containing a benchmark example (whole, re-cased, or only across its question/answer seam)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from corpus.decontam import (
    HASHING,
    INDEX_FILE,
    STAGE,
    TOKENS,
    ContaminationStats,
    DecontaminateConfig,
    check_settings,
    contamination_report,
    gram_hashes,
    run_build_index,
    token_hashes,
)
from manifests.errors import DistilleryError
from manifests.publish import Publisher
from manifests.verify import verify
from tests.conftest import write_jsonl

TINY_QA = Path("examples/sample/evals/tiny-qa.jsonl")
TINY = {"name": "tiny-qa", "path": str(TINY_QA), "fields": ["question", "answer"]}


def examples() -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, TINY_QA.read_text().splitlines())}


def web_texts(n: int = 60) -> list[str]:
    lines = Path("examples/sample/web.jsonl").read_text().splitlines()[:n]
    return [json.loads(line)["text"] for line in lines]


def make_index(store, name: str = "evals", ngram: int = 13, benchmarks: list[dict] | None = None):
    recipe = {"stage": STAGE, "name": name, "ngram": ngram, "benchmarks": benchmarks or [TINY]}
    return run_build_index(recipe, store, "decontam.yaml")


def step(store, **kwargs):
    cfg = DecontaminateConfig(index=kwargs.pop("index", "evals"), **kwargs)
    parents = cfg.prepare(store)
    return cfg, parents, cfg.build(store)


def batch(texts: list[str]) -> pa.RecordBatch:
    return pa.record_batch({"id": [f"doc-{i}" for i in range(len(texts))], "text": texts})


def planted() -> list[str]:
    """Unrelated pages, then tq-11 pasted whole (re-cased, re-punctuated) and tq-04 only across its seam."""
    qa11, qa04 = examples()["tq-11"], examples()["tq-04"]
    whole = (
        f"Quiz night notes.\n{qa11['question'].upper()}\n\nAnswer: {qa11['answer'].replace(',', '')} Thanks!"
    )
    question, answer = qa04["question"].split(), qa04["answer"].split()
    seam = " ".join(question[-7:] + answer[:6])  # 13 words found only where question meets answer
    return [*web_texts(), whole, f"Timetable trivia: {seam} and so on."]


def test_index_publishes_verifies_and_counts(store):
    manifest = make_index(store)
    assert manifest.kind == "run" and manifest.producer.stage == STAGE
    assert verify(manifest).ok
    stats = manifest.stats["benchmarks"]["tiny-qa"]
    assert stats["examples"] == 20 and stats["short_examples"] == 1 and stats["ngrams"] > 300
    assert manifest.stats["settings"] == {"ngram": 13, "tokens": TOKENS, "hashing": HASHING}
    table = pq.read_table(manifest.location / INDEX_FILE)
    hashes = table.column("hash").to_numpy()
    assert table.schema.field("hash").type == pa.uint64() and np.all(hashes[1:] >= hashes[:-1])
    assert set(table.column("example").to_pylist()) == set(examples())
    # The same evaluation set and settings give the same index.
    assert make_index(store).id == manifest.id


def test_planted_example_dropped_with_benchmark_and_example_in_ledger(store):
    make_index(store)
    cfg, parents, f = step(store)
    assert cfg.index.startswith("evals@") and len(cfg.index) == len("evals@") + 64
    assert [p.name for p in parents] == ["evals"]
    texts = planted()
    out = f(batch(texts))
    assert out.num_rows == len(texts) - 2  # every unrelated page is kept
    assert "contaminated" not in out.schema.names
    ledger = {e["id"]: e for e in f.ledger}
    assert set(ledger) == {f"doc-{len(texts) - 2}", f"doc-{len(texts) - 1}"}
    whole, seam = (json.loads(ledger[f"doc-{len(texts) - k}"]["detail"]) for k in (2, 1))
    assert whole["contamination"] == {"tiny-qa": ["tq-11"]} and whole["matched_ngrams"] >= 7
    assert seam["contamination"] == {"tiny-qa": ["tq-04"]} and seam["matched_ngrams"] == 1
    assert all(e["action"] == "drop" and e["reason"] == "benchmark_contamination" for e in f.ledger)
    assert not any("Saturn" in (e["detail"] or "") for e in f.ledger)  # ids, never text
    tally = f.stats.as_dict()["contamination"]
    assert tally == {"documents": {"tiny-qa": 2}, "examples": {"tiny-qa:tq-04": 1, "tiny-qa:tq-11": 1}}


def test_flag_mode_keeps_and_marks(store):
    make_index(store)
    _, _, f = step(store, action="flag")
    texts = planted()
    out = f(batch(texts))
    assert out.num_rows == len(texts)
    flags = out.column("contaminated").to_pylist()
    assert flags == [False] * (len(texts) - 2) + [True, True]
    assert [e["action"] for e in f.ledger] == ["flag", "flag"]
    assert json.loads(f.ledger[0]["detail"])["contamination"] == {"tiny-qa": ["tq-11"]}
    assert f.stats.rows_out == len(texts) and f.stats.changes == {"benchmark_contamination": 2}


def test_min_matches_needs_that_many_ngrams_of_one_example(store):
    make_index(store)
    texts = planted()
    _, _, f = step(store, min_matches=5)
    f(batch(texts))
    assert [e["id"] for e in f.ledger] == [f"doc-{len(texts) - 2}"]  # the one-gram seam stays


def test_big_batches_are_hashed_in_slices_with_the_same_result(store, monkeypatch):
    make_index(store)
    texts = planted()
    _, _, whole = step(store)
    whole(batch(texts))
    monkeypatch.setattr("corpus.decontam.SLICE_CHARS", 300)  # a slice or two per document
    _, _, sliced = step(store)
    sliced(batch(texts))
    assert sliced.ledger == whole.ledger and len(whole.ledger) == 2


def test_short_example_is_one_gram_matched_when_contained(store):
    make_index(store)
    _, _, f = step(store)
    texts = [
        "Kids ask: what colour do you get by mixing blue and yellow paint? GREEN, of course.",
        "Mixing blue and yellow paint gives green, the kids found.",  # not the example's words in a row
    ]
    out = f(batch(texts))
    assert out.column("id").to_pylist() == ["doc-1"]
    assert json.loads(f.ledger[0]["detail"])["contamination"] == {"tiny-qa": ["tq-08"]}


def test_counts_sum_across_tasks_and_examples_hit_are_distinct(store):
    index = make_index(store)
    texts = planted()
    merged = ContaminationStats()
    for _ in range(2):  # two worker tasks see the same contaminated documents
        _, _, f = step(store)
        f(batch(texts))
        merged.merge(ContaminationStats.from_dict(json.loads(json.dumps(f.stats.as_dict()))))
    tally = merged.as_dict()["contamination"]
    assert tally["examples"] == {"tiny-qa:tq-04": 2, "tiny-qa:tq-11": 2}
    report = contamination_report(tally, index)
    assert report == {"tiny-qa": {"documents": 4, "examples_hit": 2, "examples": 20, "fraction": 0.1}}
    cfg = DecontaminateConfig(index="evals")
    assert cfg.report(tally, store) == report


def test_ngrams_never_cross_documents_and_do_not_depend_on_batching():
    texts = [" ".join(f"w{i}" for i in range(20)), "Some Other words, here.", "", "!!!", None]
    together = gram_hashes(*token_hashes(pa.array(texts)), [3, 13])
    for k in (3, 13):
        hashes, owner = together[k]
        for row, text in enumerate(texts):
            alone, _ = gram_hashes(*token_hashes(pa.array([text], pa.string())), [k])[k]
            assert hashes[owner == row].tolist() == alone.tolist()
    assert len(together[13][0]) == 8 and len(together[3][0]) == 18 + 2
    _, counts = token_hashes(pa.array(texts))
    assert counts.tolist() == [20, 4, 0, 0, 0]


def test_index_with_other_ngram_settings_is_a_clear_error(store):
    make_index(store, name="evals8", ngram=8)
    with pytest.raises(DistilleryError, match=r"holds 8-grams but the step expects 13-grams; rebuild"):
        step(store, index="evals8", ngram=13)
    step(store, index="evals8", ngram=8)  # what it was built with is fine
    with pytest.raises(DistilleryError, match="hashing='old-v0'.*rebuild the index"):
        check_settings({"ngram": 13, "tokens": TOKENS, "hashing": "old-v0"}, "evals@1234", None)


def test_index_reference_that_is_not_an_index(store):
    with Publisher(store, kind="run", name="not-an-index", stage="x", recipe={}) as pub:
        (pub.dir / "model.bin").write_bytes(b"x")
        pub.publish()
    with pytest.raises(DistilleryError, match="not a decontamination index; build one with stage"):
        step(store, index="not-an-index")
    with pytest.raises(DistilleryError, match="no run manifest named 'nope'"):
        step(store, index="nope")


def test_bad_benchmark_input_is_one_clear_line(store, tmp_path):
    with pytest.raises(DistilleryError, match=r"benchmark tiny-qa: .*missing.jsonl: no such file"):
        make_index(store, benchmarks=[TINY | {"path": str(tmp_path / "missing.jsonl")}])
    with pytest.raises(
        DistilleryError, match=r"line 1 has no field 'solution'; it has: id, question, answer"
    ):
        make_index(store, benchmarks=[TINY | {"fields": ["question", "solution"]}])
    table = pa.table({"prompt": ["What is it?"], "target": ["It is a test."]})
    pq.write_table(table, tmp_path / "qa.parquet")
    with pytest.raises(DistilleryError, match=r"qa.parquet has no column 'answer'; it has: prompt, target"):
        make_index(
            store, benchmarks=[{"name": "pq", "path": str(tmp_path / "qa.parquet"), "fields": ["answer"]}]
        )
    (tmp_path / "bad.jsonl").write_text('{"question": "ok", "answer": "ok"}\nnot json\n')
    with pytest.raises(DistilleryError, match=r"bad.jsonl line 2: not valid JSON"):
        make_index(store, benchmarks=[TINY | {"path": str(tmp_path / "bad.jsonl")}])
    # Regression: a file that is not UTF-8 was a UnicodeDecodeError traceback.
    (tmp_path / "latin.jsonl").write_bytes(
        b'{"question": "ok", "answer": "ok"}\n{"question": "caf\xe9", "answer": "x"}\n'
    )
    with pytest.raises(DistilleryError, match=r"latin.jsonl line 2: not UTF-8 text"):
        make_index(store, benchmarks=[TINY | {"path": str(tmp_path / "latin.jsonl")}])
    write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(DistilleryError, match="holds no examples"):
        make_index(store, benchmarks=[TINY | {"path": str(tmp_path / "empty.jsonl")}])
    with pytest.raises(DistilleryError, match=r"benchmarks.0.*give 'path' or 'dataset'"):
        make_index(store, benchmarks=[{"name": "x", "fields": ["q"]}])
    with pytest.raises(DistilleryError, match="unknown key 'ngrams'; did you mean 'ngram'"):
        run_build_index({"name": "evals", "ngrams": 8, "benchmarks": [TINY]}, store, "decontam.yaml")
    with pytest.raises(DistilleryError, match="repeated: tiny-qa"):
        make_index(store, benchmarks=[TINY, TINY])
    assert not store.list(kind="run")  # nothing half-published


def test_benchmarks_from_a_dataset_and_a_parquet_file(store, tmp_path):
    rows = [{"id": "d-0", "parents": [], "prompt": "Name the longest river that flows through the city of Cairo",
             "completion": "The Nile river flows north through Cairo to the Mediterranean sea."}]  # fmt: skip
    with Publisher(store, kind="dataset", name="held-out", stage="test", recipe={}) as pub:
        pub.write_table(pa.Table.from_pylist(rows), split="test")
        held_out = pub.publish()
    pq.write_table(pa.table({"q": ["How many legs does a spider have, counting every one of them?"],
                             "a": [["eight", "legs"]]}), tmp_path / "spiders.parquet")  # fmt: skip
    index = make_index(store, benchmarks=[
        {"name": "held-out", "dataset": "held-out", "fields": ["prompt", "completion"], "split": "test"},
        {"name": "spiders", "path": str(tmp_path / "spiders.parquet"), "fields": ["q", "a"]},
    ])  # fmt: skip
    assert [(p.id, p.role) for p in index.parents] == [(held_out.id, "benchmark")]
    assert index.producer.recipe["benchmarks"][0]["dataset"] == f"held-out@{held_out.id}"
    _, _, f = step(store)
    texts = [
        "flows through the city of Cairo. The Nile river flows north through Cairo",
        "many legs does a spider have, counting every one of them? Eight legs!",
        "A spider web.",
    ]
    f(batch(texts))
    found = {e["id"]: json.loads(e["detail"])["contamination"] for e in f.ledger}
    assert found == {"doc-0": {"held-out": ["d-0"]}, "doc-1": {"spiders": ["0"]}}


def test_standalone_dedup_and_decontaminate_verbs(cli, tmp_path, store):
    from manifests.data import read_table

    quiz = json.loads(Path("examples/sample/evals/tiny-qa.jsonl").read_text().splitlines()[3])
    rows = [
        {"text": f"Story {i}: the river flooded the meadow again this spring and the ducks were pleased."}
        for i in range(5)
    ]
    rows += [
        rows[0],
        {"text": "Trivia night notes. " + quiz["question"] + " " + quiz["answer"] + " Then we had cake."},
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "r.yaml").write_text(
        f"stage: corpus.build\nname: raw\ndedup: {{exact: false}}\ninputs: [{{path: {tmp_path / 'in.jsonl'}}}]\n"
    )
    assert cli("--store", store.root, "corpus", "build", tmp_path / "r.yaml").code == 0
    result = cli("--store", store.root, "corpus", "dedup", "raw", "--name", "deduped")
    assert result.code == 0, result.err
    assert read_table(store.resolve("deduped")).num_rows == 6
    assert (
        cli("--store", store.root, "corpus", "decontam-index", "examples/recipes/decontam-index.yaml").code
        == 0
    )
    result = cli(
        "--store",
        store.root,
        "corpus",
        "decontaminate",
        "deduped",
        "--index",
        "evals-index",
        "--name",
        "clean",
    )
    assert result.code == 0, result.err
    clean = store.resolve("clean")
    assert read_table(clean).num_rows == 5
    assert clean.stats["contamination"]["tiny-qa"]["examples_hit"] == 1
    assert [p.name for p in clean.parents] == ["deduped", "evals-index"]
