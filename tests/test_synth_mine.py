"""``synth.mine``: each score against a direct computation, selection rules exact, bad input one line.

The student's sampled answers come from the echo server (no model: the question's words shuffled by the
request's seed), so which sample is right is computed here independently; loss, KL and entropy come
from tiny random-init models of the tests' word tokenizer, checked against their own forward passes.
"""

from __future__ import annotations

import itertools
import json
import random
import re

import pytest

from manifests.data import read_table
from manifests.errors import DistilleryError
from manifests.recipes import parse_config
from manifests.store import Store
from synth.mine import MineConfig, mine
from synth.selection import Candidate, Rules, combine, ngrams, pass_at_k, percentile_ranks, select
from synth.serve import EchoModel, start_server

from .conftest import WORDS, assert_one_line_error, tiny_tokenizer, write_jsonl, write_recipe
from .test_train_distill import llama, publish_model

# ---------------------------------------------------------------------------------------------- selection


def test_pass_at_k_is_the_chance_that_k_drawn_samples_hold_a_right_one():
    for n, c, k in [(4, 0, 1), (4, 1, 1), (4, 2, 2), (5, 3, 2), (6, 1, 3), (3, 3, 3)]:
        draws = list(itertools.combinations([True] * c + [False] * (n - c), k))
        assert pass_at_k(n, c, k) == pytest.approx(sum(any(d) for d in draws) / len(draws))
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_several_scores_combine_as_weighted_percentile_ranks():
    assert percentile_ranks([3.0, 1.0, 2.0, 2.0]) == [1.0, 0.0, 0.5, 0.5]
    assert combine({"loss": [2.5, 0.1]}, {"loss": 1.0}) == [2.5, 0.1]  # one score: as it is
    mixed = combine({"loss": [9.0, 1.0, 5.0], "pass_at_k": [0.0, 1.0, 0.5]}, {"loss": 3.0, "pass_at_k": 1.0})
    assert mixed == pytest.approx([(3 * 1.0 + 0.0) / 4, (0.0 + 1.0) / 4, (3 * 0.5 + 0.5) / 4])


def cands(*specs) -> list[Candidate]:
    return [
        Candidate(f"c{i}", score, tokens, stratum, text)
        for i, (score, tokens, stratum, text) in enumerate(specs)
    ]


def chosen(decisions) -> set[str]:
    return {k for k, d in decisions.items() if d.chosen}


def test_a_token_budget_keeps_the_best_that_fit_and_skips_a_dear_one_for_a_cheaper_one():
    pool = cands(
        (0.9, 60, "", ""), (0.8, 50, "", ""), (0.7, 30, "", ""), (0.6, 10, "", ""), (0.5, 10, "", "")
    )
    decisions = select(pool, Rules(teacher_tokens=100))
    # 0.9 (60) fits; 0.8 (50) would pass 100 and is skipped; 0.7 (30) fits; 0.6 (10) fits: 100 exactly.
    assert chosen(decisions) == {"c0", "c2", "c3"}
    assert sum(c.tokens for c in pool if c.id in chosen(decisions)) == 100
    assert decisions["c1"].reason == "over the teacher-token budget" and decisions["c1"].rank == 2
    assert chosen(select(pool, Rules(teacher_tokens=59))) == {"c1"}  # 60 never fits; 50 leaves 9: no 10 fits


def test_strata_share_the_budget_and_give_back_what_they_cannot_use():
    # Stratum a's scores are all higher: unstratified it would take the whole budget.
    pool = cands((0.9, 10, "a", ""), (0.8, 10, "a", ""), (0.7, 10, "a", ""), (0.6, 10, "a", ""),
                 (0.2, 10, "b", ""), (0.1, 10, "b", ""))  # fmt: skip
    flat = [Candidate(c.id, c.score, c.tokens) for c in pool]
    assert chosen(select(flat, Rules(teacher_tokens=40))) == {"c0", "c1", "c2", "c3"}
    # Proportional shares: a 4/6 of 40 (two of 10), b 2/6 (one); the 10 both leave go to a's next best.
    assert chosen(select(pool, Rules(teacher_tokens=40))) == {"c0", "c1", "c2", "c4"}
    equal = select(pool, Rules(teacher_tokens=40, strata="equal"))
    assert chosen(equal) == {"c0", "c1", "c4", "c5"}
    # b has 2 candidates (20 tokens) but a 3/4 share of 40 = 30: its 10 unused go back to a's best left.
    weighted = select(pool, Rules(teacher_tokens=40, strata="weights", stratum_weights={"a": 1, "b": 3}))
    assert chosen(weighted) == {"c0", "c1", "c4", "c5"}
    proportional = select(pool, Rules(top_fraction=0.5))  # 4 of a -> 2, 2 of b -> 1
    assert chosen(proportional) == {"c0", "c1", "c4"}


def test_threshold_and_top_fraction():
    pool = cands((0.9, 1, "", ""), (0.5, 1, "", ""), (0.4, 1, "", ""), (0.1, 1, "", ""))
    decisions = select(pool, Rules(threshold=0.45))
    assert chosen(decisions) == {"c0", "c1"}
    assert decisions["c2"].reason == "score 0.4 below the threshold 0.45"
    assert chosen(select(pool, Rules(top_fraction=0.25))) == {"c0"}
    assert chosen(select(pool, Rules(top_fraction=0.75, threshold=0.45))) == {"c0", "c1"}


def naive_greedy(pool: list[Candidate], rules: Rules, count: int) -> list[str]:
    """Greedy by score x novelty ** diversity, every novelty recomputed against everything chosen."""
    picked: list[Candidate] = []
    left = list(pool)
    while left and len(picked) < count:

        def effective(c):
            overlap = max((len(ngrams(c.text, 3) & ngrams(p.text, 3)) / len(ngrams(c.text, 3) | ngrams(p.text, 3))
                           for p in picked), default=0.0)  # fmt: skip
            return (c.score * (1 - overlap) ** rules.diversity, -int(c.id[1:]))

        best = max(left, key=effective)
        picked.append(best)
        left.remove(best)
    return [p.id for p in picked]


def test_diversity_is_the_greedy_of_score_times_novelty_and_min_novelty_drops_near_copies():
    rng = random.Random(3)
    vocabulary = WORDS[:12]
    texts = [" ".join(rng.choice(vocabulary) for _ in range(8)) for _ in range(30)]
    texts[5] = texts[2]  # an exact copy
    pool = cands(*((rng.random(), 1, "", t) for t in texts))
    rules = Rules(top_fraction=0.4, diversity=2.0)
    decisions = select(pool, rules)
    order = sorted((d.rank, k) for k, d in decisions.items() if d.chosen)
    assert chosen(decisions) == set(naive_greedy(pool, rules, 12))
    assert len(order) == 12
    strict = select(pool, Rules(top_fraction=1.0, min_novelty=0.5))
    first, copy = ("c2", "c5") if pool[2].score >= pool[5].score else ("c5", "c2")
    assert strict[first].chosen and not strict[copy].chosen
    assert strict[copy].similar_to == first and strict[copy].novelty == 0.0


# ---------------------------------------------------------------------------------------------- mining runs


def questions(n: int, seed: int = 0) -> list[dict]:
    """Questions of tiny-vocabulary words and two numbers; the reference is the second number, so an echoed
    (shuffled) question is right when that number comes last. Half carry a teacher answer of known words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = rng.sample(WORDS[:16], 4)
        a, b = rng.randint(1, 9), rng.randint(10, 99)
        rows.append({"question": f"{words[0]} {a} {words[1]} {b} {words[2]}", "answer": str(b),
                     "teacher_answer": " ".join(rng.sample(WORDS[:16], 5)), "domain": "even" if i % 2 else "odd"})  # fmt: skip
    return rows


@pytest.fixture(scope="module")
def mine_store(tmp_path_factory):
    store = Store(tmp_path_factory.mktemp("mine") / "store")
    tok = tiny_tokenizer()
    publish_model(store, "student", llama(3, 1, 32, 2), tok)
    publish_model(store, "teacher", llama(1, 1, 32, 2, sharp=20.0), tok)
    other = tiny_tokenizer(WORDS[:-5])
    publish_model(store, "foreign", llama(5, 1, 32, 2, vocab=len(other)), other)
    return store


@pytest.fixture(scope="module")
def echo():
    with start_server("echo") as server:
        yield server


def run_mine(store: Store, tmp_path, echo, rows: list[dict], **recipe):
    data = {"name": "mined", "input": str(write_jsonl(tmp_path / "pool.jsonl", rows)), "student": "student",
            "sampler": {"base_url": echo.url, "model": "echo"}, "samples": 4, "k": 2,
            "sampling": {"temperature": 0.8, "max_tokens": 16}, "verify": {"method": "numeric", "extract": "last_number"},
            "select": {"top_fraction": 1.0}} | recipe  # fmt: skip
    return mine(parse_config(MineConfig, data, "test"), store)


def direct(model, tokenizer, prompt: list[dict], answer: str, teacher=None) -> dict[str, float]:
    """Loss, entropy and KL(teacher || student) per answer token, from one unpadded forward pass."""
    import torch

    head = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)[
        "input_ids"
    ]
    full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": answer}], tokenize=True,
                                         return_dict=True)["input_ids"]  # fmt: skip
    ids = torch.tensor([full])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)[len(head) - 1 : len(full) - 1]
        targets = ids[0, len(head) :]
        out = {"loss": -logp[torch.arange(len(targets)), targets].mean().item(),
               "entropy": -(logp.exp() * logp).sum(-1).mean().item()}  # fmt: skip
        if teacher is not None:
            t = torch.log_softmax(teacher(ids).logits[0].double(), -1)[len(head) - 1 : len(full) - 1]
            out["kl"] = (t.exp() * (t - logp)).sum(-1).mean().item()
    return out


def test_every_score_equals_a_direct_computation(mine_store, tmp_path, echo):
    from manifests.models import load_causal_lm

    rows = questions(6)
    manifest = run_mine(mine_store, tmp_path, echo, rows, answer_column="teacher_answer", teacher="teacher",
                        scores={"loss": 1, "kl": 1, "entropy": 1, "pass_at_k": 1, "self_consistency": 1})  # fmt: skip
    got = {r["question"]: r for r in read_table(manifest).to_pylist()}
    assert len(got) == 6
    student, tok = load_causal_lm(mine_store.resolve("student"), mine_store)
    teacher, _ = load_causal_lm(mine_store.resolve("teacher"), mine_store)
    for row in rows:
        prompt = [{"role": "user", "content": row["question"]}]
        samples = [a.text for a in EchoModel().generate([prompt] * 4, 16, 0.8, 1.0, [0, 1, 2, 3])]
        last = [re.findall(r"\d+", s)[-1] for s in samples]  # every sample holds both numbers
        correct = sum(s == row["answer"] for s in last)
        r = got[row["question"]]
        assert r["samples_correct"] == correct
        assert r["pass_at_k"] == pytest.approx(pass_at_k(4, correct, 2))
        votes = max(last.count(x) for x in set(last))
        assert r["agreement"] == pytest.approx(votes / 4)
        expected = direct(student, tok, prompt, row["teacher_answer"], teacher)
        assert r["student_loss"] == pytest.approx(expected["loss"], rel=1e-4)
        assert r["kl"] == pytest.approx(expected["kl"], rel=1e-3, abs=1e-6)
        entropy = sum(direct(student, tok, prompt, s)["entropy"] for s in samples) / 4
        assert r["entropy"] == pytest.approx(entropy, rel=1e-4)
        assert r["student"] == mine_store.resolve("student").id
    # Five scores: each a percentile rank, averaged with equal weights.
    table = list(got.values())
    hard = {"loss": [r["student_loss"] for r in table], "kl": [r["kl"] for r in table],
            "entropy": [r["entropy"] for r in table], "pass_at_k": [1 - r["pass_at_k"] for r in table],
            "self_consistency": [1 - r["agreement"] for r in table]}  # fmt: skip
    expected_scores = combine(hard, dict.fromkeys(hard, 1.0))
    assert [r["mine_score"] for r in table] == pytest.approx(expected_scores)


def test_a_budget_keeps_the_hardest_per_stratum_and_the_ledger_keeps_the_rest(mine_store, tmp_path, echo):
    rows = questions(12, seed=1)
    manifest = run_mine(mine_store, tmp_path, echo, rows, select={"teacher_tokens": 700, "teacher_max_tokens": 100,
                                                                  "stratify_by": "domain", "strata": "equal"})  # fmt: skip
    kept = read_table(manifest).to_pylist()
    ledger = manifest_ledger(manifest)
    assert len(kept) + len(ledger) == 12 and {r["domain"] for r in kept} == {"odd", "even"}
    assert all(e["reason"] == "not_selected" and e["score"] is not None for e in ledger)
    details = [json.loads(e["detail"]) for e in ledger]
    assert all(
        d["student"] == mine_store.resolve("student").id and "pass_at_k" in d["measures"] for d in details
    )
    spent = sum(r["teacher_tokens"] for r in kept)
    assert spent <= 700 < spent + min(d["teacher_tokens"] for d in details)  # greedy: nothing left would fit
    for domain in ("odd", "even"):  # within a stratum, only a candidate that did not fit outranks a kept one
        lowest = min(r["mine_score"] for r in kept if r["domain"] == domain)
        for e, d in zip(ledger, details, strict=True):
            if d["stratum"] == domain and e["score"] > lowest:
                assert d["why"] == "over the teacher-token budget"
    roles = {p.role for p in manifest.parents}
    assert "student" in roles
    mined = manifest.stats["mined"]
    assert mined["kept"] == len(kept) and set(mined["strata"]) == {"odd", "even"}
    assert sum(mined["mixture_weights"].values()) == pytest.approx(1.0, abs=1e-5)


def manifest_ledger(manifest) -> list[dict]:
    import pyarrow.parquet as pq

    files = sorted((manifest.location / "ledger").glob("*.parquet"))
    return [row for f in files for row in pq.read_table(f).to_pylist()]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"teacher": "foreign", "scores": {"kl": 1}, "answer_column": "teacher_answer"}, "another tokenizer"),
        ({"reference_column": "nothing_here"}, "nothing_here"),
        ({"select": {"teacher_tokens": 20, "teacher_max_tokens": 100}}, "smaller than one teacher request"),
    ],
)
def test_bad_input_is_one_error_line(mine_store, tmp_path, echo, cli, change, message):
    rows = questions(3)
    pool = write_jsonl(tmp_path / "pool.jsonl", rows)
    data = {"stage": "synth.mine", "name": "bad", "input": str(pool), "student": "student",
            "sampler": {"base_url": echo.url, "model": "echo"}, "samples": 2,
            "verify": {"method": "numeric", "extract": "last_number"}, "select": {"top_fraction": 0.5}} | change  # fmt: skip
    recipe = write_recipe(tmp_path / "bad.yaml", json.dumps(data))
    result = cli("--store", mine_store.root, "synth", "mine", recipe)
    assert_one_line_error(result, code=result.code if result.code else 2)
    assert message in result.err
    assert not list((mine_store.root / "datasets").glob("bad/*/manifest.json"))


def test_a_pool_without_references_says_so(mine_store, tmp_path, echo, cli):
    rows = [{"question": r["question"], "answer": None} for r in questions(3)]
    pool = write_jsonl(tmp_path / "pool.jsonl", rows)
    data = {"stage": "synth.mine", "name": "bad", "input": str(pool), "student": "student",
            "sampler": {"base_url": echo.url, "model": "echo"}, "select": {"top_fraction": 0.5}}  # fmt: skip
    result = cli(
        "--store", mine_store.root, "synth", "mine", write_recipe(tmp_path / "r.yaml", json.dumps(data))
    )
    assert result.code != 0 and result.err.startswith("error: ") and "reference" in result.err, result.err
    assert len(result.err.strip().splitlines()) == 1


def test_the_random_baseline_keeps_a_seeded_uniform_pick(mine_store, tmp_path, echo):
    from synth.mine import random_score

    rows = questions(10, seed=2)
    manifest = run_mine(
        mine_store, tmp_path, echo, rows, scores={"random": 1}, seed=7, select={"top_fraction": 0.3}
    )
    kept = read_table(manifest).to_pylist()
    every = [(random_score(7, r["candidate_id"]), r["candidate_id"]) for r in kept]
    assert len(kept) == 3 and manifest.stats["requests"]["sent"] == 0  # the student is never asked
    ledger = manifest_ledger(manifest)
    assert min(s for s, _ in every) >= max(e["score"] for e in ledger)
    assert all(r["mine_score"] == pytest.approx(random_score(7, r["candidate_id"])) for r in kept)


def test_in_process_sampling_is_seeded_per_prompt_and_cached(mine_store, tmp_path, echo, monkeypatch):
    import hashlib

    import synth.student_scores as student_scores
    from manifests.models import load_causal_lm

    rows = questions(4, seed=3)
    recipe = {"sampler": "in_process", "scores": {"pass_at_k": 1, "entropy": 1}, "samples": 3, "k": 1,
              "sampling": {"temperature": 1.0, "max_tokens": 6}, "verify": {"method": "exact", "extract": "auto"}}  # fmt: skip
    first = {
        r["candidate_id"]: r
        for r in read_table(run_mine(mine_store, tmp_path, echo, rows, **recipe)).to_pylist()
    }
    student, tok = load_causal_lm(mine_store.resolve("student"), mine_store)
    for rid, r in first.items():
        seed = int(hashlib.sha256(f"0\x1f{rid}".encode()).hexdigest()[:8], 16)
        answers = student_scores.sample_answers(student, tok, r["prompt"], 3, 6, 1.0, 1.0, seed)
        assert [a["completion_tokens"] for a in r["requests"]] == [a.completion_tokens for a in answers]
        assert all(a["endpoint"] == f"in_process:{mine_store.resolve('student').id}" for a in r["requests"])
        correct = sum(a.text.strip() == r["answer"] for a in answers)
        assert r["samples_correct"] == correct
        entropy = sum(direct(student, tok, r["prompt"], a.text)["entropy"] for a in answers) / 3
        assert r["entropy"] == pytest.approx(entropy, rel=1e-4)

    def no_generation(*args, **kwargs):
        raise AssertionError("a cached answer was generated again")

    monkeypatch.setattr(student_scores, "sample_answers", no_generation)
    again = run_mine(mine_store, tmp_path, echo, rows, name="again", **recipe)
    assert {r["candidate_id"]: r["entropy"] for r in read_table(again).to_pylist()} == {
        k: r["entropy"] for k, r in first.items()
    }
    assert again.stats["mined"]["student_samples"] | {"completion_tokens": 0} == {
        "answers": 12,
        "from_cache": 12,
        "completion_tokens": 0,
        "sampler": "in_process",
    }


def test_a_kept_column_that_clashes_with_an_output_column_is_refused():
    import pyarrow as pa

    from synth.cot import CotConfig, CotTask

    cfg = parse_config(CotConfig, {"name": "c", "input": "x", "teachers": [{"base_url": "http://127.0.0.1:9/v1", "model": "m"}],
                                   "keep_columns": ["messages"]}, "test")  # fmt: skip
    inputs = pa.schema([("id", pa.string()), ("question", pa.string()), ("messages", pa.string()),
                        ("mine_score", pa.float64())])  # fmt: skip
    with pytest.raises(
        DistilleryError, match="keep_columns: messages is already an output column of synth.cot"
    ):
        CotTask.schema(cfg, inputs)
    kept = CotTask.schema(cfg.model_copy(update={"keep_columns": ["mine_score"]}), inputs)
    assert kept.field("mine_score").type == pa.float64() and kept.names[-3:] == [
        "mine_score",
        "requests",
        "verdict",
    ]
    # A column mining already carries (the reference, read by pass@k) is kept once, not refused.
    from synth.mine import MineTask

    mined = parse_config(MineConfig, {"name": "m", "input": "x", "student": "s", "select": {"top_fraction": 1.0},
                                      "keep_columns": ["answer"]}, "test")  # fmt: skip
    assert MineTask.schema(mined, inputs.append(pa.field("answer", pa.string()))).names.count("answer") == 1


def test_teacher_tokens_are_the_engines_estimate_of_the_teacher_prompt(mine_store, tmp_path, echo):
    from synth.teacher_requests import estimate_prompt_tokens

    template = "Solve step by step, then end with 'Final answer: <n>'.\n\n{question}"
    select = {
        "top_fraction": 1.0,
        "teacher_max_tokens": 50,
        "teacher_requests": 3,
        "teacher_template": template,
    }
    manifest = run_mine(mine_store, tmp_path, echo, questions(4), scores={"random": 1}, select=select)
    for r in read_table(manifest).to_pylist():
        asked = [{"role": "user", "content": template.replace("{question}", r["question"])}]
        assert r["teacher_tokens"] == (estimate_prompt_tokens(asked) + 50) * 3
