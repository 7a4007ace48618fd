"""``synth.loop``: two rounds of mine → teacher → train on the echo server; a kill in round 1's training
and a second start finish the loop with no teacher request sent twice."""

from __future__ import annotations

import json
from collections import Counter

import yaml

from manifests.data import read_table
from manifests.store import Store
from synth.serve import start_server

from .conftest import ROOT, WORDS, assert_one_line_error, tiny_tokenizer, write_jsonl, write_recipe
from .test_train_distill import llama, publish_model
from .test_train_sft import run_cli


def loop_recipe(tmp_path, echo_url: str, **changes) -> dict:
    rows = [{"question": f"{WORDS[i]} {WORDS[i + 1]} {WORDS[i + 2]}", "answer": WORDS[i + 2], "domain": "ab"[i % 2]}
            for i in range(8)]  # fmt: skip
    pool = write_jsonl(tmp_path / "pool.jsonl", rows)
    return {"stage": "synth.loop", "name": "lp", "student": "student", "candidates": str(pool), "rounds": 2,
            "mine": {"scores": {"pass_at_k": 1}, "samples": 2, "sampling": {"temperature": 1.0, "max_tokens": 4},
                     "verify": {"method": "exact", "extract": "auto"},
                     "select": {"top_fraction": 0.5, "stratify_by": "domain"}}, "reweight": True,
            "teacher": {"stage": "synth.cot", "teachers": [{"base_url": echo_url, "model": "echo"}],
                        "sampling": {"max_tokens": 8}, "verify": "none", "max_tries": 1,
                        "keep_columns": ["mine_score", "domain"]},
            "train": {"method": "sft", "max_steps": 2, "save_every": 1, "per_device_batch_size": 2,
                      "max_length": 64, "peft": {"method": "none"}, "learning_rate": 1e-3,
                      "curriculum": {"by": "mine_score", "order": "descending"}}} | changes  # fmt: skip


def test_a_killed_loop_resumes_where_it_was_and_asks_the_teacher_nothing_twice(tmp_path, cli, capsys):
    store = Store(tmp_path / "store")
    publish_model(store, "student", llama(3, 1, 32, 2), tiny_tokenizer())
    capsys.readouterr()
    log = tmp_path / "teacher-requests.jsonl"
    with start_server("echo", request_log=log) as echo:
        recipe = write_recipe(tmp_path / "loop.yaml", yaml.safe_dump(loop_recipe(tmp_path, echo.url)))
        killed = run_cli(store, "run", str(recipe), env={"DISTILLERY_FAULT_EXIT_AFTER_STEP": "1"})
        assert killed.returncode != 0
        journal = json.loads(next((store.root / "loops" / "lp").glob("*.json")).read_text())
        assert journal["r1/train"] == {"started": True} and "id" in journal["r1/teacher"]
        asked_before = len(log.read_text().splitlines())
        assert asked_before == 4  # round 1's four mined questions, one teacher request each
        done = cli("--store", store.root, "run", recipe)  # the second start, in this process
        assert done.code == 0, done.err[-3000:]
    keys = [json.loads(line)["key"] for line in log.read_text().splitlines()]
    assert len(keys) == 6 and not [k for k, n in Counter(keys).items() if n > 1]  # rounds 1 and 2, none twice
    assert "r1/mine: done before" in done.out and "r1/teacher: done before" in done.out
    result = store.resolve("lp")
    rounds = read_table(result).to_pylist()
    # Half of 8 candidates in round 1, half of the 4 never mined in round 2.
    assert [r["round"] for r in rounds] == [1, 2] and [r["kept"] for r in rounds] == [4, 2]
    round1 = store.resolve(rounds[0]["run"])
    assert round1.stats["steps"] == 2 and round1.producer.execution == {
        "resume": True
    }  # continued, not restarted
    # Round 2 mined with round 1's run and never offered round 1's questions again.
    mined1, mined2 = store.resolve(rounds[0]["mined"]), store.resolve(rounds[1]["mined"])
    assert {p.role: p.id for p in mined2.parents}["student"] == round1.id
    first = set(read_table(mined1, columns=["candidate_id"]).column("candidate_id").to_pylist())
    second = set(read_table(mined2, columns=["candidate_id"]).column("candidate_id").to_pylist())
    assert len(first) == 4 and len(second) == 2 and not first & second
    # Round 2 shared its budget by round 1's per-stratum gaps (reweight), and says so.
    weights = mined1.stats["mined"]["mixture_weights"]
    assert set(weights) == {"a", "b"} and mined2.producer.recipe["select"]["stratum_weights"] == weights
    assert json.loads(rounds[1]["strata_weights"]) == weights and rounds[0]["strata_weights"] is None
    # The teacher data carries each question's mining score (keep_columns), which round 2 trains in order of.
    taught = read_table(store.resolve(rounds[1]["teacher_data"])).to_pylist()
    scores = {r["candidate_id"]: r["mine_score"] for r in read_table(mined2).to_pylist()}
    assert sorted(r["mine_score"] for r in taught) == sorted(scores.values()) and all(
        r["domain"] for r in taught
    )
    # Round 2 trained on both rounds' teacher data; every step is a parent of the loop's dataset.
    round2 = store.resolve(rounds[1]["run"])
    assert len(round2.producer.recipe["datasets"]) == 2
    assert {p.role for p in result.parents} == {"student", "mined", "teacher_data", "run"}
    assert result.stats["teacher_tokens"] == sum(r["teacher_tokens"] for r in rounds) > 0
    journal = next((store.root / "loops" / "lp").glob("*.json"))
    journal.write_text('{"r1/mine": ')  # damaged: one line saying what to do, nothing run
    damaged = cli("--store", store.root, "run", recipe)
    assert_one_line_error(damaged)
    assert "journal" in damaged.err and "remove it" in damaged.err


def test_a_block_that_sets_what_the_loop_fills_is_one_error_line(tmp_path, cli, capsys):
    store = Store(tmp_path / "store")
    publish_model(store, "student", llama(3, 1, 32, 2), tiny_tokenizer())
    capsys.readouterr()  # the model's save progress is not the command's output
    data = loop_recipe(tmp_path, "http://127.0.0.1:9/v1")
    data["train"]["datasets"] = [{"ref": "x"}]
    result = cli("--store", store.root, "run", write_recipe(tmp_path / "a.yaml", yaml.safe_dump(data)))
    assert_one_line_error(result)
    assert "'train' must not set datasets" in result.err
    data = loop_recipe(tmp_path, "http://127.0.0.1:9/v1")
    data["train"]["max_stepz"] = 3  # a typo inside a block: found before round 1 mines anything
    result = cli("--store", store.root, "run", write_recipe(tmp_path / "b.yaml", yaml.safe_dump(data)))
    assert_one_line_error(result)
    assert "max_stepz" in result.err and not (store.root / "loops").exists()


def test_the_shipped_loop_recipes_blocks_are_valid_recipes_of_their_stages(tmp_path):
    from manifests.recipes import parse_config
    from synth.loop import Loop, LoopConfig

    data = yaml.safe_load((ROOT / "examples" / "recipes" / "synth-loop.yaml").read_text())
    Loop(parse_config(LoopConfig, data, "synth-loop.yaml"), Store(tmp_path / "store")).check_recipes()


def test_a_loop_stops_when_every_candidate_was_mined(tmp_path, cli, capsys):
    store = Store(tmp_path / "store")
    publish_model(store, "student", llama(3, 1, 32, 2), tiny_tokenizer())
    capsys.readouterr()
    with start_server("echo") as echo:
        data = loop_recipe(tmp_path, echo.url, rounds=3)
        data["mine"]["select"] = {"top_fraction": 1.0}  # round 1 takes all 8: round 2 has nothing to mine
        data["reweight"], data["teacher"]["keep_columns"] = False, ["mine_score"]
        data["train"]["max_steps"] = 1
        done = cli("--store", store.root, "run", write_recipe(tmp_path / "all.yaml", yaml.safe_dump(data)))
    assert done.code == 0, done.err[-2000:]
    result = store.resolve("lp")
    assert (
        result.stats["rounds"] == 1
        and result.stats["stopped"] == "every candidate was mined in an earlier round"
    )
