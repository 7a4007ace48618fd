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
    build.add_argument("--executor", choices=["local", "ray"], help="where tasks run (overrides the recipe)")
    build.add_argument("--address", metavar="HOST:PORT", help="an existing Ray cluster (with --executor ray)")
    add_recipe_verb(
        verbs, "train-classifier", expect="corpus", help_="train a fastText classifier from two datasets",
        description="Train a fastText classifier (e.g. curated vs random web text, as DCLM does) and\n"
        "publish it as a run; the 'classifier' step of corpus.build scores documents with it.",
        example="distillery corpus train-classifier examples/recipes/quality-classifier.yaml",
    )  # fmt: skip
    add_recipe_verb(
        verbs, "crawl", expect="corpus", help_="crawl the web politely into WARC files and a page index",
        description="Fetch pages from seed URLs or a URL list: robots.txt and Crawl-delay obeyed, per-host\n"
        "rate limits, Retry-After honoured, private addresses refused unless allowed; resumable.\n"
        "Feed the result to corpus.build with an input '{dataset: NAME, format: warc}'.",
        example="distillery corpus crawl examples/recipes/crawl-local.yaml --set 'seeds=[https://example.org/]'",
    )  # fmt: skip
    add_recipe_verb(
        verbs, "decontam-index", expect="corpus", help_="build an n-gram index of evaluation sets",
        description="Index the 13-grams (by default) of evaluation sets — files or datasets — including those\n"
        "spanning question and answer; the 'decontaminate' step of corpus.build drops or flags\n"
        "training documents that share them.",
        example="distillery corpus decontam-index examples/recipes/decontam-index.yaml",
    )  # fmt: skip
