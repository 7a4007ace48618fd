"""``distillery demo``: the whole chain on the embedded sample, then one example traced back.

corpus.build → train.import-model → train.make-student → synth.generate → train (LoRA SFT) → train
(LoRA logit distillation from the teacher, same rows and steps) → eval (perplexity, teacher agreement
and summary quality of the base and both students, with intervals) → ``manifests trace`` of one
training example.
"""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow.parquet as pq
from rich.table import Table

from manifests.console import make_console
from manifests.errors import DistilleryError
from manifests.eval_tables import print_eval_metrics
from manifests.stages import run_recipe_file

STEPS = [
    ("corpus", "demo-corpus.yaml"),
    ("model", "demo-model.yaml"),
    ("student", "demo-student.yaml"),
    ("synth", "demo-synth.yaml"),
    ("train", "demo-sft.yaml"),
    ("distill", "demo-distill.yaml"),
    ("eval", "demo-eval.yaml"),
]

TINY = {
    "demo-synth.yaml": ["limit=10", "sampling.max_tokens=24"],
    "demo-sft.yaml": ["max_steps=3"],
    "demo-distill.yaml": ["max_steps=3"],
}
"""Overrides for ``--tiny`` (the end-to-end test): same chain, fewer prompts and steps."""


def main(args) -> int:
    from manifests.commands import print_trace
    from manifests.lineage import trace_record

    console = make_console()
    store = args.store_obj
    folder = Path(args.recipes)
    if not folder.is_dir():
        raise DistilleryError(
            f"{folder}: no such folder; run the demo from the project root or pass --recipes"
        )
    made = []
    started = time.time()
    for label, file in STEPS:
        t0 = time.time()
        console.rule(f"[bold]{label}[/] — {folder / file}")
        manifest = run_recipe_file(str(folder / file), store, TINY.get(file, []) if args.tiny else [])
        made.append((label, manifest, time.time() - t0))
        console.print(f"[green]published[/] {manifest.kind} {manifest.ref}")
    table = Table("step", "kind", "reference", "seconds", "what", box=None)
    for label, m, secs in made:
        what = ", ".join(f"{k}={v}" for k, v in m.stats.items() if not isinstance(v, dict | list))
        table.add_row(label, m.kind, m.ref, f"{secs:.1f}", what[:90])
    console.rule("[bold]made")
    console.print(table)
    console.rule(
        "[bold]eval: the student before training, after SFT and after distillation (95% bootstrap intervals)"
    )
    print_eval_metrics(made[-1][1], console)
    sft_data = next(m for label, m, _ in made if label == "synth")
    first = sft_data.data_files("train")[0]
    example_id = pq.read_table(sft_data.location / first.path, columns=["id"]).column("id")[0].as_py()
    console.rule(f"[bold]trace of training example {example_id}")
    console.print(f"$ distillery manifests trace {example_id}")
    print_trace(trace_record(store, example_id), store)
    console.print(f"\ndemo finished in {time.time() - started:.0f} s; store: {store.root}")
    return 0
