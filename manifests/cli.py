"""The ``distillery`` command line: one subcommand per package, plus ``run`` and ``demo``.

Each package exposes ``<package>.cli.register(subparsers)``; recipe stages are dispatched by
their ``stage:`` key through ``STAGES``. Only the chosen stage's modules are imported, so
``distillery manifests list`` never pays for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from manifests.errors import DistilleryError
from manifests.overrides import apply_overrides
from manifests.recipes import read_recipe
from manifests.store import Store

STAGES = {
    "corpus.build": "corpus.build:run_recipe",
    "corpus.crawl": "corpus.crawl:run_recipe",
    "corpus.decontam-index": "corpus.decontam:run_build_index",
    "corpus.dedup-index": "corpus.dedup_index:run_build_index",
    "corpus.train-classifier": "corpus.classifier:run_train",
    "synth.cot": "synth.cot:run_recipe",
    "synth.augment": "synth.augment:run_recipe",
    "synth.generate": "synth.generate:run_recipe",
    "synth.preferences": "synth.preferences:run_recipe",
    "train": "train.methods:run_recipe",
    "train.import-model": "train.models:run_import",
    "train.make-student": "train.models:run_make_student",
    "train.merge": "train.merge:run_recipe",
    "train.pack": "train.pack:run_recipe",
    "train.pretrain": "train.pretrain:run_recipe",
    "train.sft": "train.sft:run_recipe",
    "train.tokenizer": "train.tokenizer:run_recipe",
    "eval": "eval.perplexity:run_recipe",
    "eval.perplexity": "eval.perplexity:run_recipe",
}
"""Recipe ``stage:`` → the function that runs it (``module:function``)."""

PACKAGE_CLIS = {
    "corpus": "corpus.cli",
    "synth": "synth.cli",
    "train": "train.cli",
    "eval": "eval.cli",
    "manifests": "manifests.commands",
}
DEFAULT_VERBS = {"corpus": "build", "synth": "generate", "train": "run", "eval": "run"}
"""``distillery train RECIPE.yaml`` means ``distillery train run RECIPE.yaml``."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    pass


def add_store_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store",
        default=argparse.SUPPRESS,
        help="store directory (default: $DISTILLERY_STORE or ./distillery-store)",
    )


def add_set_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value (dotted keys, YAML values); repeatable",
    )


def run_recipe_file(path: str, store: Store, overrides: list[str] | None = None, expect: str | None = None):
    """Read a recipe, apply overrides and run the stage its ``stage:`` names."""
    data = apply_overrides(read_recipe(path), overrides or [])
    stage = data["stage"]
    if expect and not (stage == expect or stage.startswith(expect + ".")):
        raise DistilleryError(
            f"recipe {path}: stage '{stage}' is not a {expect} stage; run it with 'distillery run {path}'"
        )
    target = STAGES.get(stage)
    if target is None:
        import difflib

        hint = difflib.get_close_matches(stage, STAGES, n=1)
        advice = f"did you mean '{hint[0]}'?" if hint else "known stages: " + ", ".join(sorted(STAGES))
        raise DistilleryError(f"recipe {path}: unknown stage '{stage}'; {advice}")
    module_name, func = target.split(":")
    runner = getattr(importlib.import_module(module_name), func)
    return runner(data, store=store, source=str(path))


def print_published(manifest) -> None:
    from manifests.console import make_console

    make_console().print(
        f"[green]published[/] {manifest.kind} [bold]{manifest.ref}[/] → {manifest.location}\n"
        f"  explain it: distillery manifests show {manifest.ref}"
    )


def add_group(sub: argparse._SubParsersAction, name: str, help_: str, description: str, epilog: str):
    """A package's command group (``distillery corpus …``); returns its verb subparsers."""
    parser = sub.add_parser(
        name, help=help_, description=description, epilog=epilog, formatter_class=HelpFormatter
    )
    return parser.add_subparsers(dest="verb", metavar="VERB", required=True)


def add_verb(verbs, name: str, func, help_: str, description: str, example: str) -> argparse.ArgumentParser:
    """One verb with ``--help`` text, an example and ``--store``."""
    parser = verbs.add_parser(name, help=help_, description=description, formatter_class=HelpFormatter,
                              epilog=f"example:\n  {example}\n")  # fmt: skip
    add_store_option(parser)
    parser.set_defaults(func=func)
    return parser


def add_recipe_verb(
    verbs, name: str, *, expect: str, help_: str, description: str, example: str, report=None
):
    """A verb that runs a recipe of one package's stages (``distillery corpus build RECIPE``)."""

    def run(args: argparse.Namespace) -> int:
        overrides = list(args.overrides)
        for option in ("workers", "executor", "address"):
            if getattr(args, option, None) is not None:  # 0 too: the recipe's check refuses it
                overrides.append(
                    f"{'ray_address' if option == 'address' else option}={getattr(args, option)}"
                )
        manifest = run_recipe_file(args.recipe, args.store_obj, overrides, expect=expect)
        print_published(manifest)
        if report:
            report(manifest)
        return 0

    parser = add_verb(verbs, name, run, help_, description, example)
    parser.add_argument("recipe", help="recipe YAML file")
    add_set_option(parser)
    return parser


def _run_command(args: argparse.Namespace) -> int:
    print_published(run_recipe_file(args.recipe, args.store_obj, args.overrides))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distillery",
        formatter_class=HelpFormatter,
        description="Raw text to trained language models, every byte traced by manifests.",
        epilog=(
            "examples:\n"
            "  distillery demo                                   # the whole chain on the embedded sample\n"
            "  distillery run examples/recipes/demo-corpus.yaml  # any recipe, by its stage:\n"
            "  distillery corpus build examples/recipes/demo-corpus.yaml\n"
            "  distillery manifests list\n"
            "  distillery manifests trace <record-id>\n"
        ),
    )
    add_store_option(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = add_verb(sub, "run", _run_command, "run any recipe, dispatched on its stage:",
                   "Run a recipe file; its 'stage:' key picks the stage.",
                   "distillery run examples/recipes/demo-sft.yaml --set max_steps=2")  # fmt: skip
    run.add_argument("recipe", help="recipe YAML file")
    add_set_option(run)
    demo = add_verb(
        sub, "demo", lambda a: importlib.import_module("manifests.demo").main(a),
        "run the whole chain on the embedded sample",
        "corpus → model import → student → synth (local teacher) → LoRA SFT → eval, then trace one\n"
        "training example back to its source line.",
        "distillery demo --store /tmp/demo-store",
    )  # fmt: skip
    demo.add_argument("--recipes", default="examples/recipes", help="folder with the demo-*.yaml recipes")
    demo.add_argument(
        "--tiny", action="store_true", help="a smaller run (fewer prompts and steps), as the tests use"
    )

    importlib.import_module("synth.serve").register(sub)
    for module in PACKAGE_CLIS.values():
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, token in enumerate(argv):
        if token in DEFAULT_VERBS:
            nxt = argv[i + 1] if i + 1 < len(argv) else ""
            if nxt.endswith((".yaml", ".yml")):
                argv.insert(i + 1, DEFAULT_VERBS[token])
            break
        if not token.startswith("-") and not (i > 0 and argv[i - 1] == "--store"):
            break
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv)  # as given (a relaunch under torchrun repeats it)
    args.store_obj = Store(getattr(args, "store", None))
    try:
        return int(args.func(args) or 0)
    except DistilleryError as e:
        return _error(str(e), e.exit_code)
    except OSError as e:
        # The machine said no (permissions, disk full, a path that vanished): name it, no traceback.
        where = f": {e.filename}" if e.filename else ""
        return _error(f"{e.strerror or e}{where}", 1)
    except KeyboardInterrupt:
        return _error("interrupted; nothing was published for the unfinished stage", 130)
    except Exception as e:
        torch = sys.modules.get("torch")
        peer_gone = torch is not None and (
            isinstance(e, torch.distributed.DistError)
            or (isinstance(e, RuntimeError) and "by peer" in str(e))
        )  # (NCCL raises the former, gloo a RuntimeError "Connection closed by peer")
        if os.environ.get(ERROR_DIR) and peer_gone:
            # A process of a ``train run --nproc`` job whose peer failed first: the peer says why.
            return _error(f"{PEER_FAILED} ({type(e).__name__})", 1)
        raise


def _error(message: str, code: int) -> int:
    """Print the one error line; a process of a job started by ``train run --nproc`` leaves it to the
    launching process instead, which prints the first one (``train/launch.py``), not one per process."""
    folder = os.environ.get(ERROR_DIR) if "LOCAL_RANK" in os.environ else None
    if folder:
        with open(os.path.join(folder, f"{os.environ.get('RANK', '0')}.json"), "w") as f:
            json.dump({"message": message, "code": code}, f)  # (the process may be stopped before it exits)
    else:
        print(f"error: {message}", file=sys.stderr)
    return code


PEER_FAILED = "stopped: another process of the job failed"
ERROR_DIR = "DISTILLERY_ERROR_DIR"
"""Where the processes of a job started by ``train run --nproc`` leave their error line."""


if __name__ == "__main__":  # pragma: no cover
    code = main()
    if "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ:
        # A process of a torchrun job (``train run --nproc``, accelerate, Slurm), its work written and synced:
        # no interpreter teardown, where the distributed backends' native threads could abort a finished
        # process (SIGABRT, "terminate called without an active exception": seen once in ~5 ZeRO-3 runs).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
