"""Heuristic quality filters: every rule on a crafted document, configs, edge cases, datatrove parity."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pytest
from pydantic import ValidationError

from corpus.quality import (
    QUALITY_STEP_CONFIGS,
    C4QualityConfig,
    DatatroveWordSplitter,
    FineWebQualityConfig,
    GopherQualityConfig,
    GopherRepetitionConfig,
)
from corpus.steps import Filter

ROOT = Path(__file__).resolve().parent.parent
MODES = ["fast", "datatrove"]

CLEAN = """Rivers shape the land in slow and patient ways. Over thousands of years, running water cuts \
valleys, carries sand to the sea and builds wide plains where people have farmed for centuries.
A young river in the hills flows fast and straight, and it carves a narrow valley with steep sides.
Lower down, the slope eases and the river begins to wander, swinging from side to side across its plain.
Each bend grows as the water wears away the outer bank and drops gravel on the inner one.
In time two bends may meet, and the river takes the shorter path, leaving a curved lake behind it.
Floods matter too: they spread fresh silt over the fields, which is why river valleys are so fertile."""

SENTENCE = "The old mill by the bridge has been turned into a small museum with a cafe."


def lines(*items: str) -> str:
    return "\n".join(items)


def decide(config, *texts: str | None) -> list[str | None]:
    """Each document's drop reason (None when kept), through the step's public call."""
    step = config.build()
    batch = pa.RecordBatch.from_pydict(
        {"id": [str(i) for i in range(len(texts))], "text": pa.array(list(texts), pa.string())}
    )
    kept = step(batch)
    reasons = {entry["id"]: entry["reason"] for entry in step.ledger}
    assert kept.num_rows + len(reasons) == len(texts)
    return [reasons.get(str(i)) for i in range(len(texts))]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("config", QUALITY_STEP_CONFIGS)
def test_clean_document_passes(config, mode):
    assert decide(config(tokenizer=mode), CLEAN) == [None]


GOPHER_QUALITY_CASES = [
    ({}, "The cat sat on the mat with the dog.", "gopher_short_doc"),
    ({"max_doc_words": 60}, CLEAN, "gopher_long_doc"),
    ({}, "to be or of an in it " * 12, "gopher_short_words"),
    ({}, "the internationalisation and extraordinarily uncharacteristically " * 15, "gopher_long_words"),
    ({}, CLEAN + " #tag" * 20, "gopher_hash_ratio"),
    ({}, " ".join(w + "..." * (i % 4 == 0) for i, w in enumerate(CLEAN.split(" "))), "gopher_ellipsis_ratio"),
    (
        {},
        lines(*(f"- item {i} of the list, with the notes that have to be read" for i in range(12))),
        "gopher_bullet_lines",
    ),
    ({}, CLEAN.replace(".\n", "…\n"), "gopher_ellipsis_lines"),
    ({}, CLEAN + " 12 34 56 78" * 20, "gopher_alpha_ratio"),
    ({}, "Apples pears plums cherries grow in orchards near rivers. " * 8, "gopher_few_stop_words"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("options", "text", "reason"), GOPHER_QUALITY_CASES)
def test_gopher_quality_rules(options, text, reason, mode):
    assert decide(GopherQualityConfig(tokenizer=mode, **options), text) == [reason]


NO_PARAGRAPHS = {"dup_para_frac": None, "dup_para_char_frac": None}
NO_LINES = NO_PARAGRAPHS | {"dup_line_frac": None, "dup_line_char_frac": None}
REPETITION_CASES = [
    ({}, "", "gopher_empty"),
    ({}, "\n\n".join([SENTENCE, SENTENCE, CLEAN]), "gopher_dup_para_frac"),
    (
        {"dup_para_frac": None},
        "\n\n".join([CLEAN, CLEAN, SENTENCE, "A.", "B.", "C.", "D."]),
        "gopher_dup_para_char_frac",
    ),
    (NO_PARAGRAPHS, lines("Home", "Home", "Home", "News", CLEAN.replace("\n", " ")), "gopher_dup_line_frac"),
    (
        NO_PARAGRAPHS | {"dup_line_frac": None},
        lines(CLEAN, CLEAN, "a", "b", "c", "d", "e"),
        "gopher_dup_line_char_frac",
    ),
    (NO_LINES, "buy now " * 40, "gopher_top_2_gram"),
    (NO_LINES | {"top_n_grams": {3: 0.18}}, CLEAN + " click here now" * 20, "gopher_top_3_gram"),
    (NO_LINES | {"top_n_grams": {}}, CLEAN + " " + " ".join([SENTENCE] * 5), "gopher_dup_5_gram"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("options", "text", "reason"), REPETITION_CASES)
def test_gopher_repetition_rules(options, text, reason, mode):
    assert decide(GopherRepetitionConfig(tokenizer=mode, **options), text) == [reason]


C4_CASES = [
    (CLEAN + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit.", "c4_lorem_ipsum"),
    (CLEAN + "\nWrite {name} where the name of the guest should appear.", "c4_curly_bracket"),
    (lines(SENTENCE, SENTENCE, "Menu", "Subscribe to our newsletter"), "c4_too_few_sentences"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("text", "reason"), C4_CASES)
def test_c4_rules(text, reason, mode):
    assert decide(C4QualityConfig(tokenizer=mode), text) == [reason]


@pytest.mark.parametrize("mode", MODES)
def test_c4_reads_only_the_lines_it_keeps(mode):
    # A bracket in a line C4 removes anyway (no terminal punctuation, or about JavaScript) is harmless.
    tolerated = [CLEAN + "\nfunction f() { return 1 }", CLEAN + "\nEnable JavaScript to see {the map}."]
    assert decide(C4QualityConfig(tokenizer=mode), *tolerated) == [None, None]
    # Five sentences, but one sits in a JavaScript line that C4 removes: too few remain.
    text = lines("Please enable JavaScript. It is needed.", SENTENCE, SENTENCE, SENTENCE)
    step = C4QualityConfig(tokenizer=mode).build()
    step(pa.RecordBatch.from_pydict({"id": ["x"], "text": [text]}))
    (entry,) = step.ledger
    assert (entry["reason"], entry["score"], json.loads(entry["detail"])) == (
        "c4_too_few_sentences",
        3,
        {"javascript": 1},
    )


def test_c4_sentences_follow_spacy_in_compat_mode():
    # spaCy keeps "Mr." and "e.g." whole, so they end no sentence; the fast count splits after them.
    text = lines("Mr. Brown met Dr. Smith, e.g. at noon.", "They talked about the weather for a while.")
    assert decide(C4QualityConfig(tokenizer="datatrove"), text) == ["c4_too_few_sentences"]
    assert decide(C4QualityConfig(tokenizer="datatrove", min_num_sentences=2), text) == [None]
    assert decide(C4QualityConfig(tokenizer="fast", min_num_sentences=5), text) == [None]


FINEWEB_CASES = [
    ("\n \n\t", "fineweb_empty"),
    (
        lines(*(f"Section {i} of the guide to the local river paths and bridges" for i in range(10))),
        "fineweb_line_punct_ratio",
    ),
    (lines(*(f"Yes, item {i} is in stock." for i in range(10))), "fineweb_short_line_ratio"),
    (
        lines(CLEAN, "Share this page on social media today.", "Share this page on social media today."),
        "fineweb_char_dup_ratio",
    ),
    (lines(*(f"Internationally coordinated{i:03d}." for i in range(12))), "fineweb_list_ratio"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("text", "reason"), FINEWEB_CASES)
def test_fineweb_rules(text, reason, mode):
    assert decide(FineWebQualityConfig(tokenizer=mode), text) == [reason]


def test_scores_columns_and_ledger():
    step = GopherQualityConfig().build()
    batch = pa.RecordBatch.from_pydict({"id": ["short", "clean"], "text": ["Too short to keep.", CLEAN]})
    out = step(batch)
    assert out.column("id").to_pylist() == ["clean"]
    assert out.column("gopher_words").to_pylist() == [len(CLEAN.split())]
    assert 0.9 < out.column("gopher_alpha_ratio")[0].as_py() <= 1
    assert step.ledger[0] | {"detail": None} == {
        "id": "short", "step": "gopher_quality", "action": "drop", "reason": "gopher_short_doc", "score": 4.0,
        "detail": None,
    }  # fmt: skip
    assert dict(step.stats.reasons) == {"gopher_short_doc": 1}


@pytest.mark.parametrize("mode", MODES)
def test_empty_and_missing_text(mode):
    expected = {
        "gopher_quality": "gopher_short_doc",
        "gopher_repetition": "gopher_empty",
        "c4_quality": "c4_too_few_sentences",
        "fineweb_quality": "fineweb_empty",
    }
    for config in QUALITY_STEP_CONFIGS:
        step_type = config.model_fields["type"].default
        assert decide(config(tokenizer=mode), "", None, CLEAN) == [expected[step_type]] * 2 + [None]
    # Only whitespace: no words, lines or sentences, but nothing repeats either (as in datatrove).
    assert decide(GopherRepetitionConfig(tokenizer=mode), " \n\t") == [None]
    assert decide(FineWebQualityConfig(tokenizer=mode), " \n\t") == ["fineweb_empty"]


@pytest.mark.parametrize("mode", MODES)
def test_sliced_large_string_batch(mode):
    # The same decisions whatever the batch's Arrow layout (an offset, 64-bit string offsets).
    texts = pa.array(["Too short.", CLEAN, "word " * 60, CLEAN + "\n" + CLEAN, None], pa.large_string())
    batch = pa.RecordBatch.from_pydict({"id": list("abcde"), "text": texts})
    for config in QUALITY_STEP_CONFIGS:
        whole = config(tokenizer=mode).build().decide(batch).reasons
        assert config(tokenizer=mode).build().decide(batch.slice(1, 3)).reasons == whole[1:4]


@pytest.mark.parametrize("mode", MODES)
def test_empty_batch(mode):
    for config in QUALITY_STEP_CONFIGS:
        assert decide(config(tokenizer=mode)) == []


@pytest.mark.parametrize("mode", MODES)
def test_non_ascii_text(mode):
    russian = "Река течёт медленно и спокойно, а в долине растут высокие деревья и цветы. " * 8
    german = "Der Fluss fließt langsam durch das Tal, und die Bäume stehen still am Ufer. " * 8
    chinese = "河流缓慢地流过山谷，两岸的树木静静地站着。" * 20
    emoji = CLEAN + " 🌊🌳 ❤️ — très bien!"
    config = GopherQualityConfig(tokenizer=mode, stop_words=["и", "а", "в", "und", "die", "das"])
    # Cyrillic and accented letters count as letters; Chinese has no spaces, so too few words.
    assert decide(config, russian, german, chinese) == [None, None, "gopher_short_doc"]
    assert decide(GopherQualityConfig(tokenizer=mode), emoji, russian) == [None, "gopher_few_stop_words"]
    assert decide(FineWebQualityConfig(tokenizer=mode), chinese) == [None]  # "。" ends a sentence
    assert decide(C4QualityConfig(tokenizer=mode), chinese) == ["c4_too_few_sentences"]  # no "." "!" "?"


def test_configs_validate():
    assert [c.model_fields["type"].default for c in QUALITY_STEP_CONFIGS] == [
        "gopher_quality", "gopher_repetition", "c4_quality", "fineweb_quality",
    ]  # fmt: skip
    for config in QUALITY_STEP_CONFIGS:
        step = config().build()
        assert isinstance(step, Filter) and step.name == config().type
        with pytest.raises(ValidationError, match="extra"):
            config(min_word=3)
        with pytest.raises(ValidationError):
            config(tokenizer="spacy")
    with pytest.raises(ValidationError):
        GopherQualityConfig(min_doc_words=-1)
    with pytest.raises(ValidationError):
        GopherQualityConfig(type="c4_quality")
    resolved = GopherRepetitionConfig.model_validate({"type": "gopher_repetition", "top_n_grams": {"2": 0.3}})
    assert resolved.resolved()["top_n_grams"] == {"2": 0.3} and resolved.top_n_grams == {2: 0.3}


def test_word_splitter_follows_datatrove():
    words = DatatroveWordSplitter().words
    assert words("Don't stop, Mr. Smith...") == ["Do", "n't", "stop", ",", "Mr.", "Smith", "..."]
    assert words("well-known (see e.g. p. 5) :) $10") == [
        "well", "-", "known", "(", "see", "e.g.", "p.", "5", ")", ":)", "$", "10",
    ]  # fmt: skip
    assert words("Visit https://example.com/a-b or mail me@example.org!") == [
        "Visit", "https://example.com/a-b", "or", "mail", "me@example.org", "!",
    ]  # fmt: skip
    assert words("") == [] and words("  \n ") == []


def test_word_splitter_matches_spacy_on_the_sample():
    spacy = pytest.importorskip("spacy")
    nlp = spacy.blank("en")
    splitter = DatatroveWordSplitter()
    for text in sample_texts()[:60]:
        assert splitter.words(text) == [t.text for t in nlp(text) if t.text.strip()]


def sample_texts() -> list[str]:
    sample = ROOT / "examples" / "sample"
    texts = [json.loads(line)["text"] for line in (sample / "web.jsonl").read_text().splitlines() if line]
    return texts + [p.read_text(encoding="utf-8") for p in sorted((sample / "notes").glob("*.txt"))]


DATATROVE_FIXTURE = ROOT / "tests" / "fixtures" / "quality_datatrove.json"
"""datatrove's own decisions on the sample, these rule cases and near-threshold synthetic documents,
written (with datatrove's version) by ``benchmarks/quality_datatrove_fixture.py``; datatrove itself
is a benchmark dependency only, so the comparison needs no datatrove here."""


def datatrove_fixture() -> tuple[dict, list[str]]:
    fixture = json.loads(DATATROVE_FIXTURE.read_text(encoding="utf-8"))
    texts = []
    for document in fixture["documents"]:
        if "text" in document:
            texts.append(document["text"])
            continue
        path = ROOT / document["origin"]  # a sample document, named by file (and line)
        text = path.read_text(encoding="utf-8")
        if "line" in document:
            text = json.loads(text.splitlines()[document["line"] - 1])["text"]
        assert hashlib.sha256(text.encode()).hexdigest() == document["sha256"], (
            f"{document['origin']} changed: rerun benchmarks/quality_datatrove_fixture.py"
        )
        texts.append(text)
    return fixture, texts


@pytest.mark.parametrize("config", QUALITY_STEP_CONFIGS)
def test_compat_mode_makes_datatroves_decisions(config):
    fixture, texts = datatrove_fixture()
    name = config.model_fields["type"].default
    codes = fixture["reason_codes"][name]
    theirs = [codes.get(d["datatrove"][name], d["datatrove"][name]) for d in fixture["documents"]]
    ours = decide(config(tokenizer="datatrove"), *texts)
    differ = [
        (d["origin"], d.get("line"), a, b, t[:80])
        for d, a, b, t in zip(fixture["documents"], ours, theirs, texts, strict=True)
        if a != b
    ]
    # The same keep/drop decision and the same rule on every document.
    assert not differ, (f"{len(differ)} differ from datatrove {fixture['datatrove']}", differ[:5])


def test_datatrove_fixture_keeps_and_drops_by_several_rules_of_each_filter():
    fixture, texts = datatrove_fixture()
    assert fixture["datatrove"] and len(texts) >= 400
    origins = {d["origin"] for d in fixture["documents"]}
    assert {"crafted", "synthetic", "examples/sample/web.jsonl"} <= origins
    assert set(fixture["reason_codes"]) == {c.model_fields["type"].default for c in QUALITY_STEP_CONFIGS}
    for name, codes in fixture["reason_codes"].items():
        decisions = [d["datatrove"][name] for d in fixture["documents"]]
        assert None in decisions and set(decisions) - {None} == set(codes) and len(codes) >= 3, name
