"""Exports of a published dataset for other tools: Croissant JSON-LD and a Hugging Face dataset card.

    distillery manifests export demo-corpus --format croissant > croissant.json
    distillery manifests export demo-corpus --format hf-card --out hub/README.md

Both describe the dataset as published: every path is relative to the dataset's folder
(``data/train-00000.parquet``), the layout it keeps when the folder is copied or uploaded with the
exported file at its root. Nothing is written into the published folder itself (``verify`` would
then call the file extra). The Croissant file lists each Parquet shard as a ``cr:FileObject``
with its sha256 (from the manifest), one ``cr:FileSet`` and one ``cr:RecordSet`` per split, and a
``cr:Field`` per column (sub-fields for structs, ``repeated`` for lists); a record set reads::

    {"@type": "cr:RecordSet", "@id": "train", "key": {"@id": "train/id"},
     "field": [{"@type": "cr:Field", "@id": "train/text", "name": "text", "dataType": "sc:Text",
                "source": {"fileSet": {"@id": "train-files"}, "extract": {"column": "text"}}}, …]}

OpenLineage run events are in ``manifests/lineage_events.py``.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from manifests.data import read_shard, unreadable_shard
from manifests.errors import DistilleryError
from manifests.lineage import LineageNode, lineage
from manifests.schema import FileEntry, Manifest
from manifests.store import Store, load_manifest
from manifests.verify import ensure_verified

CROISSANT_1_0 = "http://mlcommons.org/croissant/1.0"
PARQUET_MIME = "application/x-parquet"
CROISSANT_CONTEXT: dict[str, Any] = {
    "@language": "en",
    "@vocab": "https://schema.org/",
    "citeAs": "cr:citeAs",
    "column": "cr:column",
    "conformsTo": "dct:conformsTo",
    "cr": "http://mlcommons.org/croissant/",
    "rai": "http://mlcommons.org/croissant/RAI/",
    "data": {"@id": "cr:data", "@type": "@json"},
    "dataType": {"@id": "cr:dataType", "@type": "@vocab"},
    "dct": "http://purl.org/dc/terms/",
    "equivalentProperty": "cr:equivalentProperty",
    "examples": {"@id": "cr:examples", "@type": "@json"},
    "extract": "cr:extract",
    "field": "cr:field",
    "fileProperty": "cr:fileProperty",
    "fileObject": "cr:fileObject",
    "fileSet": "cr:fileSet",
    "format": "cr:format",
    "includes": "cr:includes",
    "isLiveDataset": "cr:isLiveDataset",
    "jsonPath": "cr:jsonPath",
    "key": "cr:key",
    "md5": "cr:md5",
    "parentField": "cr:parentField",
    "path": "cr:path",
    "recordSet": "cr:recordSet",
    "references": "cr:references",
    "regex": "cr:regex",
    "repeated": "cr:repeated",
    "replace": "cr:replace",
    "samplingRate": "cr:samplingRate",
    "sc": "https://schema.org/",
    "separator": "cr:separator",
    "source": "cr:source",
    "subField": "cr:subField",
    "transform": "cr:transform",
}
"""The JSON-LD context of Croissant 1.0 (the spec's appendix, with the prefixes it relies on)."""

LANGUAGE_SHARE = 0.01
"""A language is named in the card and the Croissant file when at least this share of rows has it:
language identification labels a few odd rows of any web corpus with dozens of other codes."""


# --- the dataset as exported ------------------------------------------------------------------------


def require_dataset(manifest: Manifest, what: str) -> None:
    """Exports that describe rows: a dataset with Parquet data, whose files are intact."""
    if manifest.kind != "dataset":
        raise DistilleryError(
            f"{what} describes datasets; {manifest.ref} is a {manifest.kind} (its run events: "
            f"distillery manifests export --openlineage DIR {manifest.ref})"
        )
    if not manifest.data_files():
        raise DistilleryError(f"{manifest.ref} has no Parquet data files; {what} describes rows")
    ensure_verified(manifest)  # the export repeats the manifest's hashes and counts: they must hold


def data_schema(manifest: Manifest) -> pa.Schema | None:
    """The Arrow schema of the data files, read from the first one (the manifest's text form is
    abridged for wide structs); None when the manifest has no data files."""
    files = manifest.data_files()
    if not files:
        return None
    path = manifest.location / files[0].path
    try:
        return pq.read_schema(path).remove_metadata()
    except (pa.ArrowException, OSError) as e:
        raise unreadable_shard(path, e, manifest.ref, manifest.kind) from None


def split_files(manifest: Manifest) -> dict[str, list[FileEntry]]:
    """Data files by split, splits in the order the manifest first lists them (no split: train)."""
    splits: dict[str, list[FileEntry]] = {}
    for f in manifest.data_files():
        splits.setdefault(f.split or "train", []).append(f)
    return splits


def recipe_summary(recipe: dict[str, Any], limit: int = 6) -> str:
    """One line about a resolved recipe: its plain values and the types or paths of its lists
    (``steps: min_words, language; inputs: web.jsonl, notes; seed=0``)."""
    parts = []
    for key, value in recipe.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            names = [
                str(v.get("type") or v.get("name") or v.get("path") or v.get("dataset") or "…") for v in value
            ]
            more = f" (+{len(names) - limit})" if len(names) > limit else ""
            parts.append(f"{key}: {', '.join(PurePosixPath(n).name or n for n in names[:limit])}{more}")
        elif isinstance(value, (str, int, float)) and not isinstance(value, bool) and key != "name":
            text = str(value)
            parts.append(f"{key}={text if len(text) <= 40 else text[:39] + '…'}")
    return "; ".join(parts)


def describe(manifest: Manifest) -> str:
    """What the dataset is, in a sentence or three: what made it, from what, with how many rows."""
    p = manifest.producer
    rows = ", ".join(
        f"{sum(f.rows or 0 for f in fs)} in {split}" for split, fs in split_files(manifest).items()
    )
    made_from = (
        "from " + ", ".join(f"{q.kind} {q.name}@{q.id[:12]} ({q.role})" for q in manifest.parents)
        if manifest.parents
        else "from its sources"
    )
    summary = recipe_summary(p.recipe)
    return (
        f"Dataset {manifest.name}, made by distillery {p.package_version} (stage {p.stage}) {made_from}; "
        f"rows: {rows or 'none'}." + (f" Recipe: {summary}." if summary else "")
    )


def languages(manifest: Manifest) -> list[str]:
    """The languages of the rows, most frequent first: from ``stats['languages']`` where the stage
    counted them, else from the ``language`` column (``unknown`` and rare codes left out)."""
    counts: Counter = Counter(manifest.stats.get("languages") or {})
    schema = data_schema(manifest)
    if not counts and schema is not None and "language" in schema.names:
        for f in manifest.data_files():
            column = read_shard(manifest.location / f.path, ["language"], manifest.ref).column("language")
            counts.update(v for v in column.to_pylist() if isinstance(v, str))
    total = sum(counts.values())
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))  # ties: by code, not file order
    return [lang for lang, n in ranked if lang != "unknown" and n >= LANGUAGE_SHARE * total]


def published_folder_around(path: Path) -> Manifest | None:
    """The published artefact whose folder holds ``path`` (a file to write, or a folder to write
    into): a folder named by the id of the manifest in it; None when there is none. A file written
    there would make ``verify`` report it as extra; a copy of the folder (under another name) is
    where an export belongs."""
    target = path.resolve()
    for folder in [target, *target.parents]:
        if (folder / "manifest.json").is_file():
            try:
                manifest = load_manifest(folder)
            except DistilleryError:
                return None
            return manifest if manifest.id == folder.name else None
    return None


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: never half written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --- Croissant -------------------------------------------------------------------------------------

_CROISSANT_TYPES = (
    (pa.types.is_boolean, "sc:Boolean"),
    (pa.types.is_integer, "sc:Integer"),
    (pa.types.is_floating, "sc:Float"),
    (pa.types.is_decimal, "sc:Float"),
    (pa.types.is_date, "sc:Date"),
    (pa.types.is_timestamp, "sc:DateTime"),
    (pa.types.is_time, "sc:Time"),
)


def is_list_type(type_: pa.DataType) -> bool:
    return pa.types.is_list(type_) or pa.types.is_large_list(type_) or pa.types.is_fixed_size_list(type_)


def _croissant_field(
    field_id: str, name: str, type_: pa.DataType, file_set: str, column: str, path: list[str]
) -> dict[str, Any]:
    """One ``cr:Field`` reading ``column`` of the split's files. ``path`` leads from the column's
    value to this one inside structs: one ``jsonPath`` transform per level, which mlcroissant applies
    to every element once a level is a list (so a sub-field of a list of structs is a list)."""
    source: dict[str, Any] = {"fileSet": {"@id": file_set}, "extract": {"column": column}}
    if path:
        source["transform"] = [{"jsonPath": part} for part in path]
    field: dict[str, Any] = {
        "@type": "cr:Field",
        "@id": field_id,
        "name": name,
        "description": f"Arrow type {type_}",
    }
    if pa.types.is_dictionary(type_):
        type_ = type_.value_type
    if is_list_type(type_):
        field["repeated"] = True
        type_ = type_.value_type
    field["source"] = source
    if pa.types.is_struct(type_):
        field["subField"] = [
            _croissant_field(f"{field_id}/{quote(child.name, safe='')}", child.name, child.type,
                             file_set, column, [*path, _json_key(child.name)])
            for child in type_
        ]  # fmt: skip
    else:
        field["dataType"] = next((t for test, t in _CROISSANT_TYPES if test(type_)), "sc:Text")
    return field


def _json_key(name: str) -> str:
    return name if name.isidentifier() else "'" + name.replace("'", "\\'") + "'"


def croissant(manifest: Manifest, license: str | None = None, url: str | None = None) -> dict[str, Any]:
    """The Croissant 1.0 JSON-LD of a dataset (``license``: an SPDX id or a URL; left out when not
    known, as is ``url``, the dataset's web page)."""
    require_dataset(manifest, "croissant")
    schema = data_schema(manifest)
    assert schema is not None  # require_dataset: it has data files
    p = manifest.producer
    distribution: list[dict[str, Any]] = []
    record_sets: list[dict[str, Any]] = []
    for split, files in split_files(manifest).items():
        for f in files:
            distribution.append({
                "@type": "cr:FileObject", "@id": f.path, "name": PurePosixPath(f.path).name,
                "description": f"{f.rows} rows of the {split} split", "contentUrl": f.path,
                "contentSize": f"{f.bytes} B", "encodingFormat": PARQUET_MIME, "sha256": f.sha256,
            })  # fmt: skip
        file_set = f"{quote(split, safe='')}-files"
        distribution.append({
            "@type": "cr:FileSet", "@id": file_set, "name": file_set,
            "description": f"The Parquet files of the {split} split", "encodingFormat": PARQUET_MIME,
            "includes": [f.path for f in files],
        })  # fmt: skip
        split_id = quote(split, safe="")
        record_set: dict[str, Any] = {
            "@type": "cr:RecordSet", "@id": split_id, "name": split,
            "description": f"The {split} split: {sum(f.rows or 0 for f in files)} rows",
            "field": [_croissant_field(f"{split_id}/{quote(c.name, safe='')}", c.name, c.type, file_set,
                                       c.name, []) for c in schema],
        }  # fmt: skip
        if "id" in schema.names:
            record_set["key"] = {"@id": f"{split_id}/id"}
        record_sets.append(record_set)
    doc: dict[str, Any] = {
        "@context": CROISSANT_CONTEXT,
        "@type": "sc:Dataset",
        "conformsTo": CROISSANT_1_0,
        "name": manifest.name,
        "description": describe(manifest),
        # Croissant asks for MAJOR.MINOR.PATCH; the build metadata names the exact content.
        "version": f"1.0.0+{manifest.id[:12]}",
        "identifier": manifest.id,
        "datePublished": p.finished_at.isoformat(),
        "dateCreated": p.started_at.isoformat(),
        "keywords": ["distillery", p.stage],
    }
    if license:
        doc["license"] = license if "://" in license else f"https://spdx.org/licenses/{license}.html"
    if url:
        doc["url"] = url
    langs = languages(manifest)
    if langs:
        doc["inLanguage"] = langs
    if manifest.parents:
        # schema.org's isBasedOn: what this work was derived from; the parents by id and reference.
        doc["isBasedOn"] = [
            {"@type": "sc:Dataset" if q.kind == "dataset" else "sc:CreativeWork", "name": q.name,
             "identifier": q.id, "description": f"{q.role}: {q.kind} {q.name}@{q.id[:12]}"}
            for q in manifest.parents
        ]  # fmt: skip
    doc["distribution"] = distribution
    doc["recordSet"] = record_sets
    return doc


# --- Hugging Face dataset card ----------------------------------------------------------------------

_SIZE_CATEGORIES = [
    (1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"),
    (10_000_000_000, "1B<n<10B"), (100_000_000_000, "10B<n<100B"), (1_000_000_000_000, "100B<n<1T"),
]  # fmt: skip


def size_category(rows: int) -> str:
    """The Hub's ``size_categories`` value for a number of rows."""
    return next((label for limit, label in _SIZE_CATEGORIES if rows < limit), "n>1T")


def hf_dtype(type_: pa.DataType) -> str:
    """The ``datasets`` Value dtype of an Arrow type (``float32`` where Arrow says ``float``)."""
    if pa.types.is_floating(type_):
        return f"float{type_.bit_width}"
    if pa.types.is_date32(type_):
        return "date32"
    if pa.types.is_date64(type_):
        return "date64"
    return str(type_)


def hf_feature(type_: pa.DataType) -> dict[str, Any]:
    """The card's YAML for one column: ``dtype``, ``struct`` (a list of named features) or ``list``
    (the element's dtype, or its struct's list), as ``datasets`` writes it."""
    if pa.types.is_dictionary(type_):
        return hf_feature(type_.value_type)
    if pa.types.is_struct(type_):
        return {"struct": [{"name": f.name, **hf_feature(f.type)} for f in type_]}
    if is_list_type(type_):
        inner = hf_feature(type_.value_type)
        element = inner.get("dtype") or inner.get("struct") or inner
        key = "large_list" if pa.types.is_large_list(type_) else "list"
        feature: dict[str, Any] = {key: element}
        if pa.types.is_fixed_size_list(type_):
            feature["length"] = type_.list_size
        return feature
    return {"dtype": hf_dtype(type_)}


def _hf_license(license: str) -> dict[str, str]:
    """The card's license keys: the Hub's ids are SPDX ids in lower case (apache-2.0, cc-by-4.0);
    a license given by URL is ``other`` with a link."""
    if "://" in license:
        return {"license": "other", "license_link": license}
    return {"license": license.lower()}


def hf_card(manifest: Manifest, license: str | None = None, store: Store | None = None) -> str:
    """A ``README.md`` for the Hub: YAML front matter (configs, features, splits, license, language,
    size) and a body saying what made the dataset, its lineage (back to the sources when ``store``
    holds the ancestors, else the direct parents), rows, ledger and how to load it."""
    require_dataset(manifest, "hf-card")
    schema = data_schema(manifest)
    assert schema is not None
    splits = split_files(manifest)
    rows = {split: sum(f.rows or 0 for f in fs) for split, fs in splits.items()}
    sizes = {split: sum(f.bytes for f in fs) for split, fs in splits.items()}
    langs = languages(manifest)
    front: dict[str, Any] = {"pretty_name": manifest.name}
    if license:
        front.update(_hf_license(license))
    if langs:
        front["language"] = langs
    front["size_categories"] = [size_category(sum(rows.values()))]
    front["tags"] = ["distillery", manifest.producer.stage]
    front["configs"] = [{
        "config_name": "default",
        "data_files": [{"split": split, "path": [f.path for f in fs]} for split, fs in splits.items()],
    }]  # fmt: skip
    front["dataset_info"] = {
        "features": [{"name": f.name, **hf_feature(f.type)} for f in schema],
        "splits": [{"name": s, "num_bytes": sizes[s], "num_examples": rows[s]} for s in splits],
        "download_size": sum(sizes.values()),
        "dataset_size": sum(sizes.values()),
    }
    yaml_text = yaml.safe_dump(front, sort_keys=False, allow_unicode=True, width=1000)
    return f"---\n{yaml_text}---\n\n{_card_body(manifest, schema, splits, rows, store)}"


def _card_body(
    manifest: Manifest,
    schema: pa.Schema,
    splits: dict[str, list[FileEntry]],
    rows: dict[str, int],
    store: Store | None,
) -> str:
    p = manifest.producer
    git = f"commit `{p.git_commit[:12]}`{' (dirty)' if p.git_dirty else ''}" if p.git_commit else "not in git"
    lines = [
        f"# {manifest.name}", "", describe(manifest), "",
        "## How it was made", "",
        f"- stage `{p.stage}`, distillery {p.package_version} ({git}), seed {p.seed}",
        f"- ran {p.started_at.isoformat()} → {p.finished_at.isoformat()}",
        f"- manifest id `{manifest.id}`" + (f", digest `{manifest.digest}`" if manifest.digest else ""),
        f"- recipe: {recipe_summary(p.recipe) or '(defaults)'}; the full resolved recipe is in the manifest "
        f"(`distillery manifests show {manifest.ref} --json`)",
        "", "## Lineage", "",
    ]  # fmt: skip
    if store is not None:
        lines += _lineage_lines(lineage(store, manifest).parents)
    else:
        lines += [f"- {q.kind} `{q.name}@{q.id[:12]}` ({q.role})" for q in manifest.parents]
    if not manifest.parents:
        lines.append("- no parents: made from its sources")
    lines += ["", "## Rows", "", "| split | files | rows |", "| --- | --- | --- |"]
    lines += [f"| {split} | {len(fs)} | {rows[split]} |" for split, fs in splits.items()]
    funnel = manifest.stats.get("funnel") or []
    if funnel or manifest.ledger:
        lines += ["", "## Ledger", ""]
    if funnel:
        lines += ["| step | in | out | removed |", "| --- | --- | --- | --- |"]
        for step in funnel:
            removed = ", ".join(f"{reason}: {n}" for reason, n in (step.get("removed") or {}).items())
            lines.append(f"| {step.get('step')} | {step.get('in', '')} | {step.get('out', '')} | {removed} |")
        lines.append("")
    if manifest.ledger:
        lines.append(
            "Every dropped or changed record is listed (id, step, action, reason; never its text) in:"
        )
        lines += [f"- `{f.path}`: {f.rows} entries" for f in manifest.ledger]
    lines += ["", "## Columns", "", "| column | Arrow type |", "| --- | --- |"]
    lines += [f"| {f.name} | `{f.type}` |" for f in schema]
    data_files = {split: [f.path for f in fs] for split, fs in splits.items()}
    lines += [
        "", "## Loading", "",
        "From this folder (the paths are relative to it):", "",
        "```python", "from datasets import load_dataset", "",
        f"ds = load_dataset(\"parquet\", data_files={json.dumps(data_files)})",
        "```", "",
        "or `load_dataset(\"path/to/this/folder\")`, which reads the `configs` above.", "",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def _lineage_lines(nodes: list[LineageNode], depth: int = 0) -> list[str]:
    """The parents DAG as a nested markdown list: kind, reference, role and stage of each."""
    lines = []
    for node in nodes:
        pad = "  " * depth
        m = node.manifest
        if m is None:
            lines.append(f"{pad}- {node.missing} ({node.role}): not in this store")
            continue
        seen = " (shown above)" if node.repeated else ""
        lines.append(f"{pad}- {m.kind} `{m.ref}` ({node.role}), stage `{m.producer.stage}`{seen}")
        lines += _lineage_lines(node.parents, depth + 1)
    return lines
