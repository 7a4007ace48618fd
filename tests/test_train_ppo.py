"""PPO (``method: ppo``): the tiny policy of ``tests/test_train_grpo.py`` learns the same scripted reward
with a value head or a separate value model; KL in the reward or the loss, fixed or adaptive; resume,
two processes, mistakes. GAE, the clipped losses and the KL controller are checked against hand
computations in ``tests/test_rl_losses.py``."""

from __future__ import annotations

import json

import pytest

from manifests.recipes import parse_config
from manifests.store import Store
from train.ppo import PPORecipe, train_ppo

from .conftest import assert_one_line_error
from .test_train_grpo import _cli, records, rl_store  # noqa: F401  (the module's store fixture)
from .test_train_sft import weights_of

BASE = {"model": "policy", "datasets": [{"ref": "prompts"}], "rewards": [{"verifier": "regex"}],
        "prompts_per_step": 4, "samples_per_prompt": 2, "max_new_tokens": 4, "learning_rate": 0.005,
        "ppo_epochs": 2, "peft": {"method": "none"}, "max_steps": 2}  # fmt: skip


def ppo(store: Store, name: str, **recipe):
    return train_ppo(parse_config(PPORecipe, {"name": name} | BASE | recipe, "test"), store)


def test_ppo_with_a_value_head_learns_the_scripted_reward(rl_store):  # noqa: F811
    run = ppo(rl_store, "ppo-learns", max_steps=10)
    steps = [r for r in records(run) if "reward_mean" in r]
    early = sum(r["reward_mean"] for r in steps[:3]) / 3
    late = sum(r["reward_mean"] for r in steps[-3:]) / 3
    assert late > early + 0.3, [r["reward_mean"] for r in steps]
    assert {"kl", "kl_coef", "policy_loss", "value_loss", "clip_ratio", "value_clip_ratio", "entropy",
            "explained_variance", "length_mean", "truncated", "generation_s", "training_s"} <= steps[0].keys()  # fmt: skip
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the policy starts as its reference
    assert (run.location / "value" / "value_head.safetensors").is_file() and run.stats["value"] == "shared"
    rollouts = rl_store.resolve("ppo-learns-rollouts")
    assert rollouts.stats["rows"] == 10 * 4 * 2 and {p.id for p in rollouts.parents} >= {run.id}


def test_a_separate_value_model_adaptive_kl_in_the_loss_and_a_lora_policy(rl_store):  # noqa: F811
    run = ppo(rl_store, "ppo-rm", value={"model": "rm"}, peft={"method": "lora", "r": 4},
              kl={"coef": 0.1, "target": 0.01, "horizon": 10, "placement": "loss"}, max_steps=2,
              truncation_penalty=0.5, learning_rate=0.05)  # fmt: skip
    steps = [r for r in records(run) if "reward_mean" in r]
    assert steps[0]["kl_coef"] != 0.1 and run.stats["final_kl_coef"] == pytest.approx(
        steps[-1]["kl_coef"], abs=1e-5
    )
    roles = {p.role for p in run.parents}
    assert {"value_model", "base_model", "input"} <= roles
    assert (run.location / "value" / "config.json").is_file()
    table = rl_store.resolve("ppo-rm-rollouts")
    assert table.stats["rows"] == 2 * 4 * 2


def test_a_killed_ppo_run_resumes_to_the_weights_of_an_uninterrupted_one(rl_store, cli, tmp_path):  # noqa: F811
    import torch

    kl = {"coef": 0.05, "target": 0.5, "horizon": 10}
    straight = ppo(rl_store, "ppo-straight", max_steps=3, save_every=1, kl=kl)
    recipe = tmp_path / "resumed.yaml"
    recipe.write_text(json.dumps({"stage": "train", "method": "ppo", "name": "ppo-resumed"} | BASE
                                 | {"max_steps": 3, "save_every": 1, "kl": kl}))  # fmt: skip
    killed = _cli(rl_store, recipe, env={"DISTILLERY_FAULT_EXIT_AFTER_STEP": "1"})
    assert killed.returncode == 137, killed.stderr[-2000:]
    # The resume runs in this process: only the kill needs a process of its own.
    again = cli("--store", rl_store.root, "train", "run", recipe, "--resume")
    assert again.code == 0, again.err[-2000:]
    assert "training from the start" not in again.err  # it did resume
    resumed = rl_store.resolve("ppo-resumed")
    a, b = weights_of(straight), weights_of(resumed)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert resumed.stats["final_kl_coef"] == pytest.approx(straight.stats["final_kl_coef"])


def test_two_processes_under_torchrun_train_what_one_process_trains(rl_store, tmp_path):  # noqa: F811
    import torch

    one = ppo(rl_store, "ppo-one", max_steps=2)
    recipe = tmp_path / "two.yaml"
    recipe.write_text(json.dumps({"stage": "train", "method": "ppo", "name": "ppo-two"} | BASE))
    result = _cli(rl_store, recipe, "--nproc", "2", "--master-port", "29539")
    assert result.returncode == 0, result.stderr[-3000:]
    two = rl_store.resolve("ppo-two")
    assert two.stats["processes"] == 2
    a, b = weights_of(one), weights_of(two)
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


@pytest.mark.parametrize(
    "extra, message",
    [
        ("value: {model: rm-foreign}", "another tokenizer"),
        ("datasets: [{ref: bare}]", "lacks column"),
        ("kl: {placement: sideways}", "placement"),
    ],
)
def test_ppo_mistakes_are_one_line(rl_store, cli, tmp_path, extra, message):  # noqa: F811
    lines = {"stage": "train", "method": "ppo", "name": "ppo-bad", "model": "policy",
             "datasets": "[{ref: prompts}]", "rewards": "[{verifier: regex}]"}  # fmt: skip
    key, value = extra.split(": ", 1)
    lines[key] = value
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("".join(f"{k}: {v}\n" for k, v in lines.items()))
    result = cli("--store", str(rl_store.root), "train", "run", str(recipe))
    assert_one_line_error(result)
    assert message in result.err
