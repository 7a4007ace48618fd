"""``distillery corpus …``: the corpus stages and their verbs."""

from __future__ import annotations

import argparse

from manifests.verbs import (
    Stage,
    add_config_options,
    add_group,
    add_recipe_verb,
    add_verb,
    config_values,
    print_published,
    stage_options,
    stage_verb,
)

STAGES = {
    "corpus.build": Stage("corpus.build:CorpusBuildConfig", "corpus.build:run_recipe"),
    "corpus.crawl": Stage("corpus.crawl:CrawlConfig", "corpus.crawl:run_recipe"),
    "corpus.decontam-index": Stage("corpus.decontam:BuildIndexConfig", "corpus.decontam:run_build_index"),
    "corpus.dedup-index": Stage("corpus.dedup_index:DedupIndexConfig", "corpus.dedup_index:run_build_index"),
    "corpus.train-classifier": Stage(
        "corpus.classifier:TrainClassifierConfig", "corpus.classifier:run_train"
    ),
}
"""The corpus recipe stages (``stage:`` → config, run function)."""
BUILD = STAGES["corpus.build"]


def _print_funnel(manifest) -> None:
    from corpus.build import print_funnel

    print_funnel(manifest)


def _build_from(args, data: dict, source: str) -> int:
    """Run a corpus.build made from command-line options (the standalone global steps)."""
    data |= {"inputs": [{"dataset": args.dataset}]}
    manifest = BUILD.runner()(data, args.store_obj, source)
    print_published(manifest)
    _print_funnel(manifest)
    return 0


def _dedup(args) -> int:
    data = config_values(args)
    dedup = data.setdefault("dedup", {})
    if "unit" not in dedup.get("lines", {}):
        dedup.pop("lines", None)  # --max-documents counts only with --lines
    return _build_from(args, data, "corpus dedup")


def _decontaminate(args) -> int:
    data = config_values(args)
    step = {"type": "decontaminate", **data.pop("step"), "action": "flag" if args.flag else "drop"}
    return _build_from(args, data | {"steps": [step], "dedup": {"exact": False}}, "corpus decontaminate")


def _dataset_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", help="dataset reference to read")
    add_config_options(parser, BUILD.config_class(), ["name", "workers"])


def _dedup_options(parser: argparse.ArgumentParser) -> None:
    from corpus.build import DedupConfig

    _dataset_options(parser)
    add_config_options(
        parser, DedupConfig, ["exact", "url", "normalize", "lines.unit", "lines.max_documents", "minhash.threshold",
                              "minhash.normalize", "against"],
        flags={"lines.unit": "--lines", "lines.max_documents": "--max-documents"}, within="dedup",
        computed={"lines.unit": "none, lines are kept"},
    )  # fmt: skip


def _decontaminate_options(parser: argparse.ArgumentParser) -> None:
    from corpus.decontam import DecontaminateConfig

    _dataset_options(parser)
    add_config_options(parser, DecontaminateConfig, ["index"], within="step")
    parser.add_argument(
        "--flag", action="store_true", help="keep and mark instead of dropping (action: flag)"
    )


def register(sub: argparse._SubParsersAction) -> None:
    verbs = add_group(
        sub, "corpus", "build text datasets from files: ids, source pointers, filters, ledger",
        "Build and clean text corpora into Parquet shards with a manifest.",
        "examples:\n  distillery corpus build examples/recipes/demo-corpus.yaml\n"
        "  distillery corpus examples/recipes/demo-corpus.yaml --set min_words=50\n",
        default_verb="build",
    )  # fmt: skip
    add_recipe_verb(
        verbs, "build", stages=STAGES, expect="corpus", help_="run a corpus.build recipe", report=_print_funnel,
        description="Read the recipe's inputs (JSONL, text folders, Parquet), assign ids and source\n"
        "pointers, drop too-short and duplicate documents (ledger), publish the dataset.",
        example="distillery corpus build examples/recipes/demo-corpus.yaml",
        # execution settings (where and how wide the build runs), which the corpus stage alone has
        options=stage_options(BUILD, ["workers", "executor", "ray_address"], flags={"ray_address": "--address"},
                              recipe=True),
    )  # fmt: skip
    add_recipe_verb(
        verbs, "train-classifier", stages=STAGES, expect="corpus",
        help_="train a fastText classifier from two datasets",
        description="Train a fastText classifier (e.g. curated vs random web text, as DCLM does) and\n"
        "publish it as a run; the 'classifier' step of corpus.build scores documents with it.",
        example="distillery corpus train-classifier examples/recipes/quality-classifier.yaml",
    )  # fmt: skip
    add_recipe_verb(
        verbs, "crawl", stages=STAGES, expect="corpus",
        help_="crawl the web politely into WARC files and a page index",
        description="Fetch pages from seed URLs or a URL list: robots.txt and Crawl-delay obeyed, per-host\n"
        "rate limits, Retry-After honoured, private addresses refused unless allowed; resumable.\n"
        "Feed the result to corpus.build with an input '{dataset: NAME, format: warc}'.",
        example="distillery corpus crawl examples/recipes/crawl-local.yaml --set 'seeds=[https://example.org/]'",
    )  # fmt: skip
    add_recipe_verb(
        verbs, "decontam-index", stages=STAGES, expect="corpus",
        help_="build an n-gram index of evaluation sets",
        description="Index the 13-grams (by default) of evaluation sets — files or datasets — including those\n"
        "spanning question and answer; the 'decontaminate' step of corpus.build drops or flags\n"
        "training documents that share them.",
        example="distillery corpus decontam-index examples/recipes/decontam-index.yaml",
    )  # fmt: skip
    add_verb(
        verbs, "dedup", _dedup, "deduplicate a published dataset (exact, URL, lines) into a new one",
        "Read a dataset's rows and drop exact duplicates (and, if asked, repeated URLs and lines that\n"
        "recur across documents); the same global steps as corpus.build's 'dedup:' section.",
        "distillery corpus dedup web-corpus --name web-dedup --url --lines line", _dedup_options,
    )  # fmt: skip
    add_verb(
        verbs, "decontaminate", _decontaminate, "drop (or flag) documents that contain evaluation n-grams",
        "Read a dataset's rows and remove those sharing n-grams with an index from 'corpus decontam-index'.",
        "distillery corpus decontaminate web-corpus --index evals-index --name web-clean", _decontaminate_options,
    )  # fmt: skip
    add_verb(
        verbs, "dedup-index", stage_verb(STAGES["corpus.dedup-index"], "corpus dedup-index"),
        "index a dataset for incremental dedup of later builds",
        "Store a dataset's exact-text keys (and MinHash band keys) so that later builds drop what it holds\n"
        "without reprocessing it ('dedup: {against: [INDEX]}' or 'corpus dedup --against INDEX').",
        "distillery corpus dedup-index web-2025 --name web-2025-index --minhash-threshold 0.8",
        stage_options(STAGES["corpus.dedup-index"], ["name", "normalize", "minhash.threshold", "minhash.normalize"],
                      positional=["dataset"]),
    )  # fmt: skip
