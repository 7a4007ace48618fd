"""Where the recipe stages are: each package in ``PACKAGES`` has a ``cli`` module whose ``STAGES``
table maps a stage name to its config class and run function (``manifests.verbs.Stage``).

The CLI root and the demo both run recipes through ``run_recipe_file``; keeping the lookup here (not
in ``manifests/cli.py``) lets the demo use it without importing the command line that starts it.
The packages are found by name only, so ``manifests/`` imports no stage package.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from manifests.store import Store
from manifests.verbs import Stage, dispatch_recipe

PACKAGES = ("corpus", "synth", "train", "eval")
"""The stage packages, in the order of ``distillery --help``; each has ``<package>/cli.py``."""


def package_clis() -> list[ModuleType]:
    return [importlib.import_module(f"{package}.cli") for package in PACKAGES]


def stage_table() -> dict[str, Stage]:
    """Every recipe stage, from the packages' ``STAGES`` tables."""
    table: dict[str, Stage] = {}
    for cli in package_clis():
        for name, stage in cli.STAGES.items():
            if name in table:
                raise RuntimeError(f"stage {name!r} is declared twice ({cli.__name__})")  # a bug
            table[name] = stage
    return table


def run_recipe_file(path: str, store: Store, overrides: list[str] | None = None):
    """Read a recipe, apply overrides and run the stage its ``stage:`` names."""
    return dispatch_recipe(path, store, stage_table(), overrides or [])
