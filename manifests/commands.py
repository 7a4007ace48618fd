"""``distillery manifests …``: list, show, verify, lineage, trace, diff and clean."""

from __future__ import annotations

import argparse
import json

from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

from manifests.console import make_console
from manifests.errors import DistilleryError, VerificationError
from manifests.lineage import LineageNode, TraceStep, describe_source, diff, lineage, short, trace_record
from manifests.schema import Manifest
from manifests.verify import manifest_edited, verify

console = make_console()
err_console = make_console(stderr=True)


def esc(value: object) -> str:
    """A value from the data or the store printed as itself: rich would read '[red]' or '[/]' in a
    text, a URL or a path as markup (and fail on an unmatched closing tag)."""
    return escape(str(value))


def _list(args) -> int:
    manifests = args.store_obj.list(kind=args.kind)
    if not manifests:
        console.print(f"no manifests in {esc(args.store_obj.root)}")
        return 0
    table = Table("kind", "reference", "stage", "created", "rows / files", box=None)
    for m in manifests:
        rows = sum(f.rows or 0 for f in m.data_files())
        # What a hand-edited manifest claims is listed, but flagged (checking it reads no data file).
        flag = "  [red](manifest edited: run verify)[/]" if manifest_edited(m) else ""
        table.add_row(m.kind, m.ref, esc(m.producer.stage), m.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                      (f"{rows} rows" if rows else f"{len(m.files)} files") + flag)  # fmt: skip
    console.print(table)
    return 0


def _clean(args) -> int:
    """Remove what unfinished jobs left: at once when no process works in it any more, else (another
    host's, or a folder that names no owner) once it has not changed for ``--idle-hours``."""
    import shutil
    import time

    found = args.store_obj.unfinished()
    if not found:
        console.print(f"nothing unfinished in {esc(args.store_obj.root)}")
        return 0
    table = Table("folder", "size", "last change", "", box=None)
    freed = 0
    for folder, size, changed, running in found:
        idle_h = (time.time() - changed) / 3600
        if running:
            action = "kept: its process is running"
        elif running is None and idle_h < args.idle_hours:
            action = "kept: changed recently (still running?)"
        elif args.dry_run:
            action = "would remove" + (" (its process is gone)" if running is False else "")
        else:
            shutil.rmtree(folder, ignore_errors=True)
            action, freed = "removed", freed + size
        table.add_row(
            esc(folder.relative_to(args.store_obj.root)), _size(size), f"{idle_h:.1f} h ago", action
        )
    console.print(table)
    console.print(f"freed {_size(freed)}" if not args.dry_run else "dry run: nothing removed")
    return 0


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _export(args) -> int:
    """``manifests export``: Croissant or a Hub card of one dataset, or OpenLineage events of manifests."""
    from pathlib import Path

    from manifests import exports
    from manifests.lineage_events import write_run_events

    store = args.store_obj
    if args.openlineage:
        if args.format or args.out:
            raise DistilleryError(
                "--openlineage DIR writes one file per manifest; leave out --format and --out"
            )
        manifests = [store.resolve(ref) for ref in args.refs] if args.refs else store.list()
        if not manifests:
            raise DistilleryError(
                f"no manifests in {store.root} to export (set --store or DISTILLERY_STORE?)"
            )
        folder = Path(args.openlineage)
        inside = exports.published_folder_around(folder)
        if inside is not None:
            raise DistilleryError(
                f"--openlineage {folder}: inside the published folder of {inside.ref}, where a new file "
                "makes verify report it as extra; write the events elsewhere"
            )
        written, edited = write_run_events(manifests, folder, store.root)
        console.print(
            f"{len(written)} manifests: START and COMPLETE events → {esc(folder)}/<kind>-<name>-<id>.json"
        )
        if edited:
            raise VerificationError(
                f"skipped {', '.join(edited)}: manifest.json edited after publishing, so its events would not "
                "be trustworthy; restore it or re-run the stage that made it"
            )
        return 0
    if len(args.refs) != 1 or not args.format:
        raise DistilleryError(
            "give one dataset and a format (manifests export REF --format croissant|hf-card), "
            "or --openlineage DIR [REF...] for run events"
        )
    m = store.resolve(args.refs[0])
    if args.format == "croissant":
        doc = exports.croissant(m, license=args.license, url=args.url)
        text = json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    else:
        text = exports.hf_card(m, license=args.license, store=store)
    if not args.out:
        print(text, end="")
        return 0
    out = Path(args.out)
    if out.is_dir():
        name = "croissant.json" if args.format == "croissant" else "README.md"
        raise DistilleryError(f"--out {out}: is a folder; give the file to write (e.g. {out / name})")
    inside = exports.published_folder_around(out)
    if inside is not None:
        raise DistilleryError(
            f"--out {out}: inside the published folder of {inside.ref}, where a new file makes verify report "
            "it as extra; write it into a copy of the folder, or elsewhere"
        )
    exports.write_atomic(out, text)
    console.print(f"{args.format} of {m.ref} → {esc(out)}")
    return 0


def explain(m: Manifest) -> None:
    console.print(f"[bold]{m.kind} {m.name}[/]  id {m.id}")
    console.print(f"  folder    {esc(m.location)}")
    console.print(f"  created   {m.created_at.isoformat()}  by stage [cyan]{m.producer.stage}[/]")
    p = m.producer
    git = f"{p.git_commit[:12]}{' (dirty)' if p.git_dirty else ''}" if p.git_commit else "not in git"
    console.print(f"  code      distillery {p.package_version}, commit {git}, seed {p.seed}")
    for parent in m.parents:
        console.print(f"  parent    {parent.kind} {esc(parent.name)}@{parent.id[:12]} ({esc(parent.role)})")
    for f in m.files:
        extra = f", {f.rows} rows" if f.rows is not None else ""
        split = f" [{f.split}]" if f.split else ""
        console.print(
            f"  file      {esc(f.path)}{esc(split)}  {f.bytes} bytes{extra}  sha256 {f.sha256[:12]}"
        )
    for f in m.ledger:
        console.print(f"  ledger    {esc(f.path)}  {f.rows} entries")
    if m.stats:
        console.print("  stats     " + esc(json.dumps(m.stats, default=str)))
    console.print("  recipe    " + esc(json.dumps(p.recipe, default=str)))


def _show(args) -> int:
    m = args.store_obj.resolve(args.ref)
    if args.json:
        print(m.to_json(), end="")
    else:
        explain(m)
    if manifest_edited(m):
        # Shown all the same (what was edited is evidence), but never as if it could be trusted.
        raise VerificationError(
            f"{m.ref}: manifest.json was edited after it was published (its hashes no longer match "
            f"its fields), so what is shown above is not trustworthy; restore it or re-run the stage "
            f"that made it (distillery manifests verify {m.ref} checks the files too)"
        )
    return 0


def _verify(args) -> int:
    m = args.store_obj.resolve(args.ref)
    report = verify(m, use_cache=False)
    if not report.ok:
        raise VerificationError(report.problem_line())
    if report.unsealed:
        console.print(
            f"[green]ok[/] {m.ref}: {report.checked} files re-hashed, all match; the manifest's id matches "
            "its files, parents and recipe"
        )
        err_console.print(
            f"warning: {m.ref} has no integrity digest (published by an older distillery): its stats "
            "and producer cannot be checked; re-run the stage that made it to seal it"
        )
        return 0
    console.print(f"[green]ok[/] {m.ref}: {report.checked} files re-hashed, all match, manifest intact")
    return 0


def _lineage_tree(node: LineageNode, tree: Tree, edited: list[str]) -> None:
    m = node.manifest
    if m is None:
        tree.add(f"[red]{esc(node.missing)} ({esc(node.role)}) — missing from this store[/]")
        return
    label = f"[bold]{m.kind} {m.ref}[/] ({esc(node.role)}) stage [cyan]{esc(m.producer.stage)}[/]"
    if node.repeated:
        tree.add(label + "  (shown above)")
        return
    if manifest_edited(m):
        edited.append(m.ref)
        label += "  [red](manifest edited after publishing)[/]"
    branch = tree.add(f"{label}  recipe {esc(short(m.producer.recipe, 100))}")
    for parent in node.parents:
        _lineage_tree(parent, branch, edited)


def _lineage(args) -> int:
    m = args.store_obj.resolve(args.ref)
    root = Tree(f"lineage of {m.ref}")
    edited: list[str] = []
    _lineage_tree(lineage(args.store_obj, m), root, edited)
    console.print(root)
    if edited:
        raise VerificationError(
            f"the manifest of {', '.join(edited)} was edited after it was published, so this lineage is not "
            "trustworthy; restore it or re-run the stage that made it"
        )
    return 0


_ROW_SKIP = {"id", "parents", "source", "text", "messages", "_split"}


def print_trace(step: TraceStep, store, indent: int = 0) -> None:
    pad = "  " * indent
    arrow = "← " if indent else ""
    m = step.manifest
    if m is None:
        console.print(
            f"{pad}{arrow}[red]record {step.record_id}: not found — its dataset is missing from this store[/]"
        )
        return
    console.print(
        f"{pad}{arrow}[bold]{m.kind} {m.ref}[/] (stage [cyan]{m.producer.stage}[/]) record {step.record_id}"
    )
    if step.row is not None:
        split = step.row.get("_split")
        if split:
            console.print(f"{pad}    split: {esc(split)}")
        for key, value in step.row.items():
            if key not in _ROW_SKIP and value is not None:
                console.print(f"{pad}    {esc(key)}: {esc(short(value))}")
        for message in step.row.get("messages") or []:
            console.print(f"{pad}    {esc(message['role'])}: {esc(short(message['content']))}")
        if "text" in step.row:
            console.print(f"{pad}    text: {esc(short(step.row['text']))}")
        if step.row.get("source"):
            console.print(f"{pad}    [green]source: {esc(describe_source(step.row['source']))}[/]")
    else:
        console.print(f"{pad}    (not in the data: removed or never present)")
    for entry in step.ledger:
        score = f" score {entry['score']:g}" if entry.get("score") is not None else ""
        detail = f" {entry['detail']}" if entry.get("detail") else ""
        line = f"ledger: {entry['step']} {entry['action']} ({entry['reason']}){score}{detail}"
        console.print(f"{pad}    [yellow]{esc(line)}[/]")
    if indent == 0:
        for child in store.children(m.id):
            console.print(f"{pad}    used by {child.kind} {child.ref} (stage {child.producer.stage})")
    for parent in step.parents:
        print_trace(parent, store, indent + 1)


def _trace(args) -> int:
    step = trace_record(args.store_obj, args.record_id, args.ref)
    print_trace(step, args.store_obj)
    return 0


def _diff(args) -> int:
    old, new = args.store_obj.resolve(args.old), args.store_obj.resolve(args.new)
    d = diff(old, new)
    console.print(f"{old.ref} → {new.ref}")
    console.print(
        f"  rows: +{d.added} added, -{d.removed} removed, {d.kept} kept "
        f"({d.unchanged} unchanged, {d.moved} moved, {d.changed} changed; "
        f"rows matched by {', '.join(d.content)})"
    )
    if d.changed_fields:
        counts = ", ".join(f"{name} ({n})" for name, n in sorted(d.changed_fields.items()))
        console.print(f"  changed: {esc(counts)}")
        for old_id, new_id, fields in d.examples:
            console.print(f"    e.g. record {esc(old_id)} → {esc(new_id)}: {esc(', '.join(fields))}")
    for key, a, b in d.recipe_changes:
        console.print(f"  recipe {esc(key)}: {esc(short(a, 60))} → {esc(short(b, 60))}")
    for key, a, b in d.stats_changes:
        console.print(f"  stats  {esc(key)}: {esc(short(a, 60))} → {esc(short(b, 60))}")
    if not d.recipe_changes:
        console.print("  recipe: unchanged")
    return 0


def _report(args) -> int:
    import os
    from pathlib import Path

    from manifests.report import render_html, summarise

    m = args.store_obj.resolve(args.ref)
    summary = summarise(m)
    if args.format == "json":
        print(json.dumps(summary, indent=2, default=str))
        return 0
    out = Path(args.out or f"{m.name}-{m.id[:12]}.html")
    if out.is_dir():
        raise DistilleryError(
            f"--out {out}: is a folder; give the HTML file to write (e.g. {out / 'report.html'})"
        )
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(render_html(summary), encoding="utf-8")
    os.replace(tmp, out)
    console.print(f"report for {m.ref} → {esc(out)}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from manifests.verbs import add_group, add_verb

    verbs = add_group(
        sub, "manifests", "inspect and audit the store: list, show, verify, lineage, trace, diff, clean",
        "Inspect and audit published datasets, runs and evals.",
        "references: NAME (latest), NAME@ID-PREFIX (pinned), or a folder path\n\n"
        "examples:\n"
        "  distillery manifests list --kind dataset\n"
        "  distillery manifests show demo-corpus\n"
        "  distillery manifests verify demo-corpus@3f9c\n"
        "  distillery manifests lineage demo-sft-run\n"
        "  distillery manifests trace 7f3c0a9e12b4c5d6e7f8\n"
        "  distillery manifests diff demo-corpus@3f9c demo-corpus\n",
    )  # fmt: skip

    def verb(name, func, help_, example):
        return add_verb(verbs, name, func, help_, help_, example)

    p = verb("list", _list, "list published manifests, oldest first", "distillery manifests list --kind run")
    p.add_argument("--kind", choices=["dataset", "run", "eval"])
    p = verb("show", _show, "explain one manifest", "distillery manifests show demo-corpus")
    p.add_argument("ref")
    p.add_argument("--json", action="store_true", help="print the manifest as stored")
    p = verb("verify", _verify,
             "re-hash every file, check the manifest itself; name each missing, extra or altered one "
             "(exit 1)",
             "distillery manifests verify demo-corpus")  # fmt: skip
    p.add_argument("ref")
    p = verb(
        "lineage",
        _lineage,
        "print the manifest DAG back to the sources",
        "distillery manifests lineage demo-eval",
    )
    p.add_argument("ref")
    p = verb("trace", _trace, "follow one record back to its source, through every stage",
             "distillery manifests trace 7f3c0a9e12b4c5d6e7f8")  # fmt: skip
    p.add_argument("record_id")
    p.add_argument("--in", dest="ref", help="dataset to start from (default: search the store)")
    p = verb("report", _report,
             "an HTML page or JSON: a dataset's funnel, languages, lengths, scores and PII; a run's training "
             "curves and guard-rail events; an eval's metrics with intervals, paired differences and flips",
             "distillery manifests report demo-sft-run --out report.html")  # fmt: skip
    p.add_argument("ref")
    p.add_argument("--format", choices=["html", "json"], default="html")
    p.add_argument("--out", help="HTML file to write (default: NAME-ID.html here)")
    p = verb(
        "diff", _diff, "what changed between two versions of a dataset", "distillery manifests diff old new"
    )
    p.add_argument("old")
    p.add_argument("new")
    p = add_verb(
        verbs, "export", _export,
        "Croissant JSON-LD or a Hugging Face card (README.md) of a dataset; OpenLineage events of any manifest",
        "Export a dataset as Croissant 1.0 JSON-LD (--format croissant) or as a Hugging Face dataset card\n"
        "(--format hf-card), printed, or written to --out whole or not at all; paths in both are relative\n"
        "to the dataset's folder, so put the file at the root of a copy of that folder. Or write the\n"
        "OpenLineage START and COMPLETE events of manifests (datasets, runs, evals) to DIR, one JSON list\n"
        "per manifest: DIR/<kind>-<name>-<id>.json (every manifest in the store when no REF is given).",
        "distillery manifests export demo-corpus --format croissant --out croissant.json\n"
        "  distillery manifests export demo-corpus --format hf-card --license CC-BY-4.0 > README.md\n"
        "  distillery manifests export --openlineage lineage/",
    )  # fmt: skip
    p.add_argument("refs", nargs="*", metavar="REF",
                   help="the dataset (--format), or the manifests whose events to write "
                   "(--openlineage)")  # fmt: skip
    p.add_argument("--format", choices=["croissant", "hf-card"], help="what to export of one dataset")
    p.add_argument("--out", help="file to write (default: print to stdout)")
    p.add_argument("--openlineage", metavar="DIR",
                   help="write run events of the REFs (default: all) into DIR")  # fmt: skip
    p.add_argument("--license", help="the dataset's license: an SPDX id as SPDX spells it (CC-BY-4.0, "
                   "Apache-2.0) or a URL; left out when not given")  # fmt: skip
    p.add_argument("--url", help="the dataset's web page (Croissant's url); left out when not given")
    p = verb("clean", _clean, "remove what unfinished jobs left (resume state, half-published folders)",
             "distillery manifests clean --dry-run")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    p.add_argument("--idle-hours", type=float, default=1.0,
                   help="keep folders changed more recently than this (their job may still run); default 1")  # fmt: skip
