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

import contextlib
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
            f"{file}: damaged, not JSON ({e}); restore this file from a backup, or re-run the recipe "
            "that made it (its output replaces the damaged version)"
        ) from None
    except OSError as e:
        raise DistilleryError(f"{file}: cannot be read ({e.strerror or e}); check its permissions") from None
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
        raise DistilleryError(
            f"{file}: not a valid manifest ({where or 'top level'}: {first['msg']}); restore this file "
            "from a backup, or re-run the recipe that made it (its output replaces the damaged version)"
        ) from None
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


OWNER_PREFIX = ".owner-"
"""Files ``.owner-<host>-<pid>.json`` in an unfinished job's folder: the processes working in it."""


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks after boot, field 22 of ``/proc/<pid>/stat``): with the
    pid, it names one process, where a pid alone may since have been given to another. None off Linux."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # after the command name, which may hold spaces
    return fields[19] if len(fields) > 19 else None


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


WORK_PREFIXES = (".work-", ".crawl-", ".tmp-")
"""Folders an unfinished job keeps beside the versions of its name: a build's or training run's resume
state (``.work-``), a crawl's frontier and WARC files (``.crawl-``), a publish under way (``.tmp-``)."""


def claim_work_folder(folder: Path) -> Path:
    """Create ``folder`` (the ``WORK_PREFIXES`` folder of an unfinished job) if needed and record this
    process as working in it, so that ``manifests clean`` knows at once when no process is left.

    A job that resumes in the folder of a killed one claims it anew; the dead owner's record stays
    and no longer counts.
    """
    folder.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    owner = {"host": socket.gethostname(), "pid": pid, "start": _process_start(pid), "boot": _boot_id()}
    file = folder / f"{OWNER_PREFIX}{socket.gethostname()}-{pid}.json"
    tmp = file.with_suffix(".tmp")
    tmp.write_text(json.dumps(owner))
    os.replace(tmp, file)
    return folder


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _owner_running(file: Path) -> bool | None:
    try:
        owner = json.loads(file.read_text())
        host, pid = owner["host"], int(owner["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if host != socket.gethostname():
        return None  # another machine's process cannot be asked
    boot = _boot_id()
    if owner.get("boot") and boot and owner["boot"] != boot:
        return False  # the machine restarted since: every process of then is gone
    if not _pid_running(pid):
        return False
    start = owner.get("start")
    return not (start and _process_start(pid) not in (None, start))  # else the pid was reused


def folder_owner_running(folder: Path) -> bool | None:
    """Whether a process working in an unfinished job's folder is still running: True if any recorded
    owner runs, False if every one is known to be gone, None when that cannot be told (an owner on
    another host, or a folder without owner records: then the time of its last change decides)."""
    states = [_owner_running(f) for f in folder.glob(f"{OWNER_PREFIX}*.json")]
    if not states:
        return tmp_owner_running(folder.name)
    if True in states:
        return True
    return None if None in states else False


def tmp_owner_running(folder_name: str) -> bool | None:
    """Whether the process that a ``.tmp-<host>-<pid>-…`` folder names is running; None when the
    folder is another host's (or not named so), whose processes cannot be asked."""
    prefix = f".tmp-{socket.gethostname()}-"
    pid = folder_name[len(prefix) :].split("-", 1)[0] if folder_name.startswith(prefix) else ""
    if not pid.isdigit():
        return None
    return _pid_running(int(pid))


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

    def cache_dir(self, purpose: str) -> Path:
        """``<store>/.cache/<purpose>``: what a rerun may reuse (verified files, input hashes), never
        part of an artefact; deleting it only costs the work again."""
        return self.root / ".cache" / purpose

    def remove_name_if_empty(self, kind: Kind, name: str) -> None:
        """After a failed job: a name that never got a version leaves no empty folder behind.
        Anything inside (versions, their history, another job's work) keeps the folder."""
        with contextlib.suppress(OSError):
            self.name_dir(kind, name).rmdir()

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

    def unfinished(self) -> list[tuple[Path, int, float, bool | None]]:
        """What unfinished jobs left in the store: ``.work-`` and ``.crawl-`` folders (resume state of
        builds, training runs and crawls, kept until they publish) and ``.tmp-`` folders (a publish not
        finished yet, or never), each with its size in bytes, the time anything in it last changed, and
        whether a process working in it is running (``folder_owner_running``: None when unknown)."""
        found = []
        for kind in KINDS:
            for name in self._names(kind):
                for folder in sorted((self.kind_dir(kind) / name).glob(".*")):
                    if folder.is_dir() and folder.name.startswith(WORK_PREFIXES):
                        found.append((folder, *_size_and_change(folder), folder_owner_running(folder)))
        return found

    def _names(self, kind: Kind) -> list[str]:
        base = self.kind_dir(kind)
        return (
            sorted(p.name for p in base.iterdir() if p.is_dir() and NAME_PATTERN.match(p.name))
            if base.is_dir()
            else []
        )

    def _versions(
        self, kind: Kind, name: str, damaged: dict[str, DistilleryError] | None = None
    ) -> list[Manifest]:
        """The readable versions of a name, in publish order. A version whose manifest cannot be read
        goes into ``damaged`` (id → its error) when given, else it is skipped with a warning."""
        folder = self.kind_dir(kind) / name
        found = []
        for file in folder.glob("*/manifest.json"):
            if file.parent.name.startswith("."):
                continue
            try:
                found.append(load_manifest(file))
            except DistilleryError as e:
                # One damaged manifest must not hide every other artefact; it fails when asked for.
                if damaged is None:
                    print(f"warning: skipping {e}", file=sys.stderr)
                else:
                    damaged[file.parent.name] = e
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
        if "@" in ref and not prefix:
            # 'name@' is a pin with its id left out (an empty shell variable?), not a request for
            # the latest version.
            raise DistilleryError(
                f"'{ref}': no id prefix after '@'; give NAME@ID-PREFIX for one version, "
                "or NAME for the latest"
            )
        damaged: dict[str, DistilleryError] = {}
        candidates: list[Manifest] = []
        for k in [kind] if kind else KINDS:
            candidates += self._versions(k, name, damaged)
        if not candidates and not damaged:
            raise DistilleryError(self._missing_name(name, kind))
        if not prefix:
            latest = self._latest_damaged(name, kind, candidates, damaged)
            if latest is not None:
                raise latest
            return candidates[-1]
        ids = [m.id for m in candidates] + list(damaged)
        matches = [id_ for id_ in ids if id_.startswith(prefix)]
        if not matches:
            shown = ", ".join(id_[:12] for id_ in ids)
            raise DistilleryError(
                f"'{ref}': no version of '{name}' has an id starting with '{prefix}'; versions: {shown}"
            )
        if len(matches) > 1:
            shown = ", ".join(id_[:12] for id_ in matches)
            raise DistilleryError(
                f"'{ref}' is ambiguous: {len(matches)} versions match ({shown}); give more of the id"
            )
        if matches[0] in damaged:
            raise damaged[matches[0]]
        return next(m for m in candidates if m.id == matches[0])

    def _latest_damaged(
        self, name: str, kind: Kind | None, readable: list[Manifest], damaged: dict[str, DistilleryError]
    ) -> DistilleryError | None:
        """The error of the latest version of ``name`` when that one cannot be read: the name must
        then fail, not quietly mean an older version."""
        if not damaged:
            return None
        if not readable:
            return next(iter(damaged.values()))
        for k in [kind] if kind else KINDS:
            history = self._history(self.kind_dir(k) / name)
            known = [id_ for id_ in history if id_ in damaged or any(m.id == id_ for m in readable)]
            if known and known[-1] in damaged:
                return damaged[known[-1]]
        return None

    def _missing_name(self, name: str, kind: Kind | None) -> str:
        # A name folder may hold only what a failed or unfinished job left (``WORK_PREFIXES``).
        known = sorted({n for k in ([kind] if kind else KINDS) for n in self._names(k)
                        if any((self.kind_dir(k) / n).glob("[!.]*/manifest.json"))})  # fmt: skip
        what = f"{kind} " if kind else ""
        other = [k for k in KINDS if k != kind and any((self.kind_dir(k) / name).glob("[!.]*/manifest.json"))]
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
        if kind and other:
            advice = f"'{name}' is a {other[0]}, and a {kind} is needed here"
        elif close:
            advice = "did you mean " + " or ".join(f"'{c}'" for c in close) + "?"
        elif known:
            advice = "known: " + ", ".join(known)
        else:
            advice = f"the store at {self.root} holds none yet (set --store or DISTILLERY_STORE?)"
        return f"no {what}manifest named '{name}' in {self.root}; {advice}"

    def children(self, id_: str) -> list[Manifest]:
        """Manifests that name this one as a parent."""
        return [m for m in self.list() if any(p.id == id_ for p in m.parents)]
