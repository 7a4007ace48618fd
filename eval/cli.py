"""``distillery eval …``: run an eval recipe, compare evals."""

from __future__ import annotations

import argparse

from manifests.verbs import Stage, add_group, add_recipe_verb, add_verb

STAGES = {
    "eval": Stage("eval.run:EvalRecipe", "eval.run:run_recipe"),
    # The first eval recipes named their one metric in the stage; they run as one perplexity task.
    "eval.perplexity": Stage("eval.run:EvalRecipe", "eval.run:run_recipe"),
    # lm-evaluation-harness tasks on store models (optional extra: pip install 'distillery[lmeval]').
    "eval.harness": Stage("eval.harness:HarnessRecipe", "eval.harness:run_recipe"),
}
"""The eval recipe stages (``stage:`` → config, run function)."""


def print_metrics(manifest) -> None:
    """The eval's table: task × metric × model with intervals, then the paired differences."""
    from manifests.console import make_console
    from manifests.eval_tables import print_eval_metrics

    print_eval_metrics(manifest, make_console())


def _compare(args) -> int:
    import json

    from eval.compare import columns_of, compare, print_comparison
    from eval.stats import BootstrapSettings

    result = compare(columns_of(args.store_obj, args.refs), BootstrapSettings(args.bootstrap, args.seed))
    if args.format == "json":
        print(json.dumps(result, indent=2))
    else:
        print_comparison(result, args.limit)
    return 0


def _resamples(text: str) -> int:
    value = int(text) if text.lstrip("-").isdigit() else -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of resamples, 0 or more")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    verbs = add_group(
        sub, "eval", "evaluate models on tasks (perplexity, exact match, verifiers, BLEU/chrF/ROUGE, pass@k, "
        "judges, teacher agreement) with per-sample records; compare evals",
        "Evaluate models from the store (or endpoints) on dataset tasks, record every sample, compare evals.",
        "examples:\n  distillery eval examples/recipes/demo-eval.yaml    # same as 'eval run'\n"
        "  distillery eval compare demo-eval@3f9c demo-eval\n",
        default_verb="run",
    )  # fmt: skip
    add_recipe_verb(
        verbs, "run", stages=STAGES, expect="eval", help_="run an eval recipe", description="Run an evaluation recipe (stage: eval).",
        example="distillery eval run examples/recipes/demo-eval.yaml", report=print_metrics,
    )  # fmt: skip
    p = add_verb(
        verbs, "compare", _compare, "evals side by side: metrics with intervals, paired differences, flipped samples",
        "Compare the models of one or more evals on the tasks they share: each metric with its interval, the paired "
        "difference against the first column, and the samples right in one and wrong in the other.",
        "distillery eval compare demo-eval@3f9c demo-eval",
    )  # fmt: skip
    p.add_argument("refs", nargs="+", help="eval references (an eval of several models gives a column each)")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("--limit", type=int, default=10, help="flipped sample ids shown per side (table)")
    p.add_argument(
        "--bootstrap", type=_resamples, default=1000, help="resamples for the paired differences (0: none)"
    )
    p.add_argument("--seed", type=int, default=0)
