"""``--set key.sub=value`` overrides for recipes (values parsed as YAML: numbers, lists, …).

A number indexes into a list: ``--set steps.0.min_words=3`` changes the first step.
"""

from __future__ import annotations

from typing import Any

import yaml

from manifests.errors import DistilleryError


def _index(item: str, where: str, target: list, part: str) -> int:
    """The list index ``part`` names, within ``target``'s length."""
    if not part.isdigit():
        raise DistilleryError(
            f"--set {item!r}: '{where}' is a list; give an item's index (0 to {len(target) - 1}), "
            f"not '{part}'"
            if target
            else f"--set {item!r}: '{where}' is an empty list; set it whole (--set {where}='[...]')"
        )
    index = int(part)
    if index >= len(target):
        raise DistilleryError(
            f"--set {item!r}: '{where}' has {len(target)} item(s), so index {index} is out of range"
            + (f" (0 to {len(target) - 1})" if target else f"; set it whole (--set {where}='[...]')")
        )
    return index


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise DistilleryError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.max_steps=10")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        parts = key.split(".")
        if not all(parts):
            raise DistilleryError(f"--set {item!r}: empty part in key '{key}'; use dotted keys like a.b.0.c")
        target: Any = data
        for depth, part in enumerate(parts):
            where = ".".join(parts[:depth]) or "(top level)"
            last = depth == len(parts) - 1
            if isinstance(target, list):
                index = _index(item, where, target, part)
                if last:
                    target[index] = value
                else:
                    if target[index] is None:
                        target[index] = {}
                    target = target[index]
            elif isinstance(target, dict):
                if last:
                    target[part] = value
                else:
                    if target.get(part) is None:
                        target[part] = {}  # a key the recipe leaves out (or empty) is created
                    target = target[part]
            else:
                raise DistilleryError(
                    f"--set {item!r}: '{where}' is {type(target).__name__} {target!r}, which has no "
                    f"key '{part}'"
                )
    return data
