"""The store: where published datasets, runs and evals live, and how references resolve.

Layout (DESIGN.md)::

    distillery-store/
      datasets/<name>/<id>/{manifest.json, data/*.parquet, ledger/*.parquet}
      datasets/<name>/.published.jsonl      # every publish of this name, in order ("latest")
      runs/<name>/<id>/{manifest.json, checkpoint/…, metrics.jsonl}
      evals/<name>/<id>/{manifest.json, metrics.json}

A folder without ``manifest.json`` (for instance a ``.tmp-…`` folder left by a killed job) is an
unfinished job and is never listed or resolved.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import socket
import sys
from pathlib import Path

from pydantic import ValidationError

from manifests.errors import DistilleryError
from manifests.schema import SCHEMA_VERSION, Kind, Manifest

DEFAULT_STORE = "distillery-store"
KINDS: tuple[Kind, ...] = ("dataset", "run", "eval")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
"""Artefact names: a folder name on every filesystem, never a path or a glob."""
HISTORY = ".published.jsonl"


def default_store_root() -> Path:
    return Path(os.environ.get("DISTILLERY_STORE", DEFAULT_STORE))


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name or ""):
        raise DistilleryError(
            f"'{name}' is not a valid name: use letters, digits, '.', '_' and '-', starting with a letter or digit"
        )
    return name


def load_manifest(path: Path) -> Manifest:
    """Read a ``manifest.json`` (or the folder holding one); a malformed one is a clear error."""
    path = Path(path)
    file = path / "manifest.json" if path.is_dir() else path
    if not file.is_file():
        raise DistilleryError(
            f"{path}: no manifest.json here; give a store reference (name or name@id) or a dataset folder"
        )
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DistilleryError(
            f"{file}: not a readable manifest ({e}); restore it or re-run its stage"
        ) from None
    version = raw.get("schema_version", SCHEMA_VERSION) if isinstance(raw, dict) else SCHEMA_VERSION
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise DistilleryError(
            f"{file}: schema version {version} was written by a newer distillery (this one reads {SCHEMA_VERSION}); upgrade"
        )
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise DistilleryError(f"{file}: not a valid manifest ({where}: {first['msg']})") from None
    manifest._location = file.parent.resolve()
    return manifest


def _size_and_change(folder: Path) -> tuple[int, float]:
    size, changed = 0, 0.0
    for path in [folder, *folder.rglob("*")]:
        try:  # a running job may remove a file while it is looked at
            stat = path.stat()
        except FileNotFoundError:
            continue
        changed = max(changed, stat.st_mtime)
        size += stat.st_size if path.is_file() else 0
    return size, changed


def tmp_owner_running(folder_name: str) -> bool | None:
    """Whether the process that a ``.tmp-<host>-<pid>-…`` folder names is running; None when the
    folder is another host's (or not named so), whose processes cannot be asked."""
    prefix = f".tmp-{socket.gethostname()}-"
    pid = folder_name[len(prefix) :].split("-", 1)[0] if folder_name.startswith(prefix) else ""
    if not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class Store:
    """A directory of published artefacts with name, ``name@id-prefix`` and path references."""

    def __init__(self, root: Path | str | None = None):
        self.root = Path(root) if root is not None else default_store_root()

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    def kind_dir(self, kind: Kind) -> Path:
        return self.root / f"{kind}s"

    def name_dir(self, kind: Kind, name: str) -> Path:
        return self.kind_dir(kind) / check_name(name)

    def artefact_dir(self, kind: Kind, name: str, id_: str) -> Path:
        return self.name_dir(kind, name) / id_

    def record_publish(self, manifest: Manifest) -> None:
        """Note that ``manifest`` is now the latest of its name (also when it already existed)."""
        line = json.dumps({"id": manifest.id, "at": manifest.producer.finished_at.isoformat()}) + "\n"
        # One short O_APPEND write: concurrent publishers interleave whole lines.
        fd = os.open(
            self.name_dir(manifest.kind, manifest.name) / HISTORY, os.O_WRONLY | os.O_CREAT | os.O_APPEND
        )
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def unfinished(self) -> list[tuple[Path, int, float, bool]]:
        """What unfinished jobs left in the store: ``.work-`` folders (resume state of builds and
        training runs, kept until they publish) and ``.tmp-`` folders (a publish not finished yet, or
        never), each with its size in bytes, the time anything in it last changed, and whether the
        process that owns it is known to be running (a ``.tmp-`` folder names its host and pid)."""
        found = []
        for kind in KINDS:
            for name in self._names(kind):
                for folder in sorted((self.kind_dir(kind) / name).glob(".*")):
                    if folder.is_dir() and folder.name.startswith((".work-", ".tmp-")):
                        found.append(
                            (folder, *_size_and_change(folder), tmp_owner_running(folder.name) is True)
                        )
        return found

    def _names(self, kind: Kind) -> list[str]:
        base = self.kind_dir(kind)
        return (
            sorted(p.name for p in base.iterdir() if p.is_dir() and NAME_PATTERN.match(p.name))
            if base.is_dir()
            else []
        )

    def _versions(self, kind: Kind, name: str) -> list[Manifest]:
        folder = self.kind_dir(kind) / name
        found = []
        for file in folder.glob("*/manifest.json"):
            if file.parent.name.startswith("."):
                continue
            try:
                found.append(load_manifest(file))
            except DistilleryError as e:
                # One damaged manifest must not hide every other artefact; it fails when asked for.
                print(f"warning: skipping {e}", file=sys.stderr)
        order = {id_: i for i, id_ in enumerate(self._history(folder))}
        return sorted(found, key=lambda m: (order.get(m.id, -1), m.created_at, m.id))

    @staticmethod
    def _history(folder: Path) -> list[str]:
        """Ids in the order they were last published (a re-publish moves an id to the end)."""
        path = folder / HISTORY
        if not path.is_file():
            return []
        ids: list[str] = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                id_ = json.loads(line)["id"]
            except (ValueError, KeyError, TypeError):
                continue
            if id_ in ids:
                ids.remove(id_)
            ids.append(id_)
        return ids

    def list(self, kind: Kind | None = None, name: str | None = None) -> list[Manifest]:
        """Published manifests; the versions of one name are in publish order (latest last)."""
        found: list[Manifest] = []
        for k in [kind] if kind else KINDS:
            for n in [name] if name else self._names(k):
                found += self._versions(k, n)
        return found if name else sorted(found, key=lambda m: (m.created_at, m.id))

    def get(self, id_: str) -> Manifest:
        """The manifest with this full id, wherever it is in the store."""
        for k in KINDS:
            for n in self._names(k):
                file = self.kind_dir(k) / n / id_ / "manifest.json"
                if file.is_file():
                    return load_manifest(file)
        raise DistilleryError(f"no manifest with id {id_} in store {self.root}")

    def resolve(self, ref: str, kind: Kind | None = None) -> Manifest:
        """Resolve ``name`` (latest), ``name@<id-prefix>`` (pinned) or a path to a manifest."""
        ref = str(ref)
        if ("/" in ref or ref.endswith(".json")) and "@" not in ref:
            if Path(ref).exists():
                manifest = load_manifest(Path(ref))
                if kind and manifest.kind != kind:
                    raise DistilleryError(f"{ref}: is a {manifest.kind} manifest, a {kind} was expected")
                return manifest
            raise DistilleryError(f"{ref}: no such file or folder")
        name, _, prefix = ref.partition("@")
        if not NAME_PATTERN.match(name):
            raise DistilleryError(
                f"'{ref}' is neither a reference (NAME or NAME@ID-PREFIX) nor an existing path"
            )
        candidates = self.list(kind=kind, name=name)
        if not candidates:
            raise DistilleryError(self._missing_name(name, kind))
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

    def _missing_name(self, name: str, kind: Kind | None) -> str:
        # A name folder may hold only what a failed or unfinished job left (``.tmp-``, ``.work-``).
        known = sorted({n for k in ([kind] if kind else KINDS) for n in self._names(k)
                        if any((self.kind_dir(k) / n).glob("[!.]*/manifest.json"))})  # fmt: skip
        what = f"{kind} " if kind else ""
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
        if close:
            advice = "did you mean " + " or ".join(f"'{c}'" for c in close) + "?"
        elif known:
            advice = "known: " + ", ".join(known)
        else:
            advice = f"the store at {self.root} holds none yet (set --store or DISTILLERY_STORE?)"
        return f"no {what}manifest named '{name}' in {self.root}; {advice}"

    def children(self, id_: str) -> list[Manifest]:
        """Manifests that name this one as a parent."""
        return [m for m in self.list() if any(p.id == id_ for p in m.parents)]
