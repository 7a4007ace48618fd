"""Curricula: the order function, the mixture in that order, a tiny SFT run that trains in it, the RL
and pretraining orders, and the one-line errors for scores that cannot order the rows."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pytest

from manifests.models import CHECKPOINT_DIR
from manifests.publish import Publisher
from manifests.store import Store
from train.curriculum import Curriculum, curriculum_order
from train.data import DatasetInput, load_mixture, resolve_datasets

from .conftest import assert_one_line_error, tiny_tokenizer, write_recipe
from .test_train_sft import chat_rows, publish_dataset, tiny_model


def _stages(direct: list[int], stages: int) -> list[list[int]]:
    n = len(direct)
    return [direct[n * k // stages : n * (k + 1) // stages] for k in range(stages)]


def test_the_order_is_the_sorted_scores_and_stages_are_shuffled_quantiles():
    rng = random.Random(7)
    scores = [rng.choice([0.5, 1.0, 2.5]) if i % 4 == 0 else rng.random() * 10 for i in range(40)]  # ties too
    ascending = sorted(range(40), key=lambda i: (scores[i], i))  # ties keep the mixture's order
    descending = sorted(range(40), key=lambda i: (-scores[i], i))
    assert curriculum_order(scores, Curriculum(by="s"), seed=0).tolist() == ascending
    assert curriculum_order(scores, Curriculum(by="s", order="descending"), seed=0).tolist() == descending

    staged = curriculum_order(scores, Curriculum(by="s", stages=3), seed=5).tolist()
    parts = _stages(staged, 3)
    for k, (got, want) in enumerate(zip(parts, _stages(ascending, 3), strict=True)):
        assert sorted(got) == sorted(want)  # stage k is the k-th third of the scores
        # ... in the order of its own generator of (seed, stage): documented, so a resumed run repeats it
        assert got == np.random.default_rng([5, k]).permutation(want).tolist()
    assert staged != ascending  # shuffled within stages
    assert curriculum_order(scores, Curriculum(by="s", stages=3), seed=5).tolist() == staged
    assert curriculum_order(scores, Curriculum(by="s", stages=3), seed=6).tolist() != staged
    # More stages than rows: every row once, still in stage order.
    assert sorted(curriculum_order([3, 1], Curriculum(by="s", stages=5), seed=0).tolist()) == [0, 1]


def _scored(store: Store, name: str, scores: list, split: str = "train"):
    rows = [
        {"id": f"{name}-{i}", "parents": [], "prompt": "p " * (i + 1), "score": s}
        for i, s in enumerate(scores)
    ]
    with Publisher(store, kind="dataset", name=name, stage="test", recipe={"scores": scores}) as pub:
        pub.write_table(pa.Table.from_pylist(rows), split=split)
        return pub.publish()


def test_the_mixture_is_mixed_first_then_ordered(store):
    big = [float(i % 7) for i in range(30)]
    small = [2 * i + 1 for i in range(5)]  # integers: scores of both kinds mix
    _scored(store, "big", big)
    _scored(store, "small", small)
    score = {f"big-{i}": s for i, s in enumerate(big)} | {f"small-{i}": s for i, s in enumerate(small)}
    inputs = [DatasetInput(ref="big", weight=2), DatasetInput(ref="small", weight=1)]
    curriculum = Curriculum(by="score", order="descending")
    manifests = resolve_datasets(inputs, store, ["id"], "SFT", curriculum)
    mixed = list(load_mixture(inputs, manifests, ["id"], seed=3)["id"])
    ordered = load_mixture(inputs, manifests, ["id"], seed=3, curriculum=curriculum)
    assert ordered.column_names == ["id"]  # the score was read to order, not kept
    # The same rows as the weighted mixture (the small dataset repeated), in the score's order.
    assert list(ordered["id"]) == [
        mixed[i] for i in sorted(range(len(mixed)), key=lambda i: (-score[mixed[i]], i))
    ]
    assert len(mixed) > 35
    by_length = load_mixture(
        inputs[:1], manifests[:1], ["id", "prompt"], 0, curriculum=Curriculum(by="length")
    )
    assert [len(p) for p in by_length["prompt"]] == sorted(len(p) for p in by_length["prompt"])


def test_rl_prompts_and_pretraining_rows_follow_the_order_on_every_process():
    from datasets import Dataset

    from train.launch import Dist
    from train.pretrain import Batches, TokenRows
    from train.rl_core import step_prompts

    assert [step_prompts(5, s, 2, seed=0, shuffle=False) for s in (1, 2, 3)] == [[0, 1], [2, 3], [4, 0]]
    tokens = TokenRows(Dataset.from_dict({"input_ids": [[i, i] for i in range(8)]}))
    seen = []
    for position in (0, 4, 8):  # each process takes its slice of one global order, pass after pass
        for rank in (0, 1):
            batch, _ = Batches(tokens, 0, Dist(rank=rank, world=2), per_device=2, shuffle=False).take(
                position
            )
            seen += batch[:, 0].tolist()
    assert seen == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]


def test_trainer_methods_ask_the_trainer_for_a_sequential_sampler(tmp_path):
    from trl import RewardConfig

    from train.dpo import DPORecipe
    from train.reward import RewardRecipe
    from train.sft import sft_arguments

    base = {"name": "r", "model": "m", "datasets": [{"ref": "d"}]}
    for recipe, config in ((DPORecipe, None), (RewardRecipe, RewardConfig)):
        ordered = recipe(**base, curriculum={"by": "margin"})
        assert sft_arguments(ordered, tmp_path, None, 1, config).train_sampling_strategy == "sequential"
        assert sft_arguments(recipe(**base), tmp_path, None, 1, config).train_sampling_strategy == "random"


@pytest.fixture(scope="module")
def curriculum_store(tmp_path_factory) -> Store:
    """A tiny base model ``tiny``; chats with a ``difficulty`` score; preference pairs without a margin;
    packed rows; chats whose score is text, or has a gap."""
    store = Store(tmp_path_factory.mktemp("curriculum") / "store")
    with Publisher(store, kind="run", name="tiny", stage="test", recipe={"tiny": True}) as pub:
        tiny_model().save_pretrained(pub.dir / CHECKPOINT_DIR)
        tiny_tokenizer().save_pretrained(pub.dir / CHECKPOINT_DIR)
        pub.publish(stats={})
    rows = chat_rows(12, seed=3)
    rng = random.Random(1)
    publish_dataset(store, "graded", [r | {"difficulty": rng.random()} for r in rows])
    publish_dataset(store, "worded", [r | {"difficulty": "hard"} for r in rows])
    publish_dataset(store, "gappy", [r | {"difficulty": None if i == 3 else 1.0} for i, r in enumerate(rows)])
    publish_dataset(store, "prefs", [{"id": f"p{i}", "prompt": "alpha", "chosen": "beta", "rejected": "gamma"}
                                     for i in range(4)])  # fmt: skip
    publish_dataset(store, "packed", [{"id": f"k{i}", "input_ids": [7, 8, 9, 10]} for i in range(4)])
    return store


def test_sft_trains_on_the_batches_in_curriculum_order(curriculum_store, monkeypatch):
    import train.sft
    from manifests.chat_labels import labelled_conversation
    from manifests.data import read_table
    from manifests.recipes import parse_config

    seen: list[list[int]] = []
    original = train.sft.sft_trainer

    def recording_trainer(loss, **kwargs):  # records every batch the loss is computed on
        trainer = original(loss, **kwargs)
        compute_loss = trainer.compute_loss

        def compute(model, inputs, *args, **kw):
            if model.training:
                seen.extend(
                    [t for t in row if t != 0] for row in inputs["input_ids"].tolist()
                )  # (0: padding)
            return compute_loss(model, inputs, *args, **kw)

        trainer.compute_loss = compute
        return trainer

    monkeypatch.setattr(train.sft, "sft_trainer", recording_trainer)
    curriculum = {"by": "difficulty", "order": "descending", "stages": 1}
    data = {"name": "ordered", "model": "tiny", "datasets": [{"ref": "graded"}], "max_steps": 4,
            "per_device_batch_size": 2, "max_length": 128, "curriculum": curriculum}  # fmt: skip
    run = train.sft.train_sft(parse_config(train.sft.SFTRecipe, data, "test"), curriculum_store)

    table = read_table(curriculum_store.resolve("graded", kind="dataset")).to_pylist()
    tokenizer = tiny_tokenizer()
    tokens = [labelled_conversation(r["messages"], tokenizer, r["id"])["input_ids"] for r in table]
    assert len({tuple(t) for t in tokens}) == len(tokens)  # each row is known by its tokens
    hardest_first = sorted(range(len(table)), key=lambda i: -table[i]["difficulty"])
    assert [tokens.index(t) for t in seen] == hardest_first[:8]  # 4 steps of 2, in order
    assert run.producer.recipe["curriculum"] == curriculum


def test_scores_that_cannot_order_the_rows_are_one_line_before_a_model_loads(cli, curriculum_store, tmp_path,
                                                                             monkeypatch):  # fmt: skip
    import train.dpo
    import train.sft

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    for module in (train.sft, train.dpo):
        monkeypatch.setattr(module, "load_causal_lm", no_model)
    sft = "stage: train\nname: bad\nmodel: tiny\n"
    cases = [
        (sft + "datasets: [{ref: graded}]\ncurriculum: {by: mine_score}\n",
         "curriculum: dataset graded@", "has no column 'mine_score' to order by",
         "it has: id, parents, messages, difficulty"),
        (sft + "datasets: [{ref: worded}]\ncurriculum: {by: difficulty}\n",
         "column 'difficulty' of dataset worded@", "holds string, not numbers"),
        (sft + "datasets: [{ref: gappy}]\ncurriculum: {by: difficulty}\n",
         "column 'difficulty' of dataset gappy@", "has 1 empty score(s)"),
        (sft + "datasets: [{ref: graded}]\npacking: true\ncurriculum: {by: difficulty}\n",
         "curriculum: packing: true reorders the examples", "set packing: false"),
        (sft + "method: dpo\ndatasets: [{ref: prefs}]\ncurriculum: {by: margin}\n",
         "curriculum: dataset prefs@", "no column 'margin' to order by",
         "it has: id, prompt, chosen, rejected"),
        ("stage: train\nmethod: pretrain\nname: bad\ntokenizer: tiny\ndatasets: [{ref: packed}]\n"
         "curriculum: {by: length}\n", "by: length counts the characters", "dataset packed@"),
    ]  # fmt: skip
    for text, *expected in cases:
        result = cli(
            "--store", curriculum_store.root, "train", "run", write_recipe(tmp_path / "r.yaml", text)
        )
        assert_one_line_error(result)
        for part in expected:
            assert part in result.err, (part, result.err)
    assert not [m for m in curriculum_store.list() if m.name == "bad"]
