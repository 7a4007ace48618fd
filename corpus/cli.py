"""``distillery corpus …``."""

from __future__ import annotations

import argparse


def _print_funnel(manifest) -> None:
    from corpus.build import print_funnel

    print_funnel(manifest)


def _build_from(args, data: dict, source: str) -> int:
    """Run a corpus.build made from command-line options (the standalone global steps)."""
    from corpus.build import run_recipe
    from manifests.cli import print_published

    workers = 1 if args.workers is None else args.workers  # 0 is refused by the recipe's check, not ignored
    data |= {"name": args.name, "inputs": [{"dataset": args.dataset}], "workers": workers}
    manifest = run_recipe(data, args.store_obj, source)
    print_published(manifest)
    _print_funnel(manifest)
    return 0


def _dedup(args) -> int:
    dedup = {"exact": not args.no_exact, "url": args.url, "against": args.against}
    if args.minhash_threshold:
        dedup["minhash"] = {"threshold": args.minhash_threshold}
    if args.lines:
        dedup["lines"] = {"unit": args.lines, "max_documents": args.max_documents}
    return _build_from(args, {"dedup": dedup}, "corpus dedup")


def _dedup_index(args) -> int:
    from corpus.dedup_index import run_build_index
    from manifests.cli import print_published

    data = {"name": args.name, "dataset": args.dataset}
    if args.minhash_threshold:
        data["minhash"] = {"threshold": args.minhash_threshold}
    print_published(run_build_index(data, args.store_obj, "corpus dedup-index"))
    return 0


def _decontaminate(args) -> int:
    step = {"type": "decontaminate", "index": args.index, "action": "flag" if args.flag else "drop"}
    return _build_from(args, {"steps": [step], "dedup": {"exact": False}}, "corpus decontaminate")


def register(sub: argparse._SubParsersAction) -> None:
    from manifests.cli import add_group, add_recipe_verb, add_verb

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
    dedup = add_verb(
        verbs, "dedup", _dedup, "deduplicate a published dataset (exact, URL, lines) into a new one",
        "Read a dataset's rows and drop exact duplicates (and, if asked, repeated URLs and lines that\n"
        "recur across documents); the same global steps as corpus.build's 'dedup:' section.",
        "distillery corpus dedup web-corpus --name web-dedup --url --lines line",
    )  # fmt: skip
    decontaminate = add_verb(
        verbs, "decontaminate", _decontaminate, "drop (or flag) documents that contain evaluation n-grams",
        "Read a dataset's rows and remove those sharing n-grams with an index from 'corpus decontam-index'.",
        "distillery corpus decontaminate web-corpus --index evals-index --name web-clean",
    )  # fmt: skip
    for verb in (dedup, decontaminate):
        verb.add_argument("dataset", help="dataset reference to read")
        verb.add_argument("--name", required=True, help="name of the output dataset")
        verb.add_argument("--workers", type=int, metavar="N", help="worker processes")
    dedup.add_argument("--no-exact", action="store_true", help="keep exact duplicates")
    dedup.add_argument("--url", action="store_true", help="drop documents whose normalised URL was seen")
    dedup.add_argument(
        "--lines", choices=["line", "paragraph"], help="remove units recurring across documents"
    )
    dedup.add_argument(
        "--max-documents", type=int, default=2, help="with --lines: allowed documents per unit"
    )
    dedup.add_argument(
        "--minhash-threshold", type=float, metavar="J", help="also drop near-duplicates (MinHash, Jaccard J)"
    )
    dedup.add_argument(
        "--against",
        action="append",
        default=[],
        metavar="INDEX",
        help="a dedup index of earlier data; repeatable",
    )
    index = add_verb(
        verbs, "dedup-index", _dedup_index, "index a dataset for incremental dedup of later builds",
        "Store a dataset's exact-text keys (and MinHash band keys) so that later builds drop what it holds\n"
        "without reprocessing it ('dedup: {against: [INDEX]}' or 'corpus dedup --against INDEX').",
        "distillery corpus dedup-index web-2025 --name web-2025-index --minhash-threshold 0.8",
    )  # fmt: skip
    index.add_argument("dataset", help="dataset reference to index")
    index.add_argument("--name", required=True, help="name of the index in the store")
    index.add_argument("--minhash-threshold", type=float, metavar="J", help="also index MinHash band keys")
    decontaminate.add_argument("--index", required=True, help="run reference of the n-gram index")
    decontaminate.add_argument("--flag", action="store_true", help="keep and mark instead of dropping")
