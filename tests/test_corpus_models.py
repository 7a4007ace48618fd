"""Model-based steps: a trained fastText quality classifier, and toxicity."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from corpus.toxicity import ToxicityConfig, count_hits, load_wordlist
from manifests.data import read_table

from .conftest import write_jsonl, write_recipe


@pytest.fixture
def classifier(cli, store):
    for recipe in ("demo-corpus", "junk-corpus", "quality-classifier"):
        verb = "train-classifier" if recipe == "quality-classifier" else "build"
        result = cli("--store", store.root, "corpus", verb, f"examples/recipes/{recipe}.yaml")
        assert result.code == 0, result.err
    return store.resolve("quality-clf")


def test_trained_classifier_separates_the_classes(classifier, store):
    assert classifier.stats["holdout_accuracy"] >= 0.9
    assert {p.role for p in classifier.parents} == {"positive", "negative"}
    assert (classifier.location / "model" / "classifier.bin").is_file()


def test_classifier_step_by_threshold_and_top_fraction(classifier, cli, tmp_path, store):
    def first(path, n=10):
        return [json.loads(line) for line in Path(path).read_text().splitlines()[:n]]

    src = write_jsonl(
        tmp_path / "mix.jsonl", first("examples/sample/junk.jsonl") + first("examples/sample/web.jsonl")
    )
    recipe = write_recipe(tmp_path / "t.yaml", f"stage: corpus.build\nname: t\ninputs: [{{path: {src}}}]\n"
                          "steps: [{type: classifier, model: quality-clf, label: hq, threshold: 0.5}]\n")  # fmt: skip
    assert cli("--store", store.root, "corpus", "build", recipe).code == 0
    kept = store.resolve("t")
    rows = read_table(kept).to_pylist()
    assert all(r["quality_score"] >= 0.5 for r in rows)
    assert sum("spam.example.net" in (r["source"]["url"] or "") for r in rows) <= 1
    assert kept.parents[0].id == classifier.id and kept.parents[0].role == "step_model"
    assert kept.producer.recipe["steps"][0]["model"] == f"quality-clf@{classifier.id}"

    recipe.write_text(
        recipe.read_text()
        .replace("threshold: 0.5", "keep_top_fraction: 0.25")
        .replace("name: t", "name: top")
    )
    assert cli("--store", store.root, "corpus", "build", recipe).code == 0
    top = store.resolve("top")
    assert top.stats["rows_out"] == 5
    ledger = pq.read_table(top.location / "ledger" / "corpus.build.quality_score.parquet").to_pylist()
    assert len(ledger) == 15 and {e["reason"] for e in ledger} == {"quality_score_below_top_fraction"}
    cutoff = json.loads(ledger[0]["detail"])["cutoff"]
    assert all(r["quality_score"] >= cutoff for r in read_table(top).to_pylist())
    assert all(e["score"] < cutoff for e in ledger)


def test_classifier_step_needs_a_classifier_run(cli, tmp_path, store):
    assert cli("--store", store.root, "corpus", "build", "examples/recipes/demo-corpus.yaml").code == 0
    recipe = write_recipe(tmp_path / "t.yaml", "stage: corpus.build\nname: t\ninputs: [{path: examples/sample/junk.jsonl}]\n"
                          "steps: [{type: classifier, model: nothing, threshold: 0.5, keep_top_fraction: 0.1}]\n")  # fmt: skip
    result = cli("--store", store.root, "corpus", "build", recipe)
    assert result.code == 2 and "give 'threshold' or 'keep_top_fraction', not both" in result.err


def test_word_lists_match_whole_words_and_phrases_only():
    words, phrases = load_wordlist("en")
    texts = pa.array(
        ["A classic day in Scunthorpe.", "What the shit, SHIT!", "kill   yourself now", "", "shitake"]
    )
    assert count_hits(texts, words, phrases).tolist() == [0, 2, 1, 0, 0]


def test_toxicity_step_scores_and_drops(cli, tmp_path, store):
    clean = "The garden looks lovely this spring and the tomatoes are growing well along the fence."
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": clean}, {"text": "you stupid fucking bitch, fuck off and die"},
                                              {"text": clean + " Damn, that shit hit the fan once. " + clean * 20}])  # fmt: skip
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"stage: corpus.build\nname: x\ninputs: [{{path: {src}}}]\nsteps: [{{type: toxicity}}]\n",
    )
    assert cli("--store", store.root, "corpus", "build", recipe).code == 0
    m = store.resolve("x")
    rows = read_table(m).to_pylist()
    assert len(rows) == 2 and rows[1]["toxicity_words"] == 1  # one hit in a long document is kept
    assert rows[0]["toxicity_score"] < 0.5
    ledger = pq.read_table(m.location / "ledger" / "corpus.build.toxicity.parquet").to_pylist()
    assert [e["reason"] for e in ledger] == ["toxic_words"]


def test_toxicity_config_rejects_an_unknown_language():
    with pytest.raises(Exception, match="no word list for 'xx'"):
        ToxicityConfig(languages=["xx"]).build()


def test_report_html_and_json(cli, tmp_path, store):
    assert cli("--store", store.root, "corpus", "build", "examples/recipes/demo-corpus.yaml").code == 0
    result = cli("--store", store.root, "manifests", "report", "demo-corpus", "--format", "json")
    summary = json.loads(result.out)
    assert summary["rows"] == sum(summary["languages"].values()) and set(summary["languages"]) == {"en"}
    assert summary["funnel"][0]["step"] == "read" and summary["funnel"][-1]["out"] == summary["rows"]
    assert summary["scores"]["language_score"]["min"] >= 0.65
    assert summary["length_words"]["min"] >= 20
    out = tmp_path / "r.html"
    assert cli("--store", store.root, "manifests", "report", "demo-corpus", "--out", out).code == 0
    page = out.read_text()
    assert page.count("data:image/png;base64,") >= 3 and "exact_duplicate" in page and "<table>" in page
