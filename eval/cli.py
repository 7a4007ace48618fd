"""``distillery eval …``."""

from __future__ import annotations

import argparse


def _run(args) -> int:
    from manifests.cli import print_published, run_recipe_file

    manifest = run_recipe_file(args.recipe, args.store_obj, args.overrides, expect="eval")
    print_published(manifest)
    for ref, value in manifest.stats.get("perplexity", {}).items():
        print(f"  perplexity {ref}: {value:.3f}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from manifests.cli import HelpFormatter, add_set_option, add_store_option

    parser = sub.add_parser(
        "eval",
        help="evaluate runs (perplexity) and publish the metrics with a manifest",
        formatter_class=HelpFormatter,
        description="Evaluate models from the store on a dataset split.",
        epilog="example:\n  distillery eval examples/recipes/demo-eval.yaml    # same as 'eval run'\n",
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    run = verbs.add_parser("run", help="run an eval recipe", formatter_class=HelpFormatter,
                           description="Run an evaluation recipe (stage: eval).",
                           epilog="example:\n  distillery eval run examples/recipes/demo-eval.yaml\n")  # fmt: skip
    run.add_argument("recipe")
    add_set_option(run)
    add_store_option(run)
    run.set_defaults(func=_run)
