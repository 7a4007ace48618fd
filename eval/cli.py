"""``distillery eval …``."""

from __future__ import annotations

import argparse

from manifests.verbs import Stage, add_group, add_recipe_verb

STAGES = {
    "eval": Stage("eval.perplexity:PerplexityRecipe", "eval.perplexity:run_recipe"),
    "eval.perplexity": Stage("eval.perplexity:PerplexityRecipe", "eval.perplexity:run_recipe"),
}
"""The eval recipe stages (``stage:`` → config, run function); ``eval`` is perplexity, for now."""


def _report(manifest) -> None:
    for ref, value in manifest.stats.get("perplexity", {}).items():
        print(f"  perplexity {ref}: {value:.3f}")


def register(sub: argparse._SubParsersAction) -> None:
    verbs = add_group(
        sub, "eval", "evaluate runs (perplexity) and publish the metrics with a manifest",
        "Evaluate models from the store on a dataset split.",
        "example:\n  distillery eval examples/recipes/demo-eval.yaml    # same as 'eval run'\n",
        default_verb="run",
    )  # fmt: skip
    add_recipe_verb(
        verbs, "run", stages=STAGES, expect="eval", help_="run an eval recipe", description="Run an evaluation recipe (stage: eval).",
        example="distillery eval run examples/recipes/demo-eval.yaml", report=_report,
    )  # fmt: skip
