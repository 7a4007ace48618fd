"""``--set key.sub=value`` overrides for recipes (values parsed as YAML: numbers, lists, …)."""

from __future__ import annotations

from typing import Any

import yaml

from manifests.errors import DistilleryError


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise DistilleryError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.max_steps=10")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        target = data
        parts = key.split(".")
        for part in parts[:-1]:
            nxt = target.get(part)
            if not isinstance(nxt, dict):
                nxt = {}
                target[part] = nxt
            target = nxt
        target[parts[-1]] = value
    return data
