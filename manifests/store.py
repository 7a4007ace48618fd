"""The store: where published datasets, runs and evals live, and how references resolve.

Layout (DESIGN.md)::

    distillery-store/
      datasets/<name>/<id>/{manifest.json, data/*.parquet, ledger/*.parquet}
      runs/<name>/<id>/{manifest.json, checkpoint/…, metrics.jsonl}
      evals/<name>/<id>/{manifest.json, metrics.json}

A folder without ``manifest.json`` (for instance a ``.tmp-…`` folder left by a killed job) is an
unfinished job and is never listed or resolved.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from pydantic import ValidationError

from manifests.errors import DistilleryError
from manifests.schema import Kind, Manifest

DEFAULT_STORE = "distillery-store"
KINDS: tuple[Kind, ...] = ("dataset", "run", "eval")


def default_store_root() -> Path:
    return Path(os.environ.get("DISTILLERY_STORE", DEFAULT_STORE))


def load_manifest(path: Path) -> Manifest:
    """Read a ``manifest.json`` (or the folder holding one); a malformed one is a clear error."""
    path = Path(path)
    file = path / "manifest.json" if path.is_dir() else path
    if not file.is_file():
        raise DistilleryError(
            f"{path}: no manifest.json here; give a store reference (name or name@id) or a dataset folder"
        )
    try:
        manifest = Manifest.model_validate_json(file.read_text())
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise DistilleryError(f"{file}: not a valid manifest ({where}: {first['msg']})") from None
    manifest._location = file.parent.resolve()
    return manifest


class Store:
    """A directory of published artefacts with name, ``name@id-prefix`` and path references."""

    def __init__(self, root: Path | str | None = None):
        self.root = Path(root) if root is not None else default_store_root()

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    def kind_dir(self, kind: Kind) -> Path:
        return self.root / f"{kind}s"

    def artefact_dir(self, kind: Kind, name: str, id_: str) -> Path:
        return self.kind_dir(kind) / name / id_

    def list(self, kind: Kind | None = None, name: str | None = None) -> list[Manifest]:
        """Published manifests, oldest first."""
        found: list[Manifest] = []
        for k in [kind] if kind else KINDS:
            base = self.kind_dir(k)
            if not base.is_dir():
                continue
            pattern = f"{name}/*/manifest.json" if name else "*/*/manifest.json"
            for file in base.glob(pattern):
                if file.parent.name.startswith("."):
                    continue
                found.append(load_manifest(file))
        return sorted(found, key=lambda m: (m.created_at, m.id))

    def get(self, id_: str) -> Manifest:
        """The manifest with this full id, wherever it is in the store."""
        for k in KINDS:
            for file in self.kind_dir(k).glob(f"*/{id_}/manifest.json"):
                return load_manifest(file)
        raise DistilleryError(f"no manifest with id {id_} in store {self.root}")

    def resolve(self, ref: str, kind: Kind | None = None) -> Manifest:
        """Resolve ``name`` (latest), ``name@<id-prefix>`` (pinned) or a path to a manifest."""
        ref = str(ref)
        as_path = Path(ref)
        if ("/" in ref or ref.endswith(".json")) and "@" not in ref:
            if as_path.exists():
                manifest = load_manifest(as_path)
                if kind and manifest.kind != kind:
                    raise DistilleryError(f"{ref}: is a {manifest.kind} manifest, a {kind} was expected")
                return manifest
            raise DistilleryError(f"{ref}: no such file or folder")
        name, _, prefix = ref.partition("@")
        candidates = self.list(kind=kind, name=name)
        if not candidates:
            known = sorted({m.name for m in self.list(kind=kind)})
            what = f"{kind} " if kind else ""
            hint = difflib.get_close_matches(name, known, n=1)
            if hint:
                advice = f"did you mean '{hint[0]}'?"
            elif known:
                advice = "known: " + ", ".join(known)
            else:
                advice = f"the store at {self.root} holds none yet (set --store or DISTILLERY_STORE?)"
            raise DistilleryError(f"no {what}manifest named '{name}' in {self.root}; {advice}")
        if not prefix:
            return candidates[-1]
        matches = [m for m in candidates if m.id.startswith(prefix)]
        if not matches:
            ids = ", ".join(m.id[:12] for m in candidates)
            raise DistilleryError(
                f"'{ref}': no version of '{name}' has an id starting with '{prefix}'; versions: {ids}"
            )
        if len(matches) > 1:
            ids = ", ".join(m.id[:12] for m in matches)
            raise DistilleryError(
                f"'{ref}' is ambiguous: {len(matches)} versions match ({ids}); give more of the id"
            )
        return matches[0]

    def children(self, id_: str) -> list[Manifest]:
        """Manifests that name this one as a parent."""
        return [m for m in self.list() if any(p.id == id_ for p in m.parents)]
