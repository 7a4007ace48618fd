"""``stage: eval.harness``: lm-evaluation-harness tasks on store models, offline.

Tiny random-init Llamas (word-level tokenizer, as elsewhere in the tests) are scored on local tasks
written as lm-eval YAMLs over a JSONL file. The tasks folder is shared by the module, so lm-eval's
task index (seconds to build) is built once.
"""

from __future__ import annotations

import hashlib
import json
import sys

import pyarrow.parquet as pq
import pytest

from eval.harness import INSTALL, RECORD_FIELDS, run_recipe
from manifests.errors import DistilleryError
from manifests.model_runs import CHECKPOINT_DIR
from manifests.publish import Publisher
from manifests.store import Store
from manifests.verify import verify

from .conftest import tiny_tokenizer

pytest.importorskip("lm_eval")

VOCAB = ["question", "answer", "alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
DOCS = [
    {"question": f"{VOCAB[2 + i % 8]} {VOCAB[2 + (i + 1) % 8]}",
     "choices": [VOCAB[2 + (i + k) % 8] for k in (2, 3, 4)], "label": i % 3}
    for i in range(8)
]  # fmt: skip
MULTIPLE_CHOICE = """task: tiny_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "question {{{{question}}}} answer"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
GENERATION = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: generate_until
doc_to_text: "question {{{{question}}}} answer"
doc_to_target: "{{{{choices[label]}}}}"
generation_kwargs:
  until: ["<|im_end|>"]
  max_gen_toks: 3
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
GROUP = """group: tiny_group
task: [tiny_local, tiny_gen]
aggregate_metric_list:
  - metric: acc
    weight_by_size: true
"""


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # Nothing here may reach a hub: the `json` builder of datasets reads the local file.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """(store with runs tiny-a, tiny-b and a tokenizer-only run, the folder of the task YAMLs)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tmp = tmp_path_factory.mktemp("harness")
    tasks = tmp / "tasks"
    tasks.mkdir()
    data = tasks / "tiny.jsonl"
    cache = tmp / "hf-datasets"  # the datasets' Arrow cache, here rather than in the user's home
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tasks / "tiny_local.yaml").write_text(MULTIPLE_CHOICE.format(data=data, cache=cache))
    (tasks / "tiny_gen.yaml").write_text(GENERATION.format(data=data, cache=cache))
    (tasks / "tiny_group.yaml").write_text(GROUP)
    broken = MULTIPLE_CHOICE.replace("task: tiny_local", "task: tiny_broken")
    (tasks / "tiny_broken.yaml").write_text(broken.format(data=tasks / "missing.jsonl", cache=cache))

    store = Store(tmp / "store")
    tokenizer = tiny_tokenizer(VOCAB)
    for seed, name in enumerate(["tiny-a", "tiny-b"]):
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                             pad_token_id=0)  # fmt: skip
        with Publisher(
            store, kind="run", name=name, stage="train.import-model", recipe={"seed": seed}
        ) as pub:
            LlamaForCausalLM(config).save_pretrained(pub.dir / CHECKPOINT_DIR)
            tokenizer.save_pretrained(pub.dir / CHECKPOINT_DIR)
            pub.publish(stats={})
    with Publisher(store, kind="run", name="tok", stage="train.tokenizer", recipe={}) as pub:
        tokenizer.save_pretrained(pub.dir / CHECKPOINT_DIR)
        pub.publish(stats={})
    return store, tasks


def recipe(tasks_folder, **overrides) -> dict:
    return {"stage": "eval.harness", "name": "h", "models": ["tiny-a"], "tasks": ["tiny_local"],
            "include_path": str(tasks_folder), "limit": 8, "batch_size": 4} | overrides  # fmt: skip


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def records(manifest):
    [shard] = manifest.data_files("records")
    return pq.read_table(manifest.location / shard.path)


def test_multiple_choice_task_on_two_models(harness):
    store, tasks = harness
    a, b = store.resolve("tiny-a"), store.resolve("tiny-b")
    manifest = run_recipe(recipe(tasks, name="mc", models=["tiny-a", "tiny-b"]), store, "recipe")

    assert manifest.kind == "eval" and manifest.producer.stage == "eval.harness" and verify(manifest).ok
    assert {(p.id, p.role) for p in manifest.parents} == {(a.id, "model"), (b.id, "model")}
    recipe_ = manifest.producer.recipe
    assert recipe_["models"] == [a.id, b.id] and recipe_["lm_eval_version"]
    files = {"tiny.jsonl", "tiny_broken.yaml", "tiny_gen.yaml", "tiny_group.yaml", "tiny_local.yaml"}
    assert set(recipe_["include_files"]) == files

    metrics = json.loads((manifest.location / "metrics.json").read_text())
    assert metrics["bootstrap"] is None
    task = metrics["tasks"]["tiny_local"]
    assert (task["dataset"], task["split"], task["samples"], task["primary"], task["paired"]) == (
        None, None, 8, "acc", [])  # fmt: skip
    harness_ = metrics["harness"]
    assert harness_["lm_eval_version"] == recipe_["lm_eval_version"]
    assert harness_["config"]["limit"] == 8 and harness_["tasks"]["tiny_local"]["n_shot"] == 0
    assert harness_["tasks"]["tiny_local"]["config"]["output_type"] == "multiple_choice"

    table = records(manifest)
    fixed = [name for name, _ in RECORD_FIELDS]
    assert table.column_names == [*fixed, "acc"]
    rows = table.to_pylist()
    assert len({r["id"] for r in rows}) == len(rows) == 16
    for model in (a, b):
        acc = task["models"][model.ref]["metrics"]["acc"]
        assert task["models"][model.ref]["run_id"] == model.id
        assert 0 <= acc["value"] <= 1 and acc["n"] == 8 and acc["higher_is_better"] is True
        assert acc["low"] == pytest.approx(acc["value"] - 1.96 * acc["stderr"])
        assert acc["high"] == pytest.approx(acc["value"] + 1.96 * acc["stderr"])
        mine = sorted((r for r in rows if r["model"] == model.ref), key=lambda r: int(r["sample_id"]))
        assert [r["sample_id"] for r in mine] == [str(i) for i in range(8)]
        assert all(
            r["model_id"] == model.id and r["task"] == "tiny_local" and r["parents"] == [] for r in mine
        )
        assert acc["value"] == pytest.approx(sum(r["acc"] for r in mine) / len(mine))
        assert manifest.stats["tasks"]["tiny_local"][model.ref]["acc"] == acc["value"]
        for r, doc in zip(mine, DOCS, strict=True):
            assert r["correct"] == (r["acc"] == 1.0)
            assert r["prompt_sha256"] == sha(f"question {doc['question']} answer")
            assert r["target_sha256"] == sha(doc["choices"][doc["label"]])
            assert len(r["outputs"]) == 3  # one loglikelihood per choice
            assert r["extracted"][0] in doc["choices"]
            assert r["correct"] == (r["extracted"][0] == doc["choices"][doc["label"]])

    # The loaded tasks serve every model: b scored alone gives what it gave second.
    alone = run_recipe(recipe(tasks, name="mc-b", models=["tiny-b"]), store, "recipe")
    alone_acc = json.loads((alone.location / "metrics.json").read_text())["tasks"]["tiny_local"]["models"]
    assert alone_acc[b.ref]["metrics"]["acc"]["value"] == task["models"][b.ref]["metrics"]["acc"]["value"]
    assert sorted(records(alone).column("acc").to_pylist()) == sorted(
        r["acc"] for r in rows if r["model"] == b.ref
    )


def test_generation_task_with_exact_match(harness):
    store, tasks = harness
    manifest = run_recipe(recipe(tasks, name="gen", tasks=["tiny_gen"], limit=3), store, "recipe")
    metrics = json.loads((manifest.location / "metrics.json").read_text())
    task = metrics["tasks"]["tiny_gen"]
    assert task["samples"] == 3 and task["primary"] == "exact_match"
    em = task["models"][store.resolve("tiny-a").ref]["metrics"]["exact_match"]
    rows = records(manifest).to_pylist()
    assert len(rows) == 3 and all(len(r["outputs"]) == 1 and len(r["extracted"]) == 1 for r in rows)
    assert all(r["correct"] == (r["exact_match"] == 1.0) for r in rows)
    assert em["value"] == pytest.approx(sum(r["exact_match"] for r in rows) / 3)
    assert [r["target_sha256"] for r in rows] == [sha(d["choices"][d["label"]]) for d in DOCS[:3]]


def test_a_group_reports_its_tasks_and_itself(harness):
    store, tasks = harness
    manifest = run_recipe(recipe(tasks, name="group", tasks=["tiny_group"], limit=2), store, "recipe")
    reported = json.loads((manifest.location / "metrics.json").read_text())["tasks"]
    assert set(reported) == {"tiny_group", "tiny_local", "tiny_gen"}
    label = store.resolve("tiny-a").ref
    group = reported["tiny_group"]
    # The group's acc comes from tiny_local alone (tiny_gen has none); its samples are both tasks'.
    assert group["samples"] == 4 and group["models"][label]["metrics"]["acc"]["n"] == 2
    assert (
        group["models"][label]["metrics"]["acc"]["value"]
        == reported["tiny_local"]["models"][label]["metrics"]["acc"]["value"]
    )
    rows = records(manifest).to_pylist()
    assert sorted((r["task"], r["sample_id"]) for r in rows) == [
        ("tiny_gen", "0"), ("tiny_gen", "1"), ("tiny_local", "0"), ("tiny_local", "1")]  # fmt: skip


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"tasks": ["tiny_locl"]}, "tasks: 'tiny_locl' is no task of lm-eval"),
        ({"tasks": ["tiny_local", "hellaswg"]}, "tasks: 'hellaswg' is no task of lm-eval"),
        ({"tasks": ["tiny_local", "tiny_local"]}, "tiny_local given twice"),
        ({"tasks": ["tiny_broken"]}, "lm-eval task 'tiny_broken' cannot be loaded ("),
        ({"include_path": "no/such/tasks"}, "include_path no/such/tasks: no such folder"),
        ({"models": ["tok"]}, "is a tokenizer"),
        ({"limt": 3}, "unknown key 'limt'; did you mean 'limit'?"),
        ({"device": "gpu"}, "device: 'gpu' is no torch device"),
    ],
)
def test_bad_input_is_one_line_and_publishes_nothing(harness, change, expected):
    store, tasks = harness
    before = {m.id for m in store.list()}
    with pytest.raises(DistilleryError) as error:
        run_recipe(recipe(tasks, name="bad") | change, store, "recipe")
    message = str(error.value)
    assert expected in message and "\n" not in message, message
    if "tiny_locl" in change.get("tasks", []):
        assert "did you mean 'tiny_local'" in message
    if "hellaswg" in change.get("tasks", []):
        assert "did you mean 'hellaswag'" in message
    assert {m.id for m in store.list()} == before


def test_without_lm_eval_it_says_how_to_install(harness, monkeypatch):
    store, tasks = harness
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if it were not installed
    with pytest.raises(DistilleryError) as error:
        run_recipe(recipe(tasks), store, "recipe")
    assert str(error.value) == INSTALL
