"""The eval stage: tasks, metrics with intervals, per-sample records with lineage, comparisons."""

from __future__ import annotations

import json
from itertools import combinations
from math import comb

import numpy as np
import pyarrow as pa
import pytest

from manifests.data import read_table
from manifests.models import CHECKPOINT_DIR
from manifests.publish import Publisher
from manifests.store import Store

from .conftest import WORDS, assert_one_line_error, tiny_tokenizer, write_recipe

# One worker of `make test` (pytest-xdist) runs them all: most read the module's stores.
pytestmark = pytest.mark.xdist_group("eval")

QA = [  # question, reference: the echo endpoint answers with the question's words
    ("alpha", "alpha"),
    ("beta", "beta"),
    ("gamma delta", "gamma delta"),
    ("epsilon", "zeta"),
    ("eta theta", "theta eta"),
    ("iota", "iota"),
    ("kappa", "lambda"),
    ("mu", "mu"),
]


def publish_dataset(store: Store, name: str, splits: dict[str, list[dict]]) -> None:
    with Publisher(store, kind="dataset", name=name, stage="test", recipe={"rows": name}) as pub:
        for split, rows in splits.items():
            pub.write_table(pa.Table.from_pylist(rows), split=split)
        pub.publish(stats={})


def publish_tiny_model(store: Store, name: str, seed: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer(WORDS)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer.get_vocab()), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    with Publisher(store, kind="run", name=name, stage="test", recipe={"seed": seed}) as pub:
        LlamaForCausalLM(config).save_pretrained(pub.dir / CHECKPOINT_DIR)
        tokenizer.save_pretrained(pub.dir / CHECKPOINT_DIR)
        pub.publish(stats={})


def chat_rows(prefix: str, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        q = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(3))
        a = " ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(4))
        rows.append({"id": f"{prefix}{i:02d}", "messages": [{"role": "user", "content": q},
                                                             {"role": "assistant", "content": a}]})  # fmt: skip
    return rows


@pytest.fixture(scope="module")
def eval_store(tmp_path_factory):
    store = Store(tmp_path_factory.mktemp("eval") / "store")
    publish_dataset(store, "chats", {"train": chat_rows("tr", 6), "test": chat_rows("te", 10)})
    qa = [{"id": f"q{i}", "question": q, "answer": a} for i, (q, a) in enumerate(QA)]
    publish_dataset(
        store, "qa", {"test": qa, "train": [{"id": "s0", "question": "alpha", "answer": "alpha"}]}
    )
    publish_tiny_model(store, "small-a", seed=0)
    publish_tiny_model(store, "small-b", seed=1)
    return store


def run_eval(cli, store: Store, tmp_path, text: str, name: str = "ev"):
    recipe = write_recipe(tmp_path / f"{name}.yaml", f"stage: eval\nname: {name}\n{text}")
    return cli("--store", store.root, "eval", "run", recipe)


def metrics_of(store: Store, ref: str) -> dict:
    return json.loads((store.resolve(ref, kind="eval").location / "metrics.json").read_text())


def records_of(store: Store, ref: str) -> list[dict]:
    return read_table(store.resolve(ref, kind="eval"), split="records").to_pylist()


# ------------------------------------------------------------------------------ perplexity (runs)


def test_perplexity_per_sample_and_pooled_equal_the_models_own_loss(cli, eval_store, tmp_path):
    import torch

    from manifests.chat_labels import labelled_conversation
    from manifests.models import load_causal_lm

    result = run_eval(cli, eval_store, tmp_path, """models: [small-a, small-b]
tasks:
  - {name: heldout, dataset: {ref: chats, split: test}, metrics: [perplexity], generation: {batch_size: 3}}
""", name="ppl")  # fmt: skip
    assert result.code == 0, result.err
    metrics = metrics_of(eval_store, "ppl")["tasks"]["heldout"]
    records = [r for r in records_of(eval_store, "ppl") if r["model"] == "small-a"]
    model, tokenizer = load_causal_lm(eval_store.resolve("small-a"), eval_store)
    nll, tokens = 0.0, 0
    for r in sorted(records, key=lambda r: r["sample_id"]):
        row = next(x for x in chat_rows("te", 10) if x["id"] == r["sample_id"])
        example = labelled_conversation(row["messages"], tokenizer)
        with torch.inference_mode():
            loss = model(
                input_ids=torch.tensor([example["input_ids"]]), labels=torch.tensor([example["labels"]])
            ).loss
        n = sum(1 for x in example["labels"][1:] if x != -100)
        # Each sample alone (no padding) against transformers' own loss: the batched, padded pass agrees.
        assert np.log(r["perplexity"]) == pytest.approx(float(loss), abs=1e-5)
        nll, tokens = nll + float(loss) * n, tokens + n
    value = metrics["models"]["small-a"]["metrics"]["perplexity"]
    assert value["value"] == pytest.approx(float(np.exp(nll / tokens)), rel=1e-4)
    assert value["low"] < value["value"] < value["high"] and value["n"] == 10
    pair = metrics["paired"][0]
    assert (pair["a"], pair["b"]) == ("small-a", "small-b")
    b = metrics["models"]["small-b"]["metrics"]["perplexity"]["value"]
    assert pair["metrics"]["perplexity"]["diff"] == pytest.approx(b - value["value"])
    assert "heldout" in result.out and "perplexity" in result.out


# ---------------------------------------------------------------------- generation (endpoint, echo)


def echo_models(url: str) -> str:
    return f"models:\n  - {{name: echo, base_url: {url}, model: echo}}\n"


def test_verifiers_pass_at_k_and_records_on_an_endpoint_model(cli, eval_store, tmp_path):
    from synth.serve import start_server

    with start_server("echo") as server:
        result = run_eval(cli, eval_store, tmp_path, echo_models(server.url) + """tasks:
  - name: qa
    dataset: {ref: qa, split: test}
    metrics: [exact_match, pass@1, pass@2, rougeL, chrf, bleu]
    generation: {n: 3, temperature: 1.0, max_new_tokens: 8}
""", name="gen")  # fmt: skip
    assert result.code == 0, result.err
    m = metrics_of(eval_store, "gen")["tasks"]["qa"]["models"]["echo"]["metrics"]
    records = sorted(records_of(eval_store, "gen"), key=lambda r: r["sample_id"])
    assert [r["sample_id"] for r in records] == [f"q{i}" for i in range(len(QA))]
    refs = {f"q{i}": a for i, (_, a) in enumerate(QA)}
    for r in records:
        assert len(r["outputs"]) == 3 and r["parents"] == [r["sample_id"]]
        right = [" ".join(o.split()).lower() == refs[r["sample_id"]] for o in r["outputs"]]
        assert r["exact_match"] == float(right[0]) and r["correct"] is right[0]
        for k in (1, 2):  # the unbiased estimator, from the recorded answers
            expected = 1.0 - comb(3 - sum(right), k) / comb(3, k)
            assert r[f"pass@{k}"] == pytest.approx(expected)
    assert m["exact_match"]["value"] == pytest.approx(np.mean([r["exact_match"] for r in records]))
    assert m["pass@2"]["value"] >= m["pass@1"]["value"]
    # one-word questions always echo right; the wrong reference rows never pass
    assert {r["sample_id"]: r["pass@2"] for r in records}["q3"] == 0.0
    assert {r["sample_id"]: r["pass@1"] for r in records}["q0"] == 1.0


def test_corpus_bleu_from_summed_statistics_equals_sacrebleu():
    from sacrebleu.metrics import BLEU

    from eval.metrics import METRICS, TextScorers

    hyps = ["the cat sat on the mat", "a dog barks at night", "it rains", "hello there general kenobi"]
    refs = ["the cat is on the mat", "the dog barks at night", "it is raining today", "hello there"]
    scorers = TextScorers()
    stats = np.asarray([scorers.text_metric("bleu", h, r)[0] for h, r in zip(hyps, refs, strict=True)])
    assert float(METRICS["bleu"].aggregate(stats.sum(axis=0))) == pytest.approx(
        BLEU().corpus_score(hyps, [refs]).score
    )


def test_pass_at_k_estimator_matches_enumeration():
    from eval.metrics import pass_at_k

    for n in range(1, 7):
        for c in range(n + 1):
            for k in range(1, n + 1):
                # the chance that k answers drawn without replacement include a right one
                hits = sum(1 for pick in combinations(range(n), k) if any(i < c for i in pick))
                assert pass_at_k(n, c, k) == pytest.approx(hits / comb(n, k))


def test_bootstrap_is_seeded_and_covers_a_known_mean():
    from eval.stats import BootstrapSettings, interval, paired_difference

    rng = np.random.default_rng(5)
    values = (rng.random(400) < 0.3).astype(float)
    stats = np.stack([values, np.ones_like(values)], axis=1)

    def mean(s):
        return s[..., 0] / s[..., 1]

    first = interval(stats, mean, BootstrapSettings(500, seed=1))
    assert first == interval(stats, mean, BootstrapSettings(500, seed=1))
    assert first != interval(stats, mean, BootstrapSettings(500, seed=2))
    assert first["low"] < values.mean() < first["high"]
    se = np.sqrt(values.mean() * (1 - values.mean()) / len(values))
    assert first["high"] - first["low"] == pytest.approx(2 * 1.96 * se, rel=0.2)
    # a paired difference of a model against itself plus a constant shift has a zero-width interval
    shifted = np.stack([values + 0.1, np.ones_like(values)], axis=1)
    d = paired_difference(stats, shifted, mean, BootstrapSettings(200))
    assert (
        d["diff"] == pytest.approx(0.1) and d["low"] == pytest.approx(0.1) and d["high"] == pytest.approx(0.1)
    )


# ------------------------------------------------------------------------- lineage and comparisons


def test_trace_of_a_failed_sample_reaches_the_dataset_record(cli, eval_store, tmp_path):
    from synth.serve import start_server

    with start_server("echo") as server:
        result = run_eval(cli, eval_store, tmp_path, echo_models(server.url) + """tasks:
  - {name: qa, dataset: {ref: qa, split: test}, metrics: [exact_match], generation: {max_new_tokens: 8}}
""", name="traced")  # fmt: skip
    assert result.code == 0, result.err
    failed = next(r for r in records_of(eval_store, "traced") if r["correct"] is False)
    assert failed["sample_id"] == "q3"  # 'epsilon' echoed against the reference 'zeta'
    traced = cli("--store", eval_store.root, "manifests", "trace", failed["id"])
    assert traced.code == 0, traced.err
    assert "traced" in traced.out and "qa" in traced.out and "q3" in traced.out


def test_compare_lists_values_differences_and_flipped_samples(cli, eval_store, tmp_path):
    from synth.serve import start_server

    qa_task = "  - {name: qa, dataset: {ref: qa, split: test}, metrics: [exact_match], generation: {max_new_tokens: 8}}\n"
    with start_server("echo") as server:
        first = run_eval(
            cli, eval_store, tmp_path, echo_models(server.url) + "tasks:\n" + qa_task, name="cmp-a"
        )
        # a system message asking nothing changes: the echo answers the last user turn either way,
        # so the second eval differs only where the reference differs: use another split's rows
        second = run_eval(cli, eval_store, tmp_path, echo_models(server.url) + "tasks:\n"
                          + qa_task.replace("metrics:", "target: question, metrics:"), name="cmp-b")  # fmt: skip
    assert first.code == 0 and second.code == 0, first.err + second.err
    result = cli("--store", eval_store.root, "eval", "compare", "cmp-a", "cmp-b", "--format", "json")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    row = next(r for r in data["rows"] if r["metric"] == "exact_match")
    a, b = (v["value"] for v in row["values"])
    assert a == pytest.approx(5 / 8) and b == pytest.approx(1.0)  # the echo always equals the question
    assert row["diffs"][0]["diff"] == pytest.approx(b - a)
    flip = data["flipped"][0]
    assert flip["a_only"] == [] and sorted(flip["b_only"]) == ["q3", "q4", "q6"]
    table = cli("--store", eval_store.root, "eval", "compare", "cmp-a", "cmp-b")
    assert table.code == 0 and "exact_match" in table.out and "q3" in table.out


def test_a_judge_asked_in_both_orders_calls_a_position_biased_verdict_a_tie(cli, eval_store, tmp_path):
    from eval.judge import verdict
    from synth.serve import start_server

    assert (verdict("A", "B"), verdict("B", "A"), verdict("A", "A"), verdict("T", "T"), verdict(None, "B")) == (
        1.0, 0.0, 0.5, 0.5, 0.5)  # fmt: skip
    with start_server("echo") as server:
        # The echo judge repeats the prompt's first words, whose first standalone letter is always "A":
        # a judge that always prefers the first answer shown.
        result = run_eval(cli, eval_store, tmp_path, echo_models(server.url) + f"""tasks:
  - {{name: qa, dataset: {{ref: qa, split: test}}, metrics: [win_rate], generation: {{max_new_tokens: 8}}}}
judges:
  qa:
    teacher: {{name: j, base_url: {server.url}, model: echo}}
    template: "Reply A, B or T. {{prompt}} {{a}} {{b}}"
""", name="judged")  # fmt: skip
    assert result.code == 0, result.err
    records = records_of(eval_store, "judged")
    assert {r["win_rate"] for r in records} == {0.5}
    assert all(r["judge_letters"] == ["A", "A"] for r in records)
    assert (
        metrics_of(eval_store, "judged")["tasks"]["qa"]["models"]["echo"]["metrics"]["win_rate"]["value"]
        == 0.5
    )


def test_a_failing_judge_is_one_error_line_and_publishes_nothing(cli, eval_store, tmp_path):
    from synth.serve import start_server

    with start_server("echo") as server:
        result = run_eval(cli, eval_store, tmp_path, echo_models(server.url) + """tasks:
  - {name: qa, dataset: {ref: qa, split: test}, metrics: [win_rate], generation: {max_new_tokens: 8}}
judges:
  qa: {teacher: {name: j, base_url: "http://127.0.0.1:9/v1", model: x, max_attempts: 1, timeout: 2}}
""", name="badjudge")  # fmt: skip
    assert_one_line_error(result)
    assert "judge judge:j" in result.err and "requests failed" in result.err
    assert not eval_store.list(kind="eval", name="badjudge")


def test_teacher_agreement_is_total_against_itself_and_measured_against_another(cli, eval_store, tmp_path):
    result = run_eval(cli, eval_store, tmp_path, """models: [small-a, small-b]
tasks:
  - {name: agree, dataset: {ref: chats, split: test}, metrics: [top1_agreement, kl_teacher_student], teacher: small-a}
""", name="agree")  # fmt: skip
    assert result.code == 0, result.err
    entry = metrics_of(eval_store, "agree")["tasks"]["agree"]["models"]
    assert entry["small-a"]["metrics"]["top1_agreement"]["value"] == 1.0
    assert entry["small-a"]["metrics"]["kl_teacher_student"]["value"] == pytest.approx(0.0, abs=1e-6)
    assert entry["small-b"]["metrics"]["kl_teacher_student"]["value"] > 0.01
    ev = eval_store.resolve("agree", kind="eval")
    assert {p.role for p in ev.parents} == {"model", "eval_data"}  # the teacher is one of the models here


def test_reward_accuracy_of_a_reward_model_on_preference_pairs(cli, eval_store, tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from synth.preferences import RewardModel

    tokenizer = tiny_tokenizer(WORDS)
    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=len(tokenizer.get_vocab()), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=0)  # fmt: skip
    with Publisher(eval_store, kind="run", name="rm", stage="test", recipe={}) as pub:
        LlamaForSequenceClassification(config).save_pretrained(pub.dir / CHECKPOINT_DIR)
        tokenizer.save_pretrained(pub.dir / CHECKPOINT_DIR)
        pub.publish(stats={})
    pairs = [{"id": f"p{i}", "prompt": WORDS[i], "chosen": WORDS[(i + 1) % 12], "rejected": WORDS[(i + 5) % 12]}
             for i in range(8)]  # fmt: skip
    publish_dataset(eval_store, "prefs", {"test": pairs})
    result = run_eval(cli, eval_store, tmp_path, """models: [rm, small-a]
tasks:
  - {name: pairs, dataset: {ref: prefs}, metrics: [reward_accuracy], models: [rm]}
  - {name: heldout, dataset: {ref: chats}, metrics: [perplexity], models: [small-a], limit: 2}
""", name="rewards")  # fmt: skip
    assert result.code == 0, result.err
    reward = RewardModel(eval_store.resolve("rm"), eval_store)
    expected = [float(c > r) for c, r in (reward.score([{"role": "user", "content": p["prompt"]}], [p["chosen"], p["rejected"]])
                                          for p in pairs)]  # fmt: skip
    records = sorted(
        (r for r in records_of(eval_store, "rewards") if r["task"] == "pairs"), key=lambda r: r["sample_id"]
    )
    assert [r["reward_accuracy"] for r in records] == expected
    value = metrics_of(eval_store, "rewards")["tasks"]["pairs"]["models"]["rm"]["metrics"]["reward_accuracy"][
        "value"
    ]
    assert value == pytest.approx(sum(expected) / len(expected))


def test_the_first_eval_recipe_form_still_runs_as_a_perplexity_task(cli, eval_store, tmp_path):
    recipe = write_recipe(tmp_path / "old.yaml", """stage: eval
name: old
models: [small-a]
dataset: {ref: chats, split: test}
max_length: 64
batch_size: 2
""")  # fmt: skip
    result = cli("--store", eval_store.root, "run", recipe)
    assert result.code == 0, result.err
    assert (
        metrics_of(eval_store, "old")["tasks"]["perplexity"]["models"]["small-a"]["metrics"]["perplexity"][
            "value"
        ]
        > 1
    )


# --------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("task", "message"),
    [
        ("{name: t, dataset: {ref: chats}, metrics: [exact_macth]}", "did you mean 'exact_match'"),
        ("{name: t, dataset: {ref: qa}, metrics: [pass@4], generation: {n: 2, temperature: 1}}", "k ≤ n"),
        ("{name: t, dataset: {ref: qa}, prompt: query, metrics: [exact_match]}", "lacks column(s) query"),
        (
            "{name: t, dataset: {ref: qa}, target: solution, metrics: [exact_match]}",
            "lacks column(s) solution",
        ),
        ("{name: t, dataset: {ref: chats, split: dev}, metrics: [perplexity]}", "no split 'dev'"),
        ("{name: t, dataset: {ref: nothing}, metrics: [perplexity]}", "nothing"),
        ("{name: t, dataset: {ref: qa}, metrics: [top1_agreement]}", "needs 'teacher'"),
        ("{name: t, dataset: {ref: qa}, metrics: [win_rate]}", "needs a judge"),
        (
            "{name: t, dataset: {ref: chats}, metrics: [perplexity], fewshot: {split: test, n: 2}}",
            "another split",
        ),
        (
            "{name: t, dataset: {ref: qa}, metrics: [exact_match], verifier: {extract: regex}}",
            "needs a pattern",
        ),
        (
            "{name: t, dataset: {ref: qa}, metrics: [regex], verifier: {extract: regex, pattern: '(a'}}",
            "not a regular",
        ),
        (
            "{name: t, dataset: {ref: qa}, metrics: [pass@1], verifier: {method: fuzzy}}",
            "unknown verifier 'fuzzy'",
        ),
        (
            "{name: t, dataset: {ref: qa}, metrics: [exact_match], models: [other]}",
            "not among the eval's models",
        ),
    ],
)
def test_bad_tasks_are_one_error_line_and_publish_nothing(cli, eval_store, tmp_path, task, message):
    result = run_eval(cli, eval_store, tmp_path, f"models: [small-a]\ntasks:\n  - {task}\n", name="bad")
    assert_one_line_error(result, code=result.code)
    assert result.code != 0 and message in result.err, result.err
    assert not eval_store.list(kind="eval", name="bad")


def test_a_model_without_chat_template_is_named_when_one_is_needed(cli, eval_store, tmp_path):
    import shutil

    source = eval_store.resolve("small-a").location / CHECKPOINT_DIR
    with Publisher(eval_store, kind="run", name="plain", stage="test", recipe={}) as pub:
        shutil.copytree(source, pub.dir / CHECKPOINT_DIR)
        config = json.loads((pub.dir / CHECKPOINT_DIR / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        (pub.dir / CHECKPOINT_DIR / "tokenizer_config.json").write_text(json.dumps(config))
        (pub.dir / CHECKPOINT_DIR / "chat_template.jinja").unlink(missing_ok=True)
        pub.publish(stats={})
    task = "{name: t, dataset: {ref: qa}, metrics: [exact_match], generation: {max_new_tokens: 4}}"
    result = run_eval(cli, eval_store, tmp_path, f"models: [plain]\ntasks:\n  - {task}\n", name="nochat")
    assert_one_line_error(result)
    assert "plain's tokenizer has no chat template" in result.err and "chat_template: false" in result.err
    raw = run_eval(cli, eval_store, tmp_path, f"models: [plain]\ntasks:\n  - {task[:-1]}, chat_template: false}}\n",
                   name="raw")  # fmt: skip
    assert raw.code == 0, raw.err


def test_a_tokenizer_run_or_an_endpoint_for_perplexity_is_refused(cli, eval_store, tmp_path):
    task = "{name: t, dataset: {ref: chats}, metrics: [perplexity]}"
    result = run_eval(cli, eval_store, tmp_path,
                      f"models:\n  - {{name: api, base_url: 'http://127.0.0.1:9/v1', model: x}}\ntasks:\n  - {task}\n",
                      name="ep")  # fmt: skip
    assert_one_line_error(result)
    assert "api is an endpoint" in result.err and "perplexity" in result.err
    assert not eval_store.list(kind="eval", name="ep")


# ----------------------------------------------------------------- contamination and explanations


def long_question(i: int) -> str:
    return " ".join(
        WORDS[(i * 7 + j * (i + 1)) % len(WORDS)] + ("" if j % 4 else f" n{i}x{j}") for j in range(16)
    )


@pytest.fixture(scope="module")
def trained_store(eval_store):
    """A model run 'trained' on documents that contain test samples 0 and 1 word for word."""
    import shutil

    samples = [{"id": f"L{i}", "question": long_question(i), "answer": f"answer{i}"} for i in range(6)]
    publish_dataset(eval_store, "long-qa", {"test": samples})
    docs = [{"id": "d0", "text": f"intro words here {samples[0]['question']} answer0 and more", "source": {"uri": "web/a.jsonl", "line": 1}},
            {"id": "d1", "text": f"{samples[1]['question']} answer1", "source": {"uri": "web/b.jsonl", "line": 7}},
            {"id": "d2", "text": "completely unrelated prose about nothing at all in particular today", "source": {"uri": "web/b.jsonl", "line": 9}}]  # fmt: skip
    publish_dataset(eval_store, "train-docs", {"train": docs})
    # a synth-like child of the docs: rows without a source of their own, pointing at their parent
    derived = [{"id": "s2", "parents": ["d2"], "messages": [{"role": "user", "content": samples[2]["question"]},
                                                            {"role": "assistant", "content": "something else"}]}]  # fmt: skip
    with Publisher(eval_store, kind="dataset", name="derived", stage="test", recipe={},
                   parents=[eval_store.resolve("train-docs")]) as pub:  # fmt: skip
        pub.write_table(pa.Table.from_pylist(derived), split="train")
        pub.publish(stats={})
    base = eval_store.resolve("small-a")
    with Publisher(eval_store, kind="run", name="trained", stage="train.sft", recipe={},
                   parents=[eval_store.resolve("derived"), eval_store.resolve("train-docs"), base],
                   parent_roles={base.id: "base"}) as pub:  # fmt: skip
        shutil.copytree(base.location / CHECKPOINT_DIR, pub.dir / CHECKPOINT_DIR)
        pub.publish(stats={})
    return eval_store


def test_contamination_against_the_runs_training_data_and_the_clean_subset(cli, trained_store, tmp_path):
    result = run_eval(cli, trained_store, tmp_path, """models: [trained, small-a]
tasks:
  - {name: long, dataset: {ref: long-qa}, metrics: [exact_match], generation: {max_new_tokens: 2}}
contamination: {against: training, ngram: 13}
""", name="contam")  # fmt: skip
    assert result.code == 0, result.err
    entry = metrics_of(trained_store, "contam")["tasks"]["long"]["contamination"]
    # the documents hold samples 0 and 1; the derived dataset holds sample 2's question without its
    # answer (16 words: a 13-gram overlap all the same)
    assert entry["trained"]["overlapping_ids"] == ["L0", "L1", "L2"]
    assert entry["trained"]["clean"]["exact_match"]["n"] == 3
    assert entry["small-a"]["overlapping"] == 0  # no training data on record
    flagged = {
        r["sample_id"]
        for r in records_of(trained_store, "contam")
        if r["model"] == "trained" and r["contaminated"]
    }
    assert flagged == {"L0", "L1", "L2"}


def test_contamination_against_a_decontamination_index(cli, trained_store, tmp_path):
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"id": "b1", "text": long_question(4) + " answer4"}) + "\n")
    index = write_recipe(tmp_path / "index.yaml", f"""stage: corpus.decontam-index
name: bench-index
benchmarks:
  - {{name: bench, path: {bench}, fields: [text]}}
ngram: 13
""")  # fmt: skip
    built = cli("--store", trained_store.root, "run", index)
    assert built.code == 0, built.err
    result = run_eval(cli, trained_store, tmp_path, """models: [small-a]
tasks:
  - {name: long, dataset: {ref: long-qa}, metrics: [exact_match], generation: {max_new_tokens: 2}}
contamination: {against: index, index: bench-index}
""", name="contam-index")  # fmt: skip
    assert result.code == 0, result.err
    entry = metrics_of(trained_store, "contam-index")["tasks"]["long"]["contamination"]["small-a"]
    assert entry["overlapping_ids"] == ["L4"]


def test_failures_are_explained_by_their_nearest_training_records_and_sources(cli, trained_store, tmp_path):
    result = run_eval(cli, trained_store, tmp_path, """models: [trained]
tasks:
  - {name: long, dataset: {ref: long-qa}, metrics: [exact_match], generation: {max_new_tokens: 2}}
explain: {k: 2}
""", name="explained")  # fmt: skip
    assert result.code == 0, result.err
    records = {r["sample_id"]: r for r in records_of(trained_store, "explained")}
    assert all(r["correct"] is False for r in records.values())  # a random tiny model
    top = {sid: r["nearest"][0] for sid, r in records.items()}
    assert top["L0"]["id"] == "d0" and top["L0"]["source"] == "web/a.jsonl line 1"
    assert top["L1"]["id"] == "d1" and top["L1"]["similarity"] > 0.7
    # a derived row without a source of its own is explained by its parent's source
    assert top["L2"]["id"] == "s2" and top["L2"]["source"] == "web/b.jsonl line 9"
    assert len(records["L3"]["nearest"]) == 2
    explained = metrics_of(trained_store, "explained")["tasks"]["long"]["explained"]["trained"]
    assert explained["failures"] == 6 and explained["records_indexed"] == 4
    assert sum(explained["by_source"].values()) == 6 and explained["by_source"]["web/a.jsonl"] >= 1


# ------------------------------------------------------------------------------ how a model is asked


def test_fewshot_turns_come_from_another_split_before_each_prompt(eval_store):
    from eval.tasks import TaskConfig, load_samples

    task = TaskConfig(name="t", dataset={"ref": "qa", "split": "test"}, metrics=["exact_match"],
                      system="Answer in one word.", fewshot={"split": "train", "n": 1})  # fmt: skip
    samples = load_samples(task, eval_store.resolve("qa"))
    assert [s.id for s in samples] == [f"q{i}" for i in range(len(QA))]
    assert samples[3].prompt == [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "alpha"},  # the train split's one row, as a solved example
        {"role": "assistant", "content": "alpha"},
        {"role": "user", "content": "epsilon"},
    ]
    assert samples[3].target == "zeta"
    # perplexity scores the sample's own answer, not the examples'
    assert samples[3].conversation() == [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "epsilon"},
        {"role": "assistant", "content": "zeta"},
    ]


def test_an_answer_ends_before_its_stop_string(cli, eval_store, tmp_path):
    from synth.serve import start_server

    with start_server("echo") as server:
        result = run_eval(cli, eval_store, tmp_path, echo_models(server.url) + """tasks:
  - {name: qa, dataset: {ref: qa, split: test}, metrics: [exact_match], generation: {max_new_tokens: 8, stop: [" delta", " theta"]}}
""", name="stopped")  # fmt: skip
    assert result.code == 0, result.err
    outputs = {r["sample_id"]: r["outputs"][0] for r in records_of(eval_store, "stopped")}
    assert outputs["q2"] == "gamma" and outputs["q4"] == "eta" and outputs["q0"] == "alpha"


def test_a_run_generates_the_same_greedy_answers_batched_or_alone(eval_store):
    from eval.models import RunModel
    from eval.tasks import Generation

    model = RunModel("small-a", eval_store.resolve("small-a"), eval_store)
    prompts = [[{"role": "user", "content": " ".join(WORDS[: 1 + i % 5])}] for i in range(6)]
    calls = []
    batched = model.generate(prompts, Generation(max_new_tokens=6, batch_size=4), True, calls.append)
    alone = [
        model.generate([p], Generation(max_new_tokens=6, batch_size=1), True, lambda n: None)[0]
        for p in prompts
    ]
    assert batched == alone and sum(calls) == 6 and len(calls) == 2


def test_a_real_eval_renders_as_a_report(cli, eval_store, tmp_path):
    result = run_eval(cli, eval_store, tmp_path, """models: [small-a, small-b]
tasks:
  - {name: heldout, dataset: {ref: chats, split: test}, metrics: [perplexity], limit: 4}
  - {name: words, dataset: {ref: qa, split: test}, metrics: [exact_match, chrf], generation: {max_new_tokens: 3}}
""", name="reported")  # fmt: skip
    assert result.code == 0, result.err
    summary = cli("--store", eval_store.root, "manifests", "report", "reported", "--format", "json")
    assert summary.code == 0, summary.err
    page = tmp_path / "r.html"
    html = cli("--store", eval_store.root, "manifests", "report", "reported", "--out", page)
    assert html.code == 0, html.err
    text = page.read_text()
    assert "heldout" in text and "words" in text and "small-b" in text and "perplexity" in text


def test_judge_and_endpoint_requests_are_cached_and_budgeted(cli, eval_store, tmp_path):
    from synth.serve import start_server

    log = tmp_path / "requests.jsonl"
    text = """tasks:
  - {name: qa, dataset: {ref: qa, split: test}, metrics: [win_rate], generation: {max_new_tokens: 8}}
judges:
  qa: {teacher: {name: j, base_url: URL, model: echo}}
"""
    with start_server("echo", request_log=str(log)) as server:
        # a system message no other test uses: these requests are new to the cache
        recipe = echo_models(server.url) + text.replace("URL", server.url).replace(
            "metrics:", "system: cache test, metrics:"
        )
        first = run_eval(cli, eval_store, tmp_path, recipe, name="cached")
        sent_first = len(log.read_text().splitlines())
        again = run_eval(cli, eval_store, tmp_path, recipe, name="cached")
        sent_again = len(log.read_text().splitlines())
        poor = run_eval(cli, eval_store, tmp_path, "budget: {max_tokens: 30}\n" + recipe.replace("cache test", "budget test"),
                        name="poor")  # fmt: skip
    assert first.code == 0 and again.code == 0, first.err + again.err
    stats = eval_store.resolve("cached", kind="eval").stats["requests"]
    # 8 answers from the model and 16 verdicts (both orders) from the judge, less the 5 samples whose
    # answer equals the reference: their two orders are one request (same text), asked once and then
    # answered from the cache
    assert sent_first == stats["sent"] == 19 and stats["sent"] + stats["cache_hits"] == 24
    assert sent_again == sent_first  # the rerun paid for nothing
    assert len(eval_store.list(kind="eval", name="cached")) == 1
    assert_one_line_error(poor)
    assert "budget" in poor.err and not eval_store.list(kind="eval", name="poor")


def test_a_wrong_index_or_wrong_compare_inputs_are_one_error_line(cli, eval_store, tmp_path):
    task = "{name: t, dataset: {ref: chats}, metrics: [perplexity], limit: 2}"
    result = run_eval(cli, eval_store, tmp_path,
                      f"models: [small-a]\ntasks:\n  - {task}\ncontamination: {{against: index, index: small-b}}\n",
                      name="badindex")  # fmt: skip
    assert_one_line_error(result)
    assert "small-b" in result.err and "not a decontamination index" in result.err
    assert not eval_store.list(kind="eval", name="badindex")
    assert (
        run_eval(cli, eval_store, tmp_path, f"models: [small-a]\ntasks:\n  - {task}\n", name="single").code
        == 0
    )
    for args, message in ((["single"], "at least two models"), (["chats", "single"], "chats")):
        result = cli("--store", eval_store.root, "eval", "compare", *args)
        assert_one_line_error(result)
        assert message in result.err


def test_what_a_task_needs_of_its_models_is_refused_before_any_work(cli, eval_store, tmp_path):
    import shutil

    from synth.serve import start_server

    other = tiny_tokenizer(WORDS[::-1])  # the same words under other ids
    source = eval_store.resolve("small-b").location / CHECKPOINT_DIR
    with Publisher(eval_store, kind="run", name="other-vocab", stage="test", recipe={}) as pub:
        shutil.copytree(source, pub.dir / CHECKPOINT_DIR)
        other.save_pretrained(pub.dir / CHECKPOINT_DIR)
        pub.publish(stats={})
    agree = "{name: t, dataset: {ref: chats}, metrics: [kl_teacher_student], teacher: other-vocab}"
    result = run_eval(cli, eval_store, tmp_path, f"models: [small-a]\ntasks:\n  - {agree}\n", name="vocab")
    assert_one_line_error(result)
    assert "small-a" in result.err and "other-vocab" in result.err and "different tokenizers" in result.err
    with start_server("echo") as server:
        publish_dataset(
            eval_store,
            "pairs",
            {"test": [{"id": "p", "prompt": "alpha", "chosen": "beta", "rejected": "mu"}]},
        )
        rewards = "{name: t, dataset: {ref: pairs}, metrics: [reward_accuracy]}"
        result = run_eval(
            cli, eval_store, tmp_path, echo_models(server.url) + f"tasks:\n  - {rewards}\n", name="rw"
        )
        assert_one_line_error(result)
        assert "reward_accuracy needs a reward-model run" in result.err
        judged = f"""models: [small-a, small-b]
tasks:
  - {{name: qa, dataset: {{ref: qa}}, metrics: [win_rate], models: [small-a]}}
judges:
  qa: {{teacher: {{name: j, base_url: {server.url}, model: echo}}, against: small-b}}
"""
        result = run_eval(cli, eval_store, tmp_path, judged, name="against-absent")
        assert_one_line_error(result)
        assert "small-b' does not run this task" in result.err
    assert not eval_store.list(kind="eval", name="vocab") and not eval_store.list(kind="eval", name="rw")


# ------------------------------------------------------------------------ found by the review


def test_review_findings_on_what_is_scored(cli, eval_store, tmp_path):
    from eval.contamination import sample_text
    from eval.tasks import TaskConfig, load_samples
    from synth.serve import start_server

    # a row's own system message comes first; the examples' system messages are dropped
    sys_chat = [{"id": f"c{i}", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": w},
                                             {"role": "assistant", "content": w}]} for i, w in enumerate(WORDS[:3])]  # fmt: skip
    publish_dataset(eval_store, "sys-chats", {"test": sys_chat, "train": sys_chat})
    task = TaskConfig(
        name="t", dataset={"ref": "sys-chats"}, metrics=["exact_match"], fewshot={"split": "train", "n": 1}
    )
    sample = load_samples(task, eval_store.resolve("sys-chats"))[0]
    assert [m["role"] for m in sample.prompt] == ["system", "user", "assistant", "user"]
    # contamination and explain read the sample's own turns, not its few-shot examples
    assert sample_text(sample) == f"{sample.prompt[-1]['content']}\n{sample.target}"
    # one right-or-wrong metric decides `correct`, wherever it is listed
    assert (
        TaskConfig(name="t", dataset={"ref": "qa"}, metrics=["chrf", "exact_match"]).primary.name
        == "exact_match"
    )

    with start_server("echo") as server:
        result = run_eval(cli, eval_store, tmp_path, echo_models(server.url) + """tasks:
  - {name: qa, dataset: {ref: qa}, metrics: [chrf, exact_match, pass@1], generation: {max_new_tokens: 8}}
bootstrap: {samples: 0}
""", name="nobootstrap")  # fmt: skip
    assert result.code == 0, result.err
    m = metrics_of(eval_store, "nobootstrap")["tasks"]["qa"]["models"]["echo"]["metrics"]
    assert m["exact_match"]["value"] == pytest.approx(5 / 8) and m["exact_match"]["low"] is None
    assert {r["sample_id"]: r["correct"] for r in records_of(eval_store, "nobootstrap")}["q3"] is False


def test_rewards_of_chat_valued_pairs_read_the_answer_text(eval_store):
    from eval.tasks import answer_text

    assert (
        answer_text([{"role": "user", "content": "q"}, {"role": "assistant", "content": "the answer"}])
        == "the answer"
    )
    assert answer_text("plain") == "plain" and answer_text(None) == ""


def test_compare_pairs_pass_at_k_but_not_pooled_metrics(cli, eval_store, tmp_path, capsys):
    from synth.serve import start_server

    task = (
        "  - {name: qa, dataset: {ref: qa}, metrics: [pass@1, chrf, bleu], generation: {max_new_tokens: 8}}\n"
    )
    with start_server("echo") as server:
        for name, extra in (("pk-a", ""), ("pk-b", "target: question, ")):
            assert (
                run_eval(
                    cli,
                    eval_store,
                    tmp_path,
                    echo_models(server.url) + "tasks:\n" + task.replace("metrics:", extra + "metrics:"),
                    name=name,
                ).code
                == 0
            )
    data = json.loads(
        cli("--store", eval_store.root, "eval", "compare", "pk-a", "pk-b", "--format", "json").out
    )
    diffs = {r["metric"]: r["diffs"][0] for r in data["rows"]}
    assert diffs["pass@1"]["diff"] == pytest.approx(3 / 8) and diffs["bleu"] is None
    with pytest.raises(SystemExit) as exit_:  # argparse's usage error: exit 2, one line naming the option
        cli("--store", eval_store.root, "eval", "compare", "pk-a", "pk-b", "--bootstrap", "-1")
    assert exit_.value.code == 2 and "0 or more" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tasks:\n  - {name: t, dataset: {ref: bare}, metrics: [pass@1]}\n", "need a reference answer"),
        (
            "tasks:\n  - {name: t, dataset: {ref: chats}, metrics: [perplexity]}\n",
            "perplexity and teacher agreement score chat turns",
        ),
        (
            "tasks:\n  - {name: t, dataset: {ref: bare}, metrics: [win_rate]}\njudges:\n  t: {teacher: {serve: small-a}}\n",
            "against 'reference' needs a reference",
        ),
        (
            "tasks:\n  - {name: t, dataset: {ref: qa}, metrics: [win_rate]}\njudges:\n  t: {teacher: {serve: small-a}, template: 'which? {a}'}\n",
            "must contain {prompt}",
        ),
        (
            "tasks:\n  - {name: t, dataset: {ref: qa}, metrics: [chrf]}\njudges:\n  t: {teacher: {serve: small-a}}\n",
            "no win_rate metric",
        ),
        (
            "tasks:\n  - {name: t, dataset: {ref: qa}, metrics: [chrf], generation: {stop: ['']}}\n",
            "generation.stop",
        ),
    ],
)
def test_review_findings_refused_before_any_work(cli, eval_store, tmp_path, text, message):
    import shutil

    if not eval_store.list(kind="dataset", name="bare"):
        publish_dataset(eval_store, "bare", {"test": [{"id": "b0", "question": "alpha"}]})
    if not eval_store.list(kind="run", name="plain-lm"):  # a causal LM whose tokenizer has no chat template
        with Publisher(eval_store, kind="run", name="plain-lm", stage="test", recipe={}) as pub:
            shutil.copytree(eval_store.resolve("small-a").location / CHECKPOINT_DIR, pub.dir / CHECKPOINT_DIR)
            config = json.loads((pub.dir / CHECKPOINT_DIR / "tokenizer_config.json").read_text())
            config.pop("chat_template", None)
            (pub.dir / CHECKPOINT_DIR / "tokenizer_config.json").write_text(json.dumps(config))
            (pub.dir / CHECKPOINT_DIR / "chat_template.jinja").unlink(missing_ok=True)
            pub.publish(stats={})
    model = "plain-lm" if "perplexity" in text else "small-a"
    result = run_eval(cli, eval_store, tmp_path, f"models: [{model}]\n" + text, name="refused")
    assert_one_line_error(result)
    assert message in result.err, result.err
    assert not eval_store.list(kind="eval", name="refused")


def test_stop_strings_on_a_run_cut_the_answer(eval_store):
    from eval.models import RunModel
    from eval.tasks import Generation

    model = RunModel("small-a", eval_store.resolve("small-a"), eval_store)
    prompts = [[{"role": "user", "content": "alpha beta"}]]
    free = model.generate(prompts, Generation(max_new_tokens=12), True, lambda n: None)[0][0]
    word = free.split()[2]
    cut = model.generate(prompts, Generation(max_new_tokens=12, stop=[word]), True, lambda n: None)[0][0]
    assert word not in cut and free.startswith(cut)
