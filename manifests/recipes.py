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


def read_recipe(path: Path | str) -> dict[str, Any]:
    """Parse a recipe file into a mapping with a ``stage`` key."""
    path = Path(path)
    if not path.is_file():
        raise DistilleryError(f"recipe {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
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


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the field at ``loc`` (for key suggestions)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(part)
        if field is None:
            return None
        current = field.annotation
        args = getattr(current, "__args__", ())
        for arg in args:
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                current = arg
                break
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def format_validation_error(error: ValidationError, model: type[BaseModel], source: str) -> str:
    """One line for the first problem of a config, with the nearest valid key for a typo."""
    first = error.errors()[0]
    loc = tuple(first["loc"])
    where = ".".join(str(x) for x in loc) or "(top level)"
    if first["type"] == "extra_forbidden":
        owner = _model_at(model, loc[:-1]) or model
        valid = [k for k in owner.model_fields if k != "stage"]
        hint = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        suggestion = f"did you mean '{hint[0]}'?" if hint else f"valid keys: {', '.join(valid)}"
        return f"{source}: unknown key '{where}'; {suggestion}"
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
