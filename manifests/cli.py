"""The ``distillery`` command line: one command group per package, plus ``run`` and ``demo``.

The root only finds the packages: each package in ``PACKAGES`` has a ``cli`` module with
``STAGES`` (its recipe stages: stage → config class, run function) and ``register(subparsers)``
(all its verbs). ``distillery run RECIPE`` dispatches on the recipe's ``stage:`` through those
tables. Only the chosen stage's modules are imported, so ``distillery manifests list`` never pays
for importing torch. The parts a package's command line is made of are in ``manifests/verbs.py``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from manifests.errors import DistilleryError
from manifests.stages import package_clis, run_recipe_file
from manifests.store import Store
from manifests.verbs import (
    HelpFormatter,
    VerbParser,
    add_set_option,
    add_store_option,
    add_verb,
    print_published,
)


def _run_command(args: argparse.Namespace) -> int:
    print_published(run_recipe_file(args.recipe, args.store_obj, args.overrides))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = VerbParser(
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

    for cli in package_clis():
        cli.register(sub)
    importlib.import_module("manifests.commands").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
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
