"""What each package's command line is made of: its stage table and its verbs.

A package's ``cli.py`` exports ``STAGES``, one table of the recipe stages it owns, and
``register(sub)``, which adds its verbs to the ``distillery`` parser::

    STAGES = {"corpus.build": Stage("corpus.build:CorpusBuildConfig", "corpus.build:run_recipe")}

The CLI root (``manifests/cli.py``) only finds the packages; ``distillery run RECIPE`` and every
recipe verb dispatch on the recipe's ``stage:`` through these tables. A stage names its config and
its function as ``module:attribute``, so listing stages imports nothing heavy: only the chosen
stage's module is imported. The flags of a hand-written verb are the fields of its stage's config
(``add_config_options``): the type, the default and the help text live in the config alone.

This is a leaf module: it imports no stage package and not the CLI root.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import functools
import importlib
import inspect
import textwrap
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from manifests.errors import DistilleryError
from manifests.overrides import apply_overrides
from manifests.recipes import read_recipe
from manifests.store import Store


def _load(target: str) -> Any:
    module, attribute = target.split(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class Stage:
    """A recipe stage: its typed config and the function that runs it, each as ``module:attribute``."""

    config: str
    """The config class, or a function ``(data, source) -> class`` where the recipe picks the class
    (``stage: train``: its ``method``)."""
    run: str
    """The function ``(data, store, source) -> Manifest`` that runs a recipe of the stage."""

    def config_class(self, data: dict[str, Any] | None = None, source: str = "recipe") -> type[BaseModel]:
        config = _load(self.config)
        return config if isinstance(config, type) else config(data or {}, source)

    def runner(self) -> Callable[..., Any]:
        return _load(self.run)


def dispatch_recipe(
    path: str | Path,
    store: Store,
    stages: Mapping[str, Stage],
    overrides: Sequence[str] = (),
    expect: str | None = None,
    options: dict[str, Any] | None = None,
):
    """Read a recipe, apply ``--set`` overrides, then a verb's ``options`` (see ``config_values``),
    and run the stage its ``stage:`` names in ``stages``; ``expect`` limits it to one package's
    stages (``corpus``) or one stage (``synth.cot``)."""
    data = apply_overrides(read_recipe(path), list(overrides))
    _merge(data, options or {})
    stage = data["stage"]
    if expect and not (stage == expect or stage.startswith(expect + ".")):
        raise DistilleryError(
            f"recipe {path}: stage '{stage}' is not a {expect} stage; run it with 'distillery run {path}'"
        )
    if stage not in stages:
        hint = difflib.get_close_matches(stage, stages, n=1)
        advice = f"did you mean '{hint[0]}'?" if hint else "known stages: " + ", ".join(sorted(stages))
        raise DistilleryError(f"recipe {path}: unknown stage '{stage}'; {advice}")
    return stages[stage].runner()(data, store=store, source=str(path))


def _merge(data: dict[str, Any], values: dict[str, Any]) -> None:
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            _merge(data[key], value)
        else:
            data[key] = value


def print_published(manifest) -> None:
    from manifests.console import make_console

    make_console().print(
        f"[green]published[/] {manifest.kind} [bold]{manifest.ref}[/] → {manifest.location}\n"
        f"  explain it: distillery manifests show {manifest.ref}"
    )


# --- parsers ------------------------------------------------------------------------------------


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    pass


class VerbParser(argparse.ArgumentParser):
    """The parser of ``distillery`` and of each of its groups and verbs.

    A verb's options may be declared when that verb is parsed (``declare``): its config options
    import its stage's module, which ``distillery manifests list`` should not pay for. A group may
    have a default verb for a recipe file: ``distillery train RECIPE.yaml`` is ``distillery train
    run RECIPE.yaml``.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.declare: list[Callable[[argparse.ArgumentParser], None]] = []
        self.default_verb: str | None = None

    def parse_known_args(self, args=None, namespace=None):
        while self.declare:
            self.declare.pop(0)(self)
        if self.default_verb and args and str(args[0]).endswith((".yaml", ".yml")):
            args = [self.default_verb, *args]
        return super().parse_known_args(args, namespace)


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


def add_group(
    sub: argparse._SubParsersAction,
    name: str,
    help_: str,
    description: str,
    epilog: str,
    default_verb: str | None = None,
):
    """A package's command group (``distillery corpus …``); returns its verb subparsers.
    ``default_verb`` runs when the group is given a recipe file instead of a verb."""
    parser = sub.add_parser(
        name, help=help_, description=description, epilog=epilog, formatter_class=HelpFormatter
    )
    parser.default_verb = default_verb
    return parser.add_subparsers(dest="verb", metavar="VERB", required=True)


def add_verb(
    verbs,
    name: str,
    func: Callable[[argparse.Namespace], int],
    help_: str,
    description: str,
    example: str,
    options: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.ArgumentParser:
    """One verb with ``--help`` text, an example and ``--store``; ``options(parser)`` declares the
    rest of its options when the verb is used."""
    parser = verbs.add_parser(name, help=help_, description=description, formatter_class=HelpFormatter,
                              epilog=f"example:\n  {example}\n")  # fmt: skip
    add_store_option(parser)
    parser.set_defaults(func=func)
    if options is not None:
        parser.declare.append(options)
    return parser


def add_recipe_verb(
    verbs,
    name: str,
    *,
    stages: Mapping[str, Stage],
    expect: str,
    help_: str,
    description: str,
    example: str,
    report: Callable[[Any], None] | None = None,
    options: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.ArgumentParser:
    """A verb that runs a recipe of one package's stages (``distillery corpus build RECIPE``);
    ``options`` may declare config options (``add_config_options(..., recipe=True)``) that override
    the recipe's values."""

    def run(args: argparse.Namespace) -> int:
        manifest = dispatch_recipe(
            args.recipe, args.store_obj, stages, args.overrides, expect, config_values(args)
        )
        print_published(manifest)
        if report:
            report(manifest)
        return 0

    parser = add_verb(verbs, name, run, help_, description, example, options)
    parser.add_argument("recipe", help="recipe YAML file")
    add_set_option(parser)
    return parser


def stage_verb(stage: Stage, source: str) -> Callable[[argparse.Namespace], int]:
    """The function of a verb that runs ``stage`` on its config options (``add_config_options``)."""

    def run(args: argparse.Namespace) -> int:
        print_published(stage.runner()(config_values(args), args.store_obj, source))
        return 0

    return run


def stage_options(stage: Stage, fields: Sequence[str] | None = None, **how: Any):
    """A verb's ``options``: these fields of ``stage``'s config (``add_config_options``), declared
    when the verb is used."""
    return lambda parser: add_config_options(parser, stage.config_class(), fields, **how)


# --- options derived from a config --------------------------------------------------------------

CONFIG_FIELDS = "config_fields"
"""The namespace attribute listing the config fields a verb declared as options."""
_UNITS = {"ms": "MS", "seconds": "S", "after": "S", "s": "S"}


def add_config_options(
    parser: argparse.ArgumentParser,
    config: type[BaseModel],
    fields: Sequence[str] | None = None,
    *,
    positional: Sequence[str] = (),
    flags: Mapping[str, str] | None = None,
    computed: Mapping[str, str] | None = None,
    within: str | None = None,
    recipe: bool = False,
    group: bool = False,
) -> None:
    """One option per field of ``config`` (all, or ``fields``; ``a.b`` is field ``b`` of the config
    in field ``a``): ``--max-batch N`` for ``max_batch: int``, choices for a ``Literal``, a switch
    for a ``bool`` (``--no-exact`` where the default is true), a repeatable option for a list.

    The field's type, default and docstring are the option's; an option not given is left out, so
    the config's default applies. ``positional`` fields are arguments; ``flags`` renames options
    (``{"ray_address": "--address"}``); ``computed`` names fields whose default the verb decides
    itself (a required one becomes optional), with how (the help shows it as the default);
    ``within`` is the field that holds ``config`` in the verb's own config (``dedup`` for
    ``DedupConfig`` in a ``corpus.build``). With ``recipe``, the options override a recipe's
    values. With ``group``, they are listed under the config's docstring. ``config_values`` reads
    them.
    """
    target: Any = parser
    if group:
        title = (config.__doc__ or config.__name__).splitlines()[0].rstrip(".").replace("``", "")
        target = parser.add_argument_group(title)
    computed = computed or {}
    paths = list(fields if fields is not None else config.model_fields)
    prefix = f"{within}." if within else ""
    for path in [*positional, *paths]:
        owner, name = _field_owner(config, path)
        info = owner.model_fields[name]
        kind, optional = _unwrap(info.annotation)
        if path in positional:
            target.add_argument(prefix + path, metavar=name.upper(), help=_help(owner, name))
            continue
        flag = (flags or {}).get(path, "--" + path.replace(".", "-").replace("_", "-"))
        default = info.get_default(call_default_factory=True)
        if recipe:
            shown = f" (overrides the recipe's {path})"
        elif path in computed:
            shown = f" (default: {computed[path]})"
        elif kind is bool or info.is_required() or isinstance(default, list):
            shown = ""
        else:
            empty = "; '' for none" if optional and default is not None else ""
            shown = f" (default: {default}{empty})"
        flag, options = _option(flag, name, info, kind, optional, default)
        if info.is_required() and path not in computed and not recipe:
            options["required"] = True
        about = ("turn off: " if kind is bool and default is True else "") + _help(owner, name)
        target.add_argument(
            flag, dest=prefix + path, default=argparse.SUPPRESS, help=about + shown, **options
        )
    declared = parser.get_default(CONFIG_FIELDS) or ()
    parser.set_defaults(**{CONFIG_FIELDS: (*declared, *(prefix + p for p in [*positional, *paths]))})


def config_values(args: argparse.Namespace) -> dict[str, Any]:
    """The config options given on the command line, as a (nested) mapping of config fields."""
    values: dict[str, Any] = {}
    for path in getattr(args, CONFIG_FIELDS, ()):
        if hasattr(args, path):
            *outer, last = path.split(".")
            target = values
            for part in outer:
                target = target.setdefault(part, {})
            target[last] = getattr(args, path)
    return values


def _field_owner(config: type[BaseModel], path: str) -> tuple[type[BaseModel], str]:
    *outer, name = path.split(".")
    for part in outer:
        kind, _ = _unwrap(config.model_fields[part].annotation)
        config = kind
    if name not in config.model_fields:
        raise KeyError(f"{config.__name__} has no field {name!r}")  # a bug in a verb's declaration
    return config, name


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(the type a field holds, whether it may be None): ``int | None`` is ``(int, True)``."""
    if typing.get_origin(annotation) is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        kind, _ = _unwrap(members[0]) if len(members) == 1 else (str, False)
        return kind, True
    return annotation, False


def _option(
    flag: str, name: str, info, kind: Any, optional: bool, default: Any
) -> tuple[str, dict[str, Any]]:
    """The option string and how argparse reads it, for a field holding ``kind``."""
    if kind is bool:
        if default is True:
            return "--no-" + flag.removeprefix("--"), {"action": "store_false"}
        return flag, {"action": "store_true"}
    if typing.get_origin(kind) is Literal:
        return flag, {"choices": list(typing.get_args(kind))}
    if typing.get_origin(kind) is list:
        return flag, {"action": "append", "metavar": flag.removeprefix("--").replace("-", "_").upper()}
    reader = kind if kind in (int, float) else (_none_if_empty if optional else str)
    return flag, {"type": reader, "metavar": _metavar(name, kind, info, flag)}


def _none_if_empty(value: str) -> str | None:
    return value or None


def _metavar(name: str, kind: Any, info, flag: str) -> str:
    if kind in (int, float):
        if name.rsplit("_", 1)[-1] in _UNITS:
            return _UNITS[name.rsplit("_", 1)[-1]]
        share = kind is float and any(getattr(m, "le", None) == 1 for m in info.metadata)
        return "RATE" if share else "N"  # a share (of requests)
    return "PATH" if kind is Path else flag.removeprefix("--").replace("-", "_").upper()


def _help(config: type[BaseModel], name: str) -> str:
    """The field's docstring, as one line of help (``%`` doubled for argparse)."""
    text = config.model_fields[name].description or _attribute_docs(config).get(name, "")
    return " ".join(text.replace("``", "").split()).replace("%", "%%")


@functools.cache
def _attribute_docs(config: type) -> dict[str, str]:
    """The docstrings under a class's fields (and its bases'), read from its source."""
    docs: dict[str, str] = {}
    for cls in reversed(config.__mro__):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        except (OSError, TypeError, SyntaxError):
            continue  # a builtin or a class without source
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for field, after in zip(body, body[1:], strict=False):
            if (
                isinstance(field, ast.AnnAssign)
                and isinstance(field.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[field.target.id] = inspect.cleandoc(after.value.value)
    return docs
