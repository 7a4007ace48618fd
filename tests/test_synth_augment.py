"""synth.augment: paraphrase, Evol-Instruct (mutations, the four elimination rules), Self-Instruct (ROUGE-L)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from manifests.data import read_table
from manifests.recipes import read_recipe
from synth.augment import HOW, MUTATIONS
from synth.rouge import RougeLIndex, rouge_l, tokens
from synth.serve import FaultOptions, ServeOptions, Server
from synth.teacher import Answer

from .conftest import assert_one_line_error, corpus_recipe, write_jsonl, write_recipe

pytestmark = pytest.mark.network

VOCAB = [f"{a}{b}" for a in ("zor", "quil", "mav", "tesk", "brun", "fial", "gond", "wex") for b in "aeiouy"]


def _given(text: str) -> str:
    return re.search(r"#Given Prompt#:\n(.*?)\n\n#", text, re.S).group(1)


class Scripted:
    """Answers each kind of augment request by rule. Words planted in an instruction pick a bad
    evolution: LEAK, SORRY, STOPWORDS, IDENT, SAME (no gain: the judge says no), NOANSWER."""

    fingerprint = "fp_scripted"
    chat_template = True

    def reply(self, text: str, seed: int) -> str:
        if text.startswith("Reword the instruction"):
            instruction = text.split("Instruction: ", 1)[1]
            return instruction if "ECHO" in instruction else f"Kindly {instruction.lower()} (take {seed % 2})"
        if "#Given Prompt#:" in text:
            given = _given(text)
            mutation = (
                "breadth" if "#Created Prompt#" in text else next(m for m, h in HOW.items() if h in text)
            )
            bad = {"LEAK": f"#Rewritten Prompt#: {given} with care", "SORRY": "Sorry, I cannot rewrite this prompt.",
                   "STOPWORDS": "The of and, to a!", "IDENT": given, "SAME": f"{given} and so on"}  # fmt: skip
            planted = next((w for w in bad if w in given), None)
            return bad[planted] if planted else f"{given} Also {mutation} (level {given.count('Also') + 1})."
        if "Answer yes or no." in text:
            second = text.split("Second instruction:\n", 1)[1]
            return "No." if "SAME" in second else "Yes, it adds a requirement."
        if "Continue the list with" in text:
            first = re.search(r"^1\. (.*)$", text, re.M).group(1).split()
            near = " ".join(first[:-1] + ["quickly"])
            rng = random.Random(seed)
            novel = [f"Describe {' '.join(rng.sample(VOCAB, 6))}." for _ in range(2)]
            return (
                f"{near}\n10. {novel[0]}\n11. Draw a picture of a quiet harbour\n12. Hi there\n13. {novel[1]}"
            )
        return (
            "Sorry, I can't help with that."
            if "NOANSWER" in text
            else f"Here is a careful answer about {text[:30]}"
        )

    def generate(self, prompts, max_tokens, temperature, top_p, seeds):
        return [
            Answer(r, len(p[-1]["content"].split()), len(r.split()), "stop")
            for p, seed in zip(prompts, seeds, strict=True)
            for r in [self.reply(p[-1]["content"], seed)]
        ]


def _server(log: Path | None = None) -> Server:
    return Server("scripted", Scripted(), "127.0.0.1", 0, ServeOptions(), FaultOptions(request_log=log))


def _instructions(cli, tmp_path, store, texts: list[str], name: str = "c") -> None:
    source = write_jsonl(tmp_path / f"{name}.jsonl", [{"text": t} for t in texts])
    assert cli("--store", store.root, "corpus", "build", corpus_recipe(tmp_path, source, name)).code == 0


def _augment(cli, tmp_path, store, url, method, extra="", name="a", input_="c", teacher=""):
    recipe = write_recipe(
        tmp_path / f"{name}.yaml",
        f"stage: synth.augment\nname: {name}\ninput: {input_}\n"
        f"teachers: [{{model: scripted, base_url: '{url}'{teacher}}}]\n"
        f"sampling: {{temperature: 0.8, max_tokens: 64}}\nmethod: {method}\n{extra}",
    )
    return cli("--store", store.root, "synth", "augment", recipe)


def _ledger(store, name: str = "a") -> list[dict]:
    manifest = store.resolve(name)
    return [r for f in manifest.ledger for r in pq.read_table(manifest.location / f.path).to_pylist()]


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


PLAIN = ["Explain how tides work on the coast", "Write a short poem about autumn leaves",
         "List three uses of baking soda at home"]  # fmt: skip


def test_rouge_l_matches_a_hand_computed_value_and_plain_dynamic_programming():
    # LCS of "the cat sat on the mat" / "the cat lay on a mat" is "the cat on mat": 4 of 6 and 6 tokens.
    assert rouge_l("The cat sat on the mat.", "the cat lay on a mat") == pytest.approx(2 * 4 / 12)
    assert rouge_l("", "anything") == 0.0 and rouge_l("same words", "Same, words!") == 1.0

    def lcs(a: list[str], b: list[str]) -> int:
        table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i, x in enumerate(a):
            for j, y in enumerate(b):
                table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
        return table[-1][-1]

    rng = random.Random(1)
    pool = [" ".join(rng.choice("abcdef") for _ in range(rng.randint(1, 150))) for _ in range(40)]
    index = RougeLIndex()
    for text in pool:
        index.add(text)  # texts longer than 64 and 128 tokens: carries across machine words
    for _ in range(10):
        query = " ".join(rng.choice("abcdefg") for _ in range(rng.randint(1, 90)))
        expected = [2 * lcs(tokens(query), tokens(p)) / (len(tokens(query)) + len(tokens(p))) for p in pool]
        assert index.scores(query).tolist() == pytest.approx(expected)


def test_paraphrase_drops_copies_of_the_source_and_of_each_other(cli, tmp_path, store):
    _instructions(cli, tmp_path, store, PLAIN + ["ECHO repeat this instruction please"])
    with _server() as server:
        result = _augment(cli, tmp_path, store, server.url, "{type: paraphrase, n: 4}")
    assert result.code == 0, result.err
    rows = read_table(store.resolve("a")).to_pylist()
    # Seeds 0..3 give two distinct takes per instruction: two rows each, two duplicates each.
    assert len(rows) == 6 and {r["sample_index"] for r in rows} == {0, 1}
    assert all(r["method"] == "paraphrase" and r["prompt"].startswith("Kindly") for r in rows)
    assert all(r["prompt"].lower().startswith("kindly " + r["original"].lower()) for r in rows)
    reasons = sorted(e["reason"] for e in _ledger(store))
    assert reasons == ["duplicate"] * 6 + ["same_as_source"] * 4
    sources = {r["id"]: r["text"] for r in read_table(store.resolve("c")).to_pylist()}
    assert all(sources[r["parents"][0]] == r["original"] for r in rows)


def test_paraphrase_of_conversations_keeps_their_answers(cli, tmp_path, store):
    _instructions(cli, tmp_path, store, PLAIN)
    with _server() as server:
        chat = write_recipe(
            tmp_path / "chat.yaml",
            f"stage: synth.generate\nname: chat\ninput: c\nprompt_template: '{{text}}'\n"
            f"teachers: [{{model: scripted, base_url: '{server.url}'}}]\n",
        )
        assert cli("--store", store.root, "synth", "generate", chat).code == 0
        method = "{type: paraphrase, n: 2, keep_answer: true}"
        result = _augment(
            cli, tmp_path, store, server.url, method, "prompt_column: messages\n", input_="chat"
        )
    assert result.code == 0, result.err
    rows = read_table(store.resolve("a")).to_pylist()
    assert len(rows) == 6
    for row in rows:
        user, assistant = row["messages"]
        assert user == {"role": "user", "content": row["prompt"]} and assistant["role"] == "assistant"
        assert assistant["content"].startswith("Here is a careful answer about " + row["original"][:10])


def test_evol_instruct_records_a_deterministic_mutation_per_row_and_round(cli, tmp_path, store):
    _instructions(cli, tmp_path, store, PLAIN)
    log = tmp_path / "log.jsonl"
    with _server(log) as server:
        method = "{type: evol_instruct, rounds: 3, information_gain: heuristic}"
        assert _augment(cli, tmp_path, store, server.url, method, "answer: true\n").code == 0
        first = store.resolve("a")
        sent = len(_log(log))
        assert _augment(cli, tmp_path, store, server.url, method, "answer: true\n").code == 0
    assert len(_log(log)) == sent == 3 * 3 * 2  # evolution + answer per row and round; the rerun sent none
    rows = read_table(first).to_pylist()
    assert len(rows) == 9
    by_row: dict[str, list[dict]] = {}
    for row in sorted(rows, key=lambda r: r["round"]):
        by_row.setdefault(row["parents"][0], []).append(row)
    for rid, chain in by_row.items():
        for round_, row in enumerate(chain, 1):
            # Drawn from (seed, row id, round) alone, and the template of that mutation was the one sent.
            assert row["mutation"] == random.Random(f"0:{rid}:{round_}").choice(MUTATIONS)
            assert row["prompt"].endswith(f"Also {row['mutation']} (level {round_}).")
            assert row["mutations"] == [r["mutation"] for r in chain[:round_]]
            assert row["evolved_from"] == (chain[round_ - 2]["prompt"] if round_ > 1 else row["original"])
            assert row["messages"][0]["content"] == row["prompt"]
            assert len(row["requests"]) == round_ + 1  # the evolutions it was made by, and its answer
    assert {r["mutation"] for r in rows} != {rows[0]["mutation"]}


def test_each_elimination_rule_drops_its_planted_evolution_with_the_reason(cli, tmp_path, store):
    planted = ["LEAK explain how tides work", "SORRY describe a rainy day", "STOPWORDS name three rivers",
               "IDENT summarise the plot of Hamlet", "SAME compare cats and dogs", "NOANSWER plan a picnic menu"]  # fmt: skip
    _instructions(cli, tmp_path, store, PLAIN + planted)
    method = "{type: evol_instruct, rounds: 1, information_gain: teacher}"
    with _server() as server:
        assert _augment(cli, tmp_path, store, server.url, method, "answer: true\n").code == 0
    rows = read_table(store.resolve("a")).to_pylist()
    assert sorted(r["original"] for r in rows) == sorted(PLAIN)
    texts = {r["id"]: r["text"] for r in read_table(store.resolve("c")).to_pylist()}
    got = {texts[e["id"]].split()[0]: (e["reason"], json.loads(e["detail"])) for e in _ledger(store)}
    assert {k: v[0] for k, v in got.items()} == {
        "LEAK": "prompt_leak", "SORRY": "teacher_failed", "STOPWORDS": "no_content",
        "IDENT": "no_information_gain", "SAME": "no_information_gain", "NOANSWER": "teacher_failed",
    }  # fmt: skip
    assert got["SORRY"][1]["what"] == "evolution" and got["SORRY"][1]["why"] == "refusal"
    assert (got["NOANSWER"][1]["what"], got["NOANSWER"][1]["why"]) == ("answer", "refusal")
    assert got["SAME"][1]["by"] == "teacher" and got["IDENT"][1]["by"] == "identical"
    assert got["LEAK"][1]["words"] == "rewritten prompt" and got["LEAK"][1]["round"] == 1
    # The ledger names the requests of each drop: the judge's "no" is among them, and no answer was asked.
    assert len(got["SAME"][1]["requests"]) == 2 and len(got["NOANSWER"][1]["requests"]) == 3

    # The free heuristic also finds no gain in an evolution that adds only stop words.
    with _server() as server:
        method = "{type: evol_instruct, rounds: 1, information_gain: heuristic}"
        assert _augment(cli, tmp_path, store, server.url, method, name="h").code == 0
    same = [e for e in _ledger(store, "h") if texts[e["id"]].startswith("SAME")]
    assert [(e["reason"], json.loads(e["detail"])["by"]) for e in same] == [
        ("no_information_gain", "heuristic")
    ]


def test_self_instruct_keeps_novel_instructions_rejects_near_copies_and_stops_at_target(cli, tmp_path, store):
    _instructions(cli, tmp_path, store, PLAIN + ["Give two reasons to learn to swim as an adult"])
    log = tmp_path / "log.jsonl"
    method = "{type: self_instruct, target_size: 5, requests_per_round: 2, examples: 3, machine_examples: 1}"
    with _server(log) as server:
        assert _augment(cli, tmp_path, store, server.url, method, "answer: true\n").code == 0
        first, sent = store.resolve("a"), len(_log(log))
        assert _augment(cli, tmp_path, store, server.url, method, "answer: true\n").code == 0
        second = store.resolve("a")
        assert _augment(cli, tmp_path, store, server.url, method, "answer: true\n").code == 0
        third = store.resolve("a")
    # Rounds of 2 requests, 2 novel instructions each: 4 after round 0, the fifth in round 1.
    assert sent == 2 * 2 + 4 + 1 and len(_log(log)) == sent  # generations + answers; reruns sent nothing
    assert third.id == second.id and second.stats["requests"]["cache_hits"] == sent
    strip = [
        {**r, "requests": [{**q, "cache_hit": None} for q in r["requests"]]}
        for r in read_table(first).to_pylist()
    ]
    assert strip == [{**r, "requests": [{**q, "cache_hit": None} for q in r["requests"]]}
                     for r in read_table(second).to_pylist()]  # fmt: skip
    rows = read_table(first).to_pylist()
    assert len(rows) == 5 and all(r["prompt"].startswith("Describe ") for r in rows)
    assert sorted(r["round"] for r in rows) == [0, 0, 0, 0, 1]
    seeds = {r["id"] for r in read_table(store.resolve("c")).to_pylist()}
    made = {r["id"] for r in rows}
    for row in rows:  # in-context examples: seeds (the traceable parents) and earlier rows of this dataset
        assert set(row["parents"]) == set(row["examples"]) & seeds and set(row["examples"]) <= seeds | made
        assert row["messages"][1]["content"].startswith("Here is a careful answer")
    assert any(set(r["examples"]) & made for r in rows if r["round"] == 1)
    ledger = _ledger(store)
    reasons = {e["reason"] for e in ledger}
    assert reasons == {"too_similar", "banned_word", "too_short", "over_target"}
    similar = [e for e in ledger if e["reason"] == "too_similar"]
    assert len(similar) == 4 and all(0.7 <= e["score"] < 1 for e in similar)  # one per request
    assert all(json.loads(e["detail"])["nearest"] in seeds | made for e in similar)


def test_self_instruct_stopped_by_the_budget_resumes_without_paying_twice(cli, tmp_path, store):
    _instructions(cli, tmp_path, store, PLAIN)
    log = tmp_path / "log.jsonl"
    method = "{type: self_instruct, target_size: 6, requests_per_round: 1, examples: 2}"
    with _server(log) as server:
        prices = ", price_input: 1000, price_output: 1000, max_concurrency: 1"
        result = _augment(
            cli, tmp_path, store, server.url, method, "budget: {max_cost: 0.3}\n", teacher=prices
        )
        assert_one_line_error(result, code=1)
        assert "budget reached after" in result.err and store.list(kind="dataset") == [store.resolve("c")]
        spent = len(_log(log))
        assert 0 < spent < 3
        assert _augment(cli, tmp_path, store, server.url, method, teacher=prices).code == 0
    keys = [e["key"] for e in _log(log)]
    assert len(keys) == len(set(keys)) == 3 and read_table(store.resolve("a")).num_rows == 6


def test_a_missing_prompt_column_is_one_clear_error(cli, tmp_path, store):
    _instructions(cli, tmp_path, store, PLAIN)
    result = _augment(
        cli, tmp_path, store, "http://127.0.0.1:9/v1", "{type: paraphrase}", "prompt_column: question\n"
    )
    assert_one_line_error(result, code=2)
    assert "lacks column(s) question" in result.err and store.list(kind="dataset") == [store.resolve("c")]
    result = _augment(
        cli,
        tmp_path,
        store,
        "http://127.0.0.1:9/v1",
        "{type: self_instruct, examples: 2, machine_examples: 3}",
    )
    assert_one_line_error(result, code=2)
    assert "'machine_examples' cannot exceed 'examples'" in result.err


@pytest.mark.parametrize(
    "recipe, rows",
    [
        ("synth-augment-paraphrase.yaml", 48),
        ("synth-augment-evol.yaml", 48),
        ("synth-augment-self-instruct.yaml", 40),
    ],
)
def test_example_recipe_runs(cli, store, recipe, rows):
    assert cli("--store", store.root, "corpus", "build", "examples/recipes/seed-instructions.yaml").code == 0
    assert read_table(store.resolve("seed-instructions")).num_rows == 24
    with _server() as server:
        teachers = f"teachers=[{{model: scripted, base_url: '{server.url}'}}]"
        result = cli(
            "--store", store.root, "synth", "augment", f"examples/recipes/{recipe}", "--set", teachers
        )
    assert result.code == 0, result.err
    manifest = store.resolve(read_recipe(f"examples/recipes/{recipe}")["name"])
    assert manifest.stats["rows_out"] == rows


def test_self_instruct_shows_examples_with_braces_as_written(cli, tmp_path, store):
    # The template's {n} and {next} are filled in one pass with {examples}: a seed that holds "{n}"
    # (a format string) once had the count pasted into it.
    seed = "Fill in the template 'Row {n} of {next}' for rows one to three"
    _instructions(cli, tmp_path, store, [seed, PLAIN[0]])
    asked: list[str] = []

    class Recording(Scripted):
        def reply(self, text: str, seed: int) -> str:
            asked.append(text)
            return super().reply(text, seed)

    server = Server("scripted", Recording(), "127.0.0.1", 0, ServeOptions(), FaultOptions())
    method = "{type: self_instruct, target_size: 1, requests_per_round: 1, examples: 2}"
    with server:
        assert _augment(cli, tmp_path, store, server.url, method).code == 0
    assert seed in asked[0] and "Continue the list with 8 new tasks, numbered from 3" in asked[0]
