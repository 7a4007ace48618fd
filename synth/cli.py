"""``distillery synth …``."""

from __future__ import annotations

import argparse


def _generate(args) -> int:
    from manifests.cli import print_published, run_recipe_file

    print_published(run_recipe_file(args.recipe, args.store_obj, args.overrides, expect="synth"))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from manifests.cli import HelpFormatter, add_set_option, add_store_option

    parser = sub.add_parser(
        "synth",
        help="have a teacher model write training data (answers, with per-row lineage)",
        formatter_class=HelpFormatter,
        description="Generate teacher data from a dataset's records.",
        epilog="example:\n  distillery synth generate examples/recipes/demo-synth.yaml --set limit=8\n",
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    gen = verbs.add_parser(
        "generate",
        help="run a synth.generate recipe",
        formatter_class=HelpFormatter,
        description="Build prompts from a dataset, have the teacher answer them, publish the answers\n"
        "as a chat dataset whose rows name their parent records.",
        epilog="example:\n  distillery synth generate examples/recipes/demo-synth.yaml\n",
    )
    gen.add_argument("recipe")
    add_set_option(gen)
    add_store_option(gen)
    gen.set_defaults(func=_generate)
