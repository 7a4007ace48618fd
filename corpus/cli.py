"""``distillery corpus …``."""

from __future__ import annotations

import argparse


def _build(args) -> int:
    from manifests.cli import print_published, run_recipe_file

    print_published(run_recipe_file(args.recipe, args.store_obj, args.overrides, expect="corpus"))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from manifests.cli import HelpFormatter, add_set_option, add_store_option

    parser = sub.add_parser(
        "corpus",
        help="build text datasets from files: ids, source pointers, filters, ledger",
        formatter_class=HelpFormatter,
        description="Build and clean text corpora into Parquet shards with a manifest.",
        epilog="examples:\n  distillery corpus build examples/recipes/demo-corpus.yaml\n"
        "  distillery corpus examples/recipes/demo-corpus.yaml --set min_words=50\n",
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    build = verbs.add_parser(
        "build",
        help="run a corpus.build recipe",
        formatter_class=HelpFormatter,
        description="Read the recipe's inputs (JSONL, text folders, Parquet), assign ids and source\n"
        "pointers, drop too-short and duplicate documents (ledger), publish the dataset.",
        epilog="example:\n  distillery corpus build examples/recipes/demo-corpus.yaml\n",
    )
    build.add_argument("recipe")
    add_set_option(build)
    add_store_option(build)
    build.set_defaults(func=_build)
