"""Proxy distillation (``method: proxy``): top-logprobs through ``distillery serve`` and ``synth generate``,
their alignment to another tokenization, the sparse top-k loss, a tiny proxy run and a student distilled
from it. Tiny random-init models with the tests' word-level tokenizer; a step or two of training each."""

from __future__ import annotations

import json
import math

import pytest

from manifests.errors import DistilleryError
from manifests.recipes import parse_config
from manifests.store import Store
from synth.generate import GenerateConfig, generate
from synth.serve import start_server
from synth.teacher_requests import SamplingConfig
from train.distill import DistillRecipe, train_distill
from train.proxy import ProxyRecipe, align_top_logprobs, sparse_topk_kl, train_proxy

from .conftest import WORDS, assert_one_line_error, tiny_tokenizer, write_recipe
from .test_serve import call
from .test_train_distill import llama, publish_model
from .test_train_sft import publish_dataset

pytestmark = pytest.mark.network  # (loopback servers)


@pytest.fixture(scope="module")
def px_store(tmp_path_factory) -> Store:
    """Runs ``teacher`` (the black box, served), ``proxy-base``, ``student``, ``foreign`` (another
    vocabulary); datasets ``docs`` (text), ``api`` (answers with top-3 log-probs from the served teacher)
    and ``plain`` (answers of an endpoint that returns no log-probs: ``echo``)."""
    import torch

    store = Store(tmp_path_factory.mktemp("proxy") / "store")
    tok = tiny_tokenizer()
    teacher = llama(1, 2, 64, 4, sharp=30.0)
    with torch.no_grad():  # an API's answers are text: no padding, unknown or start-of-turn tokens in them
        teacher.lm_head.weight[
            [tok.pad_token_id, tok.unk_token_id, tok.convert_tokens_to_ids("<|im_start|>")]
        ] = 0
    publish_model(store, "teacher", teacher, tok)
    publish_model(store, "proxy-base", llama(2, 1, 32, 2), tok)
    publish_model(store, "student", llama(3, 1, 32, 2), tok)
    other = tiny_tokenizer(WORDS[:-5])
    publish_model(store, "foreign", llama(4, 1, 32, 2, vocab=len(other)), other)
    docs = [
        {"id": f"d{i}", "text": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(4))} for i in range(8)
    ]
    publish_dataset(store, "docs", docs)
    sampling = {"max_tokens": 8, "temperature": 0, "top_logprobs": 3}
    common = {"input": "docs", "prompt_template": "{text}", "sampling": sampling}
    generate(
        parse_config(GenerateConfig, common | {"name": "api", "teachers": [{"serve": "teacher"}]}, "t"), store
    )
    with start_server("echo") as server:
        echo = [{"model": "echo", "base_url": server.url}]
        generate(
            parse_config(GenerateConfig, common | {"name": "plain", "teachers": echo, "limit": 4}, "t"), store
        )
    return store


def proxy(store: Store, name: str, **recipe):
    data = {"name": name, "model": "proxy-base", "datasets": [{"ref": "api"}, {"ref": "plain"}], "max_steps": 2,
            "max_length": 64, "learning_rate": 1e-2, "per_device_batch_size": 4, "peft": {"method": "none"}} | recipe  # fmt: skip
    return train_proxy(parse_config(ProxyRecipe, data, "test"), store)


def test_serve_returns_top_logprobs_of_the_models_own_log_softmax(px_store):
    import torch

    from manifests.models import load_causal_lm
    from synth.teacher import token_text

    messages = [{"role": "user", "content": "alpha beta gamma"}]
    body = {"model": "teacher", "messages": messages, "max_tokens": 5, "temperature": 0, "logprobs": True,
            "top_logprobs": 3}  # fmt: skip
    with start_server("teacher", px_store) as server:
        status, _, raw = call(server.url + "/chat/completions", body)
        assert status == 200, raw
        plain = json.loads(
            call(server.url + "/chat/completions", body | {"logprobs": False, "top_logprobs": None})[2]
        )
    choice = json.loads(raw)["choices"][0]
    assert plain["choices"][0]["logprobs"] is None and plain["choices"][0]["message"] == choice["message"]
    content = choice["logprobs"]["content"]
    assert content and all(len(e["top_logprobs"]) == 3 for e in content)
    model, tokenizer = load_causal_lm(px_store.resolve("teacher"), px_store)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = list(ids["input_ids"])
    for entry in content:  # greedy, token by token: the server's numbers are the model's own
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)
        values, top = logp.topk(3)
        assert [e["logprob"] for e in entry["top_logprobs"]] == pytest.approx(values.tolist(), abs=1e-4)
        assert [e["token"] for e in entry["top_logprobs"]] == [
            token_text(tokenizer, ids, int(i)) for i in top
        ]
        chosen = int(top[0])
        assert entry["token"] == token_text(tokenizer, ids, chosen)
        assert entry["logprob"] == pytest.approx(float(logp[chosen]), abs=1e-4)
        ids.append(chosen)
    answer = ids[len(ids) - len(content) :]
    assert choice["message"]["content"] == tokenizer.decode(answer, skip_special_tokens=True).strip()


def test_generate_keeps_top_logprobs_and_nulls_where_the_endpoint_has_none(px_store):
    from manifests.data import read_table

    api = read_table(px_store.resolve("api"), columns=["messages", "logprobs", "requests"]).to_pylist()
    assert api and all(r["logprobs"] for r in api)
    first = api[0]
    assert "".join(t["token"] for t in first["logprobs"]).find(first["messages"][-1]["content"]) >= 0
    assert all(len(t["top"]) == 3 for t in first["logprobs"])
    assert json.loads(first["requests"][0]["sampling"])["top_logprobs"] == 3
    plain = read_table(px_store.resolve("plain"), columns=["logprobs"]).to_pylist()
    assert plain and all(r["logprobs"] is None for r in plain)
    # Not asked for, the option is not in the request key: earlier runs' cached answers still match.
    assert "top_logprobs" not in SamplingConfig().resolved()


def test_alignment_uses_coinciding_boundaries_and_skips_the_rest():
    proxy_ids = {"the": 10, " cat": 11, " dog": 13, " sat": 12, " mat": 14}
    to_proxy = proxy_ids.get
    api = [
        {"token": "the", "logprob": -0.1, "top": [{"token": "the", "logprob": -0.1}, {"token": "a", "logprob": -2.5}]},
        {"token": " cat", "logprob": -0.2, "top": [{"token": " cat", "logprob": -0.2}, {"token": " dog", "logprob": -1.8}]},
        {"token": " s", "logprob": -0.3, "top": []},
        {"token": "at", "logprob": -0.01, "top": []},
    ]  # fmt: skip
    # The proxy has "the", " cat", " sat" and an end-of-turn: "the" coincides but "a" is no proxy token,
    # " cat" coincides with its alternative " dog" a proxy token; " s" + "at" are two API tokens for " sat".
    texts, ids = ["the", " cat", " sat", " <|im_end|>"], [10, 11, 12, 2]
    out = align_top_logprobs("the cat sat", api, texts, ids, to_proxy)
    assert out.targets == {1: ([11, 13], [-0.2, -1.8])}
    assert out.api_positions == 4 and dict(out.skipped) == {"alternatives": 1, "boundary": 2}

    # A chosen token sampled outside the top-k is still a target; two alternatives on one proxy token are not.
    api = [{"token": "the", "logprob": -3.0, "top": [{"token": " mat", "logprob": -0.5}]},
           {"token": " cat", "logprob": -0.2, "top": [{"token": " dog", "logprob": -1.0}, {"token": " Dog", "logprob": -2.0}]}]  # fmt: skip
    out = align_top_logprobs("the cat", api, texts[:2], ids[:2], lambda t: proxy_ids.get(t.lower()))
    assert out.targets == {0: ([14, 10], [-0.5, -3.0])} and dict(out.skipped) == {"alternatives": 1}

    # Another leading space on one side: the spans differ; text that is in neither: the row is unaligned.
    api = [{"token": " the", "logprob": -0.1, "top": []}, {"token": " cat", "logprob": -0.2, "top": []}]
    out = align_top_logprobs("the cat", api, ["the", " cat"], ids[:2], to_proxy)
    assert out.targets == {1: ([11], [-0.2])} and dict(out.skipped) == {"boundary": 1}
    out = align_top_logprobs("a dog", api, texts, ids, to_proxy)
    assert not out.targets and dict(out.skipped) == {"unaligned_row": 2}


def test_sparse_topk_kl_equals_a_direct_computation():
    import torch

    logits = torch.tensor(
        [[1.0, -0.5, 2.0, 0.3, -1.2], [0.1, 0.2, 0.3, 0.4, 0.5], [2.0, 1.0, 0.0, -1.0, 3.0]]
    )
    ids = torch.tensor([[2, 0, 4], [1, -1, -1], [-1, -1, -1]])
    api = torch.tensor([[-0.4, -1.6, -3.0], [-0.05, 0.0, 0.0], [0.0, 0.0, 0.0]])
    got = sparse_topk_kl(logits, ids, api)

    def direct(row: int) -> float:
        z = sum(math.exp(v) for v in logits[row].tolist())
        q = [math.exp(v) / z for v in logits[row].tolist()]
        named = [(int(i), float(lp)) for i, lp in zip(ids[row], api[row], strict=True) if i >= 0]
        if not named:
            return 0.0
        kl = sum(math.exp(lp) * (lp - math.log(q[i])) for i, lp in named)
        rest, q_rest = 1 - sum(math.exp(lp) for _, lp in named), 1 - sum(q[i] for i, _ in named)
        return kl + (rest * math.log(rest / q_rest) if rest > 0 else 0.0)

    assert got.tolist() == pytest.approx([direct(r) for r in range(3)], abs=1e-6)
    assert got[0] > 0 and got[2] == 0
    # The proxy's own distribution as the API's top-k: nothing left to learn.
    logp = logits[:1].log_softmax(-1)
    assert float(sparse_topk_kl(logits[:1], ids[:1], logp.gather(-1, ids[:1]))) == pytest.approx(
        0.0, abs=1e-6
    )


def test_proxy_run_names_the_black_box_teacher_and_a_student_distils_from_it(px_store):
    run = proxy(px_store, "teacher-proxy", student="student")
    stats, recipe = run.stats, run.producer.recipe
    teacher_id = px_store.resolve("teacher").id
    endpoints = {(t["endpoint"], t["served_model"]) for t in stats["black_box_teachers"]}
    assert (f"serve:{teacher_id}", "teacher") in endpoints
    assert any(
        served == "echo" and endpoint.startswith("http://127.0.0.1:") for endpoint, served in endpoints
    )
    assert {(t["endpoint"], t["served_model"]) for t in recipe["black_box_teachers"]} == endpoints
    parents = {p.name: p for p in run.parents}
    assert (
        parents["api"].id == px_store.resolve("api").id
        and parents["plain"].id == px_store.resolve("plain").id
    )
    assert parents["proxy-base"].role == "base_model"
    assert stats["rows_without_logprobs"] == 4 and stats["rows_with_logprobs"] == 8
    positions = stats["logprob_positions"]
    assert (
        positions["used"] > 0 and positions["used"] + sum(positions["skipped"].values()) == positions["api"]
    )
    assert stats["top_k"] >= 3 and stats["steps"] == 2 and math.isfinite(stats["components"]["proxy_topk_kl"])

    data = {"name": "from-proxy", "model": "student", "teacher": "teacher-proxy", "datasets": [{"ref": "api"}],
            "max_steps": 1, "max_length": 64, "per_device_batch_size": 4, "peft": {"method": "none"}}  # fmt: skip
    student = train_distill(parse_config(DistillRecipe, data, "test"), px_store)
    roles = {p.id: p.role for p in student.parents}
    assert roles[run.id] == "teacher" and student.stats["teachers"] == [run.id]


def test_bad_proxy_input_is_one_line(px_store, cli, tmp_path):
    recipe = write_recipe(tmp_path / "p.yaml", "stage: train\nmethod: proxy\nname: p\nmodel: proxy-base\n"
                          "datasets: [{ref: docs}]\nmax_steps: 1\n")  # fmt: skip
    result = cli("--store", px_store.root, "train", recipe)
    assert_one_line_error(result, code=2)
    assert "docs" in result.err and "messages" in result.err
    with pytest.raises(DistilleryError, match="different tokenizers"):
        proxy(px_store, "p", student="foreign")
