from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from manifests.data import read_table

from .conftest import ROOT, assert_one_line_error, docs, write_jsonl, write_recipe


def test_demo_corpus_recipe_reads_both_formats_with_source_pointers(cli, store):
    result = cli("--store", store.root, "corpus", "build", "examples/recipes/demo-corpus.yaml")
    assert result.code == 0, result.err
    m = store.resolve("demo-corpus")
    table = read_table(m)
    sources = table.column("source").to_pylist()
    uris = {s["uri"] for s in sources}
    assert "examples/sample/web.jsonl" in uris
    assert any(u.startswith("examples/sample/notes/") for u in uris)
    # The pointer leads back to the exact input line.
    lines = (ROOT / "examples/sample/web.jsonl").read_text().splitlines()
    for row in table.slice(0, 50).to_pylist():
        src = row["source"]
        if src["uri"].endswith(".jsonl"):
            assert json.loads(lines[src["line"] - 1])["text"] == row["text"]
    assert len(set(table.column("id").to_pylist())) == table.num_rows
    funnel = {row["step"]: row for row in m.stats["funnel"]}
    assert funnel["min_words"]["removed"]["too_short"] >= 10
    assert funnel["exact_dedup"]["removed"]["exact_duplicate"] >= 12  # 8 + 4 normalised in JSONL, 3 in notes
    assert m.stats["rows_in"] == 250 and m.stats["rows_out"] == table.num_rows


def test_ledger_records_reasons_and_the_kept_duplicate_without_text(cli, tmp_path, store):
    rows = docs(5) + [{"text": "too short"}] + [{"text": docs(5)[2]["text"].upper() + "  "}]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"stage: corpus.build\nname: c\ninputs: [{{path: {src}}}]\nsteps: [{{type: min_words, min_words: 3}}]\n",
    )
    assert cli("--store", store.root, "corpus", "build", recipe).code == 0
    m = store.resolve("c")
    ledger = pa.concat_tables([pq.read_table(m.location / f.path) for f in m.ledger]).to_pylist()
    reasons = {e["reason"] for e in ledger}
    assert reasons == {"too_short", "exact_duplicate"}
    assert set(ledger[0]) == {"id", "step", "action", "reason", "score", "detail"}
    kept = read_table(m).to_pylist()
    dup = next(e for e in ledger if e["reason"] == "exact_duplicate")
    assert json.loads(dup["detail"])["duplicate_of"] == kept[2]["id"]
    assert all(r["text"] not in json.dumps(ledger) for r in kept)


def test_parquet_input_and_row_pointers(cli, tmp_path, store):
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"body": [d["text"] for d in docs(4)]}), src)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"stage: corpus.build\nname: p\ninputs: [{{path: {src}, format: parquet, text_field: body}}]\nsteps: [{{type: min_words, min_words: 1}}]\n",
    )
    assert cli("--store", store.root, "corpus", "build", recipe).code == 0
    rows = read_table(store.resolve("p")).to_pylist()
    assert [r["source"]["row"] for r in rows] == [0, 1, 2, 3]


def test_malformed_jsonl_names_file_and_line_and_publishes_nothing(cli, tmp_path, store):
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps(docs(1)[0]) + "\n{not json\n")
    recipe = write_recipe(tmp_path / "r.yaml", f"stage: corpus.build\nname: c\ninputs: [{{path: {src}}}]\n")
    result = cli("--store", store.root, "corpus", "build", recipe)
    assert result.code == 2
    assert "bad.jsonl line 2: not valid JSON" in result.err
    assert store.list() == []
    assert not (store.root / "datasets" / "c").exists()  # a failed build leaves no empty name folder


def test_diff_between_two_versions(cli, tmp_path, store):
    src = write_jsonl(tmp_path / "in.jsonl", docs(10) + [{"text": "one two three four"}])
    for min_words in (3, 5):
        recipe = write_recipe(
            tmp_path / "r.yaml",
            f"stage: corpus.build\nname: c\ninputs: [{{path: {src}}}]\nsteps: [{{type: min_words, min_words: {min_words}}}]\n",
        )
        assert cli("--store", store.root, "corpus", "build", recipe).code == 0
    old, new = store.list(kind="dataset")
    result = cli("--store", store.root, "manifests", "diff", old.ref, new.ref)
    assert result.code == 0
    assert "+0 added, -1 removed, 10 kept" in result.out
    assert "recipe steps: " in result.out


def test_trace_of_a_dropped_record_shows_why_and_the_kept_copy(cli, tmp_path, store):
    rows = docs(3)
    src = write_jsonl(tmp_path / "in.jsonl", rows + [rows[1]])
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"stage: corpus.build\nname: c\ninputs: [{{path: {src}}}]\nsteps: [{{type: min_words, min_words: 1}}]\n",
    )
    assert cli("--store", store.root, "corpus", "build", recipe).code == 0
    m = store.resolve("c")
    dropped = pq.read_table(m.location / m.ledger[0].path).to_pylist()[0]
    kept = read_table(m).to_pylist()[1]
    result = cli("--store", store.root, "manifests", "trace", dropped["id"])
    assert result.code == 0
    assert "not in the data" in result.out
    assert "corpus.build.exact_dedup drop (exact_duplicate)" in result.out
    assert kept["id"] in result.out
    result = cli("--store", store.root, "manifests", "trace", kept["id"])
    assert result.code == 0
    assert "source: " in result.out and "in.jsonl line 2" in result.out


def test_url_dedup_keeps_the_first_page_of_each_normalised_url(cli, tmp_path, store):
    rows = [{"text": f"page {i} " + "words " * 5, "url": u} for i, u in enumerate(
        ["https://A.example/x#top", "https://a.example/x", "https://a.example:443/x", "https://a.example/y", None, None])]  # fmt: skip
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"stage: corpus.build\nname: u\ninputs: [{{path: {src}}}]\ndedup: {{url: true}}\n",
    )
    assert cli("--store", store.root, "corpus", "build", recipe).code == 0
    m = store.resolve("u")
    kept = read_table(m).to_pylist()
    assert [r["text"].split()[1] for r in kept] == ["0", "3", "4", "5"]
    ledger = pq.read_table(m.location / "ledger" / "corpus.build.url_dedup.parquet").to_pylist()
    assert [json.loads(e["detail"])["duplicate_of"] for e in ledger] == [kept[0]["id"]] * 2
    assert {r["step"]: r["removed"] for r in m.stats["funnel"]}["url_dedup"] == {"duplicate_url": 2}


def test_line_dedup_cuts_boilerplate_that_recurs_across_documents(cli, tmp_path, store):
    boiler = "Subscribe to our newsletter for weekly updates"
    rows = [
        {"text": f"{boiler}\nUnique story number {i} about gardens and rivers.\nShare this"} for i in range(4)
    ]
    rows.append({"text": f"{boiler}\n{boiler.upper()}"})  # nothing left once the boilerplate goes
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    recipe = write_recipe(tmp_path / "r.yaml", f"stage: corpus.build\nname: l\ninputs: [{{path: {src}}}]\n"
                          "dedup: {lines: {unit: line, max_documents: 2, min_chars: 5}}\n")  # fmt: skip
    result = cli("--store", store.root, "corpus", "build", recipe)
    assert result.code == 0, result.err
    m = store.resolve("l")
    texts = [r["text"] for r in read_table(m).to_pylist()]
    assert texts == [f"Unique story number {i} about gardens and rivers." for i in range(4)]
    ledger = pq.read_table(m.location / "ledger" / "corpus.build.line_dedup.parquet").to_pylist()
    assert [e["action"] for e in ledger] == ["change"] * 4 + ["drop"]
    assert (
        all(0 < e["score"] < 1 for e in ledger[:4]) and json.loads(ledger[0]["detail"])["units_removed"] == 2
    )
    line_row = {r["step"]: r for r in m.stats["funnel"]}["line_dedup"]
    assert line_row["changed"] == 4 and line_row["removed"] == {"all_units_repeated": 1}


def test_a_published_dataset_is_an_input_with_its_rows_kept(cli, tmp_path, store):
    assert cli("--store", store.root, "corpus", "build", "examples/recipes/demo-corpus.yaml").code == 0
    source = store.resolve("demo-corpus")
    recipe = write_recipe(tmp_path / "r.yaml", "stage: corpus.build\nname: again\ninputs: [{dataset: demo-corpus}]\n"
                          "steps: [{type: min_words, min_words: 150}]\n")  # fmt: skip
    assert cli("--store", store.root, "corpus", "build", recipe).code == 0
    again = store.resolve("again")
    assert again.parents[0].id == source.id and again.producer.recipe["inputs"][0]["format"] == "table"
    before = {r["id"]: r for r in read_table(source).to_pylist()}
    rows = read_table(again).to_pylist()
    assert 0 < len(rows) < len(before)
    for row in rows:  # the same records: ids, sources and the language columns kept
        assert (
            row["source"] == before[row["id"]]["source"] and row["language"] == before[row["id"]]["language"]
        )


def test_minhash_dedup_removes_near_duplicates_and_names_the_kept_copy(cli, tmp_path, store):
    base = [
        json.loads(line)["text"] for line in Path("examples/sample/web.jsonl").read_text().splitlines()[:40]
    ]
    base = [t for t in base if len(t.split()) > 60][:10]
    edited = [t.replace(" the ", " a ", 1) + " Updated." for t in base[:4]]  # near copies (Jaccard ~0.9)
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in base + edited])
    recipe = write_recipe(tmp_path / "r.yaml", f"stage: corpus.build\nname: n\ninputs: [{{path: {src}}}]\n"
                          "dedup: {exact: true, minhash: {threshold: 0.7}}\nworkers: 2\nsplit_bytes: 2048\n")  # fmt: skip
    result = cli("--store", store.root, "corpus", "build", recipe)
    assert result.code == 0, result.err
    m = store.resolve("n")
    kept = read_table(m).to_pylist()
    assert [r["text"] for r in kept] == base
    ledger = pq.read_table(m.location / "ledger" / "corpus.build.minhash_dedup.parquet").to_pylist()
    assert [json.loads(e["detail"])["duplicate_of"] for e in ledger] == [r["id"] for r in kept[:4]]
    assert all(0.7 <= e["score"] < 1 for e in ledger)
    assert {r["step"]: r["removed"] for r in m.stats["funnel"]}["minhash_dedup"] == {"near_duplicate": 4}


def test_incremental_dedup_against_an_index_of_an_earlier_dataset(cli, tmp_path, store):
    base = [
        json.loads(line)["text"] for line in Path("examples/sample/web.jsonl").read_text().splitlines()[:30]
    ]
    base = [t for t in base if len(t.split()) > 60][:8]
    old = write_jsonl(tmp_path / "old.jsonl", [{"text": t} for t in base[:5]])
    new = write_jsonl(
        tmp_path / "new.jsonl",
        [{"text": t} for t in base[3:]] + [{"text": base[0].replace(" the ", " a ", 1) + " Edited."}],
    )
    write_recipe(tmp_path / "old.yaml", f"stage: corpus.build\nname: old\ninputs: [{{path: {old}}}]\n")
    assert cli("--store", store.root, "corpus", "build", tmp_path / "old.yaml").code == 0
    result = cli(
        "--store",
        store.root,
        "corpus",
        "dedup-index",
        "old",
        "--name",
        "old-index",
        "--minhash-threshold",
        "0.7",
    )
    assert result.code == 0, result.err
    index = store.resolve("old-index")
    recipe = write_recipe(tmp_path / "new.yaml", f"stage: corpus.build\nname: new\ninputs: [{{path: {new}}}]\n"
                          "dedup: {exact: true, minhash: {threshold: 0.7}, against: [old-index]}\n")  # fmt: skip
    result = cli("--store", store.root, "corpus", "build", recipe)
    assert result.code == 0, result.err
    m = store.resolve("new")
    assert [r["text"] for r in read_table(m).to_pylist()] == base[5:]
    old_ids = {r["text"]: r["id"] for r in read_table(store.resolve("old")).to_pylist()}
    seen = pq.read_table(m.location / "ledger" / "corpus.build.exact_dedup.parquet").to_pylist()
    assert [json.loads(e["detail"]) for e in seen] == [
        {"duplicate_of": old_ids[base[i]], "index": index.ref} for i in (3, 4)
    ]
    near = pq.read_table(m.location / "ledger" / "corpus.build.minhash_dedup.parquet").to_pylist()
    assert json.loads(near[0]["detail"])["duplicate_of"] == old_ids[base[0]] and near[0]["score"] >= 0.7
    assert {p.role for p in m.parents} == {"dedup_index"}

    other = write_recipe(
        tmp_path / "other.yaml", recipe.read_text().replace("threshold: 0.7", "threshold: 0.7, ngram: 3")
    )
    result = cli("--store", store.root, "corpus", "build", other)
    assert result.code == 2 and "was built with other shingle settings" in result.err


def _long_sample_texts(count: int) -> list[str]:
    lines = Path("examples/sample/web.jsonl").read_text().splitlines()[:40]
    return [t for t in (json.loads(line)["text"] for line in lines) if len(t.split()) > 60][:count]


def test_exact_dedup_with_normalize_simplify_drops_a_punctuation_only_copy(cli, tmp_path, store):
    base = _long_sample_texts(3)
    copy = base[1].replace(",", " ,").replace("'", "’").upper() + " !!"  # the same words
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in base + [copy]])
    for name, dedup in (("as-is", "{exact: true}"), ("simple", "{exact: true, normalize: simplify}")):
        recipe = write_recipe(tmp_path / f"{name}.yaml",
                              f"stage: corpus.build\nname: {name}\ninputs: [{{path: {src}}}]\ndedup: {dedup}\n")  # fmt: skip
        assert cli("--store", store.root, "corpus", "build", recipe).code == 0
    assert [r["text"] for r in read_table(store.resolve("as-is")).to_pylist()] == base + [copy]
    simple = store.resolve("simple")
    kept = read_table(simple).to_pylist()
    assert [r["text"] for r in kept] == base
    ledger = pq.read_table(simple.location / "ledger" / "corpus.build.exact_dedup.parquet").to_pylist()
    assert [json.loads(e["detail"])["duplicate_of"] for e in ledger] == [kept[1]["id"]]


def test_a_dedup_index_with_another_normalisation_is_refused_in_one_line(cli, tmp_path, store, monkeypatch):
    import corpus.dedup_index as dedup_index

    base = _long_sample_texts(4)
    old = write_jsonl(tmp_path / "old.jsonl", [{"text": t} for t in base[:2]])
    new = write_jsonl(tmp_path / "new.jsonl", [{"text": t} for t in base[1:]])
    write_recipe(tmp_path / "old.yaml", f"stage: corpus.build\nname: old\ninputs: [{{path: {old}}}]\n")
    assert cli("--store", store.root, "corpus", "build", tmp_path / "old.yaml").code == 0
    index = ["--store", store.root, "corpus", "dedup-index", "old", "--minhash-threshold", "0.7"]
    assert cli(*index, "--name", "idx-none", "--minhash-normalize", "none").code == 0
    recording = dedup_index.settings_of

    def before_normalize(*args):  # what an index recorded before the setting existed
        settings = recording(*args)
        del settings["normalize"], settings["minhash"]["normalize"]
        return settings

    with monkeypatch.context() as patched:
        patched.setattr(dedup_index, "settings_of", before_normalize)
        assert cli(*index, "--name", "idx-older").code == 0
    assert "normalize" not in (store.resolve("idx-older").location / "index" / "settings.json").read_text()

    def build(name: str, dedup: str):
        recipe = write_recipe(tmp_path / f"{name}.yaml",
                              f"stage: corpus.build\nname: {name}\ninputs: [{{path: {new}}}]\ndedup: {dedup}\n")  # fmt: skip
        return cli("--store", store.root, "corpus", "build", recipe)

    for i, idx in enumerate(["idx-none", "idx-older"]):
        result = build(f"refused-{i}", f"{{minhash: {{threshold: 0.7}}, against: [{idx}]}}")
        assert_one_line_error(result)
        err = result.err
        assert (
            f"dedup index {idx}@" in err
            and "minhash (normalize: none; the build has normalize: simplify)" in err
        )
        assert "rebuild the index" in err and "minhash: {normalize: none}" in err
        assert ("predates the setting" in err) == (idx == "idx-older")
        # With the index's normalisation the build uses it: the indexed document is dropped.
        accepted = build(
            f"accepted-{i}", f"{{minhash: {{threshold: 0.7, normalize: none}}, against: [{idx}]}}"
        )
        assert accepted.code == 0, accepted.err
        assert [r["text"] for r in read_table(store.resolve(f"accepted-{i}")).to_pylist()] == base[2:]
    result = build("exact", "{exact: true, normalize: simplify, against: [idx-none]}")
    assert_one_line_error(result)
    assert "was built with normalize: none, the build's dedup has normalize: simplify" in result.err
    assert (
        "rebuild the index with normalize: simplify, or set normalize: none in the build's dedup"
        in result.err
    )


def test_dedup_bad_input_is_one_line(cli, tmp_path, store):
    from manifests.publish import Publisher

    with Publisher(store, kind="dataset", name="notext", stage="t", recipe={}) as pub:
        pub.write_table(pa.table({"id": ["a"], "body": ["x"]}))
        pub.publish()
    for args in (
        ["corpus", "dedup-index", "notext", "--name", "i"],
        ["corpus", "dedup", "notext", "--name", "d"],
    ):
        result = cli("--store", store.root, *args)
        assert result.code == 2 and "lacks column(s) text" in result.err and len(result.err.splitlines()) == 1
    result = cli("--store", store.root, "corpus", "dedup", "nothing", "--name", "d")
    assert result.code == 2 and "no dataset manifest named 'nothing'" in result.err
    result = cli("--store", store.root, "corpus", "dedup", "notext", "--name", "d", "--against", "notext")
    assert result.code == 2


def test_minhash_keep_the_highest_score_of_a_cluster(cli, tmp_path, store):
    base = [
        json.loads(line)["text"] for line in Path("examples/sample/web.jsonl").read_text().splitlines()[:30]
    ]
    base = [t for t in base if len(t.split()) > 60][:3]
    near = base[0].replace(" the ", " a ", 1) + " Edited."
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in base] + [{"text": near}])
    recipe = write_recipe(tmp_path / "r.yaml", f"stage: corpus.build\nname: s\ninputs: [{{path: {src}}}]\n"
                          "steps: [{type: language}]\n"
                          "dedup: {minhash: {threshold: 0.7, keep: score, score_column: language_score}}\n")  # fmt: skip
    assert cli("--store", store.root, "corpus", "build", recipe).code == 0
    rows = read_table(store.resolve("s")).to_pylist()
    assert len(rows) == 3
    scores = {r["text"]: r["language_score"] for r in rows}
    assert (near in scores) != (base[0] in scores)
    bad = write_recipe(tmp_path / "b.yaml", recipe.read_text().replace(", score_column: language_score", ""))
    result = cli("--store", store.root, "corpus", "build", bad)
    assert result.code == 2 and "needs 'score_column'" in result.err


def test_a_lone_surrogate_escape_in_a_jsonl_line_becomes_a_replacement_character(cli, tmp_path, store):
    source = tmp_path / "web.jsonl"
    words = " ".join(["word"] * 30)
    source.write_text(
        f'{{"text": "{words} broken \\ud800 here"}}\n{{"text": "{words} fine \\ud83d\\ude00"}}\n'
    )
    recipe = write_recipe(
        tmp_path / "r.yaml", f"stage: corpus.build\nname: s\ninputs: [{{path: {source}}}]\n"
    )
    result = cli("--store", store.root, "corpus", "build", recipe)
    assert result.code == 0, result.err
    texts = sorted(r["text"] for r in read_table(store.resolve("s")).to_pylist())
    assert texts[0].endswith("broken \ufffd here") and texts[1].endswith("fine \U0001f600")
