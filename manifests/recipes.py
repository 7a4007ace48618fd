"""Recipes: the YAML a user writes to run one stage, validated by that stage's typed config.

    stage: corpus.build
    name: demo-corpus
    inputs:
      - {path: examples/sample/web.jsonl, format: jsonl}

A recipe's config is a pydantic model with ``extra="forbid"``; a typo is one error line naming
the key and the nearest valid one. The resolved recipe (every default filled in) is what goes
into the output manifest.
"""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError

from manifests.errors import DistilleryError
from manifests.store import NAME_PATTERN

C = TypeVar("C", bound=BaseModel)

Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN.pattern)]
"""An artefact name: letters, digits, '.', '_' and '-' (a folder in the store, never a path)."""


class RecipeConfig(BaseModel):
    """Base of every stage's config: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def resolved(self) -> dict[str, Any]:
        """The recipe with every default filled in, as stored in the output manifest."""
        return self.model_dump(mode="json")


class _DuplicateKey(Exception):
    def __init__(self, key: Any, first: int, second: int):
        super().__init__(key, first, second)
        self.key, self.first, self.second = key, first, second


class _RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error.

    Plain YAML keeps the last value without a word, so a recipe that sets ``min_words`` twice would
    silently run with one of them.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # '<<: *defaults' merges keys that the mapping may then override on purpose
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKey(key, seen[key], line)
                seen[key] = line
            except TypeError:
                continue  # an unhashable key: the base class reports it
        return super().construct_mapping(node, deep=deep)


def read_recipe(path: Path | str) -> dict[str, Any]:
    """Parse a recipe file into a mapping with a ``stage`` key."""
    path = Path(path)
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.y*ml"))[:3]
        example = f" (it holds {', '.join(found)})" if found else ""
        raise DistilleryError(f"recipe {path}: is a folder; give a recipe file{example}")
    if not path.is_file():
        raise DistilleryError(f"recipe {path}: no such file")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_RecipeLoader)  # noqa: S506 (a safe loader)
    except _DuplicateKey as e:
        where = f"lines {e.first} and {e.second}" if e.first != e.second else f"both on line {e.first}"
        raise DistilleryError(f"recipe {path}: key '{e.key}' is given twice ({where}); keep one") from None
    except UnicodeDecodeError:
        raise DistilleryError(f"recipe {path}: not UTF-8 text; save it as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise DistilleryError(
            f"recipe {path}:{where} is not valid YAML ({getattr(e, 'problem', e)})"
        ) from None
    if not isinstance(data, dict):
        raise DistilleryError(f"recipe {path}: expected a mapping of keys at the top level")
    if not isinstance(data.get("stage"), str) or not data["stage"]:
        raise DistilleryError(
            f"recipe {path}: 'stage:' must name a stage (for example 'stage: corpus.build')"
        )
    return data


def _members(tp: Any) -> list[Any]:
    """The types a field annotation can hold (through Annotated, Optional, unions and lists)."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _members(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(tp) for m in _members(arg)]
    if origin in (list, tuple, set, dict):
        return [m for arg in typing.get_args(tp) for m in _members(arg)]
    return [tp]


def _walk(model: type[BaseModel], loc: tuple) -> tuple[type[BaseModel] | None, str]:
    """(the model owning the last key of ``loc``, the location as the user wrote it).

    Pydantic puts the tag of a discriminated union into the location (``steps.0.min_words.x``);
    the user wrote ``steps[0].x``, so the tag is followed but not shown.
    """
    current: list[Any] = [model]
    shown: list[str] = []
    owner: type[BaseModel] | None = model
    for part in loc:
        models = [m for m in current if isinstance(m, type) and issubclass(m, BaseModel)]
        if isinstance(part, int):
            shown.append(str(part))
            continue
        tagged = [m for m in models if "type" in m.model_fields and m.model_fields["type"].default == part]
        if tagged and len(models) > 1:
            current = tagged
            continue
        owner = next((m for m in models if part in m.model_fields), models[0] if models else None)
        shown.append(str(part))
        field = owner.model_fields.get(part) if owner else None
        current = _members(field.annotation) if field else []
    models = [m for m in current if isinstance(m, type) and issubclass(m, BaseModel)]
    return (models[0] if len(models) == 1 else owner), ".".join(shown)


def format_validation_error(error: ValidationError, model: type[BaseModel], source: str) -> str:
    """One line for the first problem of a config, with the nearest valid key for a typo."""
    first = error.errors()[0]
    loc = tuple(first["loc"])
    if first["type"] == "extra_forbidden":
        owner, where = _walk(model, loc[:-1])
        owner = owner or model
        where = f"{where}.{loc[-1]}" if where else str(loc[-1])
        valid = [k for k in owner.model_fields if k != "stage"]
        hint = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        suggestion = f"did you mean '{hint[0]}'?" if hint else f"valid keys: {', '.join(valid)}"
        return f"{source}: unknown key '{where}'; {suggestion}"
    _, where = _walk(model, loc)
    where = where or "(top level)"
    if first["type"] == "union_tag_invalid":
        expected = first.get("ctx", {}).get("expected_tags", "")
        tag = first.get("ctx", {}).get("tag", first.get("input"))
        return f"{source}: '{where}': unknown type {tag!r}; known types: {expected}"
    if first["type"] == "string_pattern_mismatch" and loc and loc[-1] == "name":
        return f"{source}: '{where}': {first.get('input')!r} is not a valid name (letters, digits, '.', '_', '-')"
    if first["type"] == "missing":
        return f"{source}: missing required key '{where}'"
    got = first.get("input")
    shown = f" (got {got!r})" if got is not None and not isinstance(got, dict | list) else ""
    return f"{source}: '{where}': {first['msg']}{shown}"


def parse_config(model: type[C], data: dict[str, Any], source: str) -> C:
    """Validate ``data`` against a stage's config model; errors become one ``DistilleryError`` line."""
    data = {k: v for k, v in data.items() if k != "stage"}
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise DistilleryError(format_validation_error(e, model, source)) from None
