"""synth.preferences: candidates, a judge asked in both orders, a reward model, chosen/rejected pairs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from manifests.data import read_table
from synth.preferences import judge_letter, pairwise_scores
from synth.serve import FaultOptions, ServeOptions, Server
from synth.teacher import Answer

from .conftest import ROOT, assert_one_line_error, corpus_recipe, docs, write_jsonl, write_recipe

pytestmark = pytest.mark.network


class Scripted:
    """Candidates: ``variant <seed % distinct>`` padded to a length that grows with the seed. Judge
    prompts: ``judge`` decides from the two answers (longer wins), or always says ``A``."""

    fingerprint = "fp_scripted"
    chat_template = True

    def __init__(self, judge: str = "longer", distinct: int = 3):
        self.judge, self.distinct = judge, distinct

    def generate(self, prompts, max_tokens, temperature, top_p, seeds):
        out = []
        for prompt, seed in zip(prompts, seeds, strict=True):
            text = prompt[-1]["content"]
            if "[Answer A]" in text:
                a, b = re.search(r"\[Answer A\]\n(.*)\n\n\[Answer B\]\n(.*)\n\nWhich", text, re.S).groups()
                reply = (
                    "A"
                    if self.judge == "always-a"
                    else ("A" if len(a) > len(b) else "B" if len(b) > len(a) else "T")
                )
            else:
                k = seed % self.distinct
                reply = f"variant {k} " + "more " * k
            out.append(Answer(reply.strip(), len(text.split()), len(reply.split()), "stop"))
        return out


@pytest.fixture
def corpus(cli, tmp_path, store) -> int:
    source = write_jsonl(tmp_path / "docs.jsonl", docs(12))
    assert cli("--store", store.root, "corpus", "build", corpus_recipe(tmp_path, source)).code == 0
    return read_table(store.resolve("c")).num_rows


def _server(backend, **faults) -> Server:
    return Server("scripted", backend, "127.0.0.1", 0, ServeOptions(), FaultOptions(**faults))


def _recipe(tmp_path: Path, url: str, extra: str = "", candidates: int = 3) -> Path:
    teacher = f"{{model: scripted, base_url: '{url}', backoff: 0.05}}"
    return write_recipe(
        tmp_path / "p.yaml",
        f"stage: synth.preferences\nname: p\ninput: c\ncandidates: {candidates}\n"
        f"teachers: [{teacher[:-1]}, name: policy}}, {teacher[:-1]}, name: judge}}]\n"
        "candidate_teachers: [policy]\nsampling: {temperature: 0.8, max_tokens: 16}\n"
        f"score: {{method: judge, judge: judge}}\n{extra}",
    )


def test_judge_in_both_orders_picks_the_better_answer(cli, tmp_path, store, corpus):
    log = tmp_path / "log.jsonl"
    with _server(Scripted(), request_log=log) as server:
        result = cli("--store", store.root, "synth", "preferences", _recipe(tmp_path, server.url))
        assert result.code == 0, result.err
        requests = len(log.read_text().splitlines())
        # A rerun pays for nothing: every request is in the cache (keyed by endpoint, model, messages...).
        assert cli("--store", store.root, "synth", "preferences", _recipe(tmp_path, server.url)).code == 0
    assert len(log.read_text().splitlines()) == requests == corpus * (3 + 6)
    rows = read_table(store.resolve("p")).to_pylist()
    assert len(rows) == corpus
    for row in rows:
        assert row["chosen"][0]["content"] == "variant 2 more more"  # the longest: it wins every comparison
        assert row["rejected"][0]["content"] == "variant 0"
        assert row["score_chosen"] == 1.0 and row["score_rejected"] == 0.0 and row["margin"] == 1.0
        assert row["prompt"][-1]["role"] == "user" and row["chosen_teacher"] == "policy"
        assert json.loads(row["verdict"])["position_bias_splits"] == 0
        # 3 candidates + 3 pairs x 2 orders of judge requests, all in the lineage
        teachers = {r["teacher"] for r in row["requests"]}
        assert len(row["requests"]) == 3 + 6 and teachers == {"policy", "judge"}


def test_a_judge_that_always_prefers_the_first_answer_gives_no_pair(cli, tmp_path, store, corpus):
    with _server(Scripted(judge="always-a")) as server:
        result = cli("--store", store.root, "synth", "preferences", _recipe(tmp_path, server.url))
    # Every comparison splits (A then A): all ties, no margin, nothing to publish.
    assert_one_line_error(result, code=1)
    assert "no_margin" in result.err


def test_identical_candidates_never_make_a_pair(cli, tmp_path, store, corpus):
    with _server(Scripted(distinct=1)) as server:
        result = cli("--store", store.root, "synth", "preferences", _recipe(tmp_path, server.url))
    assert_one_line_error(result, code=1)
    assert "too_few_distinct_candidates" in result.err


def test_min_margin_drops_close_calls_into_the_ledger(cli, tmp_path, store, corpus):
    # With 2 distinct texts among 4 candidates (seeds 0..3 -> variants 0,1,0,1) the winner scores 1
    # and a margin above 1 is impossible: every prompt is dropped, and the run says why.
    with _server(Scripted(distinct=2)) as server:
        result = cli("--store", store.root, "synth", "preferences",
                     _recipe(tmp_path, server.url, extra="min_margin: 1.5\n", candidates=4))  # fmt: skip
    assert_one_line_error(result, code=1)
    with _server(Scripted(distinct=2)) as server:
        assert cli("--store", store.root, "synth", "preferences",
                   _recipe(tmp_path, server.url, extra="min_margin: 1.0\n", candidates=4)).code == 0  # fmt: skip
    m = store.resolve("p")
    assert m.stats["rows_out"] == corpus and not (m.location / "ledger").exists()


def test_scores_from_both_order_verdicts():
    # 0 beats 1 in both orders; 0 vs 2 splits (position bias); 1 vs 2 is a tie.
    verdicts = {(0, 1): ("A", "B"), (0, 2): ("A", "A"), (1, 2): ("T", "T")}
    assert pairwise_scores(3, verdicts) == [0.75, 0.25, 0.5]
    assert [judge_letter(t) for t in ("A", "b.", "Answer: B", "T", "neither", None)] == [
        "A",
        "B",
        "B",
        "T",
        None,
        None,
    ]


def test_reward_model_scores_choose_the_pair(cli, tmp_path, store, corpus):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    from manifests.models import CHECKPOINT_DIR
    from manifests.publish import Publisher

    vocab = {
        w: i for i, w in enumerate(["<pad>", "<unk>", "variant", "more", "0", "1", "2", "user", "assistant"])
    }
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=0)  # fmt: skip
    model = LlamaForSequenceClassification(config)
    with Publisher(store, kind="run", name="rm", stage="test", recipe={}) as pub:
        model.save_pretrained(pub.dir / CHECKPOINT_DIR)
        tokenizer.save_pretrained(pub.dir / CHECKPOINT_DIR)
        pub.publish(stats={})
    text = _recipe(tmp_path, "URL").read_text().replace("score: {method: judge, judge: judge}",
                                                          "score: {method: reward_model, reward_model: rm}\nmin_margin: 0.0")  # fmt: skip
    with _server(Scripted()) as server:
        recipe = write_recipe(tmp_path / "rm.yaml", text.replace("URL", server.url))
        result = cli("--store", store.root, "synth", "preferences", recipe)
    assert result.code == 0, result.err
    model.eval()

    def reward(prompt: str, answer: str) -> float:
        batch = tokenizer(prompt + "\n" + answer, return_tensors="pt")
        with torch.inference_mode():
            return float(model(**batch).logits[0, 0])

    for row in read_table(store.resolve("p")).to_pylist():
        prompt = row["prompt"][-1]["content"]
        scores = {
            f"variant {k} " + "more " * k: reward(prompt, (f"variant {k} " + "more " * k).strip())
            for k in range(3)
        }
        best = max(scores, key=scores.get).strip()
        assert row["chosen"][0]["content"] == best
        assert row["score_chosen"] == pytest.approx(max(scores.values()), abs=1e-4)


def test_bad_recipes_are_one_line(cli, tmp_path, store, corpus):
    recipe = _recipe(tmp_path, "http://127.0.0.1:9/v1").read_text()
    cases = {
        "score: {method: judge, judge: nobody}": "no teacher named 'nobody'",
        "score: {method: reward_model}": "needs 'reward_model'",
        "score: {method: judge, judge: judge}\nprompt_column: question": "lacks column(s) question",
        # Found before a candidate is paid for (they once were: a traceback, or an error after the run).
        "score: {method: verifier, verifier: fuzzy, reference_column: text}": "'score.verifier'",
        "score: {method: reward_model, reward_model: nothing}": "no run manifest named 'nothing'",
    }
    for replacement, message in cases.items():
        path = write_recipe(
            tmp_path / "bad.yaml", recipe.replace("score: {method: judge, judge: judge}", replacement)
        )
        result = cli("--store", store.root, "synth", "preferences", path)
        assert_one_line_error(result)
        assert message in result.err, result.err


def test_the_example_recipe_runs_with_its_teachers_pointed_at_a_loopback_server(cli, store, corpus):
    with _server(Scripted()) as server:
        teacher = f"{{model: scripted, base_url: '{server.url}'}}"
        teachers = f"[{teacher[:-1]}, name: policy}}, {teacher[:-1]}, name: judge}}]"
        result = cli("--store", store.root, "synth", "preferences", ROOT / "examples/recipes/synth-preferences.yaml",
                     "--set", "input=c", "--set", f"teachers={teachers}")  # fmt: skip
    assert result.code == 0, result.err
    m = store.resolve("demo-prefs")
    assert m.stats["rows_out"] == corpus and m.producer.recipe["candidates"] == 2


def test_verifier_scores_pick_the_verified_candidate(cli, tmp_path, store):
    questions = write_jsonl(
        tmp_path / "qa.jsonl", [{"text": f"question {i}", "answer": "variant 1 more"} for i in range(4)]
    )
    text = (
        _recipe(tmp_path, "URL")
        .read_text()
        .replace("input: c", f"input: {questions}")
        .replace(
            "score: {method: judge, judge: judge}",
            "score: {method: verifier, verifier: exact}\nmin_margin: 1.0",
        )
    )
    with _server(Scripted()) as server:
        result = cli("--store", store.root, "synth", "preferences",
                     write_recipe(tmp_path / "v.yaml", text.replace("URL", server.url)))  # fmt: skip
    assert result.code == 0, result.err
    rows = read_table(store.resolve("p")).to_pylist()
    assert len(rows) == 4
    for row in rows:
        assert row["chosen"][0]["content"] == "variant 1 more"  # the only one equal to the reference
        assert row["rejected"][0]["content"] == "variant 0" and row["margin"] == 1.0
        assert json.loads(row["verdict"])["verified"] == [False, True, False]


def test_the_judge_sees_candidates_and_prompt_exactly_as_written(cli, tmp_path, store):
    # Placeholders are filled in one pass: a prompt holding "{a}" or a candidate holding "{b}" (code,
    # format strings) once had the other candidate pasted into it before the judge saw it.
    seen: list[str] = []

    class Braces(Scripted):
        def generate(self, prompts, max_tokens, temperature, top_p, seeds):
            seen.extend(p[-1]["content"] for p in prompts if "[Answer A]" in p[-1]["content"])
            return super().generate(prompts, max_tokens, temperature, top_p, seeds)

    source = write_jsonl(tmp_path / "p.jsonl", [{"text": "Print f'{a}' and f'{b}' in Python"}])
    text = _recipe(tmp_path, "URL", candidates=2).read_text().replace("input: c", f"input: {source}")
    with _server(Braces()) as server:
        result = cli("--store", store.root, "synth", "preferences",
                     write_recipe(tmp_path / "b.yaml", text.replace("URL", server.url)), "--set", "min_margin=0")  # fmt: skip
    assert result.code == 0, result.err
    assert len(seen) == 2
    for judged in seen:
        assert "[Request]\nPrint f'{a}' and f'{b}' in Python\n" in judged
        assert judged.count("variant") == 2
