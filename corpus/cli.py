"""``distillery corpus …``."""

from __future__ import annotations

import argparse


def _print_funnel(manifest) -> None:
    from corpus.build import print_funnel

    print_funnel(manifest)


def register(sub: argparse._SubParsersAction) -> None:
    from manifests.cli import add_group, add_recipe_verb

    verbs = add_group(
        sub, "corpus", "build text datasets from files: ids, source pointers, filters, ledger",
        "Build and clean text corpora into Parquet shards with a manifest.",
        "examples:\n  distillery corpus build examples/recipes/demo-corpus.yaml\n"
        "  distillery corpus examples/recipes/demo-corpus.yaml --set min_words=50\n",
    )  # fmt: skip
    build = add_recipe_verb(
        verbs, "build", expect="corpus", help_="run a corpus.build recipe", report=_print_funnel,
        description="Read the recipe's inputs (JSONL, text folders, Parquet), assign ids and source\n"
        "pointers, drop too-short and duplicate documents (ledger), publish the dataset.",
        example="distillery corpus build examples/recipes/demo-corpus.yaml",
    )  # fmt: skip
    build.add_argument(
        "--workers", type=int, metavar="N", help="worker processes (overrides the recipe's workers)"
    )
