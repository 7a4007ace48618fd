"""The whole-dataset readers that polars runs (``manifests.scan``): a dataset report's measures and
``manifests diff`` give the numbers a direct pure-Python computation gives, row by row, on datasets
of several shards with nulls, repeated content and a column whose type or presence changed."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from manifests.data import read_shard
from manifests.errors import DistilleryError
from manifests.hashing import canonical_json
from manifests.lineage import CONTENT_COLUMNS, diff
from manifests.publish import Publisher
from manifests.records import SOURCE_TYPE
from manifests.report import _WHITESPACE, summarise_dataset
from manifests.scan import scan_rows
from manifests.store import Store

from .test_shard_checksums import _rot_silently

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
PII = pa.struct([("URL", pa.int64()), ("EMAIL", pa.int64())])


def _rows(seed: int, n: int = 240) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 9)))
        # Whitespace that Arrow's split counts in its own way: leading, trailing, runs of two at the end.
        text = [text, f"  {text}", f"{text} \u00a0", f"{text}\t\n", "same text"][i % 5 if i % 3 else 0]
        rows.append({
            "id": f"r{i}", "text": text, "line": i, "url": f"u{i}", "language": rng.choice(["en", "de", None]),
            "score": None if i % 4 == 0 else rng.random(), "count": None if i % 6 == 0 else rng.randint(-5, 50),
            "small": rng.randint(0, 3), "pii": None if i % 3 == 0 else {"URL": rng.randint(0, 2), "EMAIL": rng.randint(0, 1)},
        })  # fmt: skip
    return rows


def _changed(rows: list[dict]) -> list[dict]:
    """The next version: rows dropped, texts edited, urls and lines changed, a row repeated, reordered."""
    rng = random.Random(1)
    out = []
    for row in rows:
        row, x = dict(row), rng.random()
        if x < 0.05:
            continue
        if x < 0.10:
            row["text"] += " new"
        elif x < 0.15:
            row["url"] = "elsewhere"
        elif x < 0.20:
            row["line"] += 1
        elif x < 0.25:
            row["score"] = (row["score"] or 0) * 10
        elif x < 0.30:
            out.append(dict(row, id=row["id"] + "b", line=row["line"] + 1000))
        row["extra"] = rng.random() if x < 0.6 else None
        out.append(row)
    return out[len(out) // 3 :] + out[: len(out) // 3]


def _publish(
    store: Store, name: str, rows: list[dict], shards: int, small=None, pii_json=False, encoded=False
):
    with Publisher(store, kind="dataset", name=name, stage="test", recipe={"rows": len(rows)}, seed=0) as pub:
        per = -(-len(rows) // shards)
        for start in range(0, len(rows), per):
            part = rows[start : start + per]
            columns = {
                "id": [r["id"] for r in part],
                "parents": pa.array([[] for _ in part], pa.list_(pa.string())),
                "text": [r["text"] for r in part],
                "source": pa.array([{"uri": "in.jsonl", "line": r["line"], "url": r["url"]} for r in part], SOURCE_TYPE),
                "language": pa.array([r["language"] for r in part], pa.dictionary(pa.int32(), pa.string()))
                if encoded
                else [r["language"] for r in part],
                "score": pa.array([r["score"] for r in part], pa.float64()),
                "count": pa.array([r["count"] for r in part], pa.int64()),
                "small": pa.array([r["small"] for r in part], small or pa.int32()),
                "pii_counts": pa.array([json.dumps(r["pii"]) if r["pii"] else None for r in part])
                if pii_json else pa.array([r["pii"] for r in part], PII),
            }  # fmt: skip
            if any("extra" in r for r in rows):
                columns["extra"] = pa.array([r.get("extra") for r in part], pa.float64())
            pub.write_table(pa.table(columns))
        return pub.publish(stats={"rows_out": len(rows)})


# --- the pure-Python computations the polars queries replace ---------------------------------------


def _histogram(values: list, bins: int = 30) -> dict:
    if not values:
        return {"count": 0}
    lo, hi = min(values), max(values)
    width = (hi - lo) / bins or 1.0
    counts = [0] * bins
    for v in values:
        counts[min(int((v - lo) / width), bins - 1)] += 1
    ordered = sorted(values)
    mid = len(ordered) // 2
    median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    return {"count": len(values), "min": lo, "max": hi, "mean": sum(values) / len(values), "median": median,
            "bin_edges": [lo + i * width for i in range(bins + 1)], "counts": counts}  # fmt: skip


def _python_measures(manifest) -> dict:
    languages, pii, chars, words, scores = Counter(), Counter(), [], [], {}
    for f in manifest.data_files():
        table = read_shard(manifest.location / f.path)
        chars += pc.utf8_length(table.column("text")).to_pylist()
        words += pc.list_value_length(pc.utf8_split_whitespace(table.column("text"))).to_pylist()
        languages.update(table.column("language").to_pylist())
        for field in table.schema:
            if pa.types.is_floating(field.type) or pa.types.is_integer(field.type):
                scores.setdefault(field.name, []).extend(
                    v for v in table.column(field.name).to_pylist() if v is not None
                )
        for counts in table.column("pii_counts").to_pylist():
            pii.update(json.loads(counts) if isinstance(counts, str) else (counts or {}))
    return {"languages": dict(languages.most_common()), "length_chars": _histogram(chars),
            "length_words": _histogram(words), "scores": {k: _histogram(v) for k, v in sorted(scores.items())},
            "pii": dict(pii.most_common())}  # fmt: skip


def _python_keys(manifest, content: list[str], meta: list[str]):
    def digest(value, size: int) -> bytes:
        data = value.encode() if isinstance(value, str) else canonical_json(value).encode()
        return hashlib.blake2b(data, digest_size=size).digest()

    for f in manifest.data_files():
        for row in read_shard(manifest.location / f.path).to_pylist():
            source = row.get("source") or {}
            flat = {**row, **{f"source.{k}": v for k, v in source.items()}}
            yield (row.get("id"), digest([row.get(c) for c in content], 16),
                   [digest(flat.get(m), 4) for m in meta], digest([source.get(p) for p in ("line", "row", "offset")], 8))  # fmt: skip


def _python_diff(old, new, content: list[str], meta: list[str]) -> dict:
    pool: dict = {}
    for id_, c, m, p in _python_keys(old, content, meta):
        pool.setdefault(c, []).append((id_, m, p))
    total_old = sum(len(v) for v in pool.values())
    added = kept = moved = changed = 0
    fields: Counter = Counter()
    examples = []
    for id_, c, m, p in _python_keys(new, content, meta):
        candidates = pool.get(c)
        if not candidates:
            added += 1
            continue
        pick = next((i for i, (_, om, op) in enumerate(candidates) if om == m and op == p), None)
        if pick is None:
            pick = next((i for i, (_, om, _) in enumerate(candidates) if om == m), 0)
        old_id, om, op = candidates.pop(pick)
        kept += 1
        if om != m:
            changed += 1
            differ = [meta[i] for i in range(len(meta)) if om[i] != m[i]]
            fields.update(differ)
            if len(examples) < 3:
                examples.append((old_id, id_, differ))
        elif op != p:
            moved += 1
    return {"added": added, "removed": total_old - kept, "kept": kept, "moved": moved, "changed": changed,
            "changed_fields": dict(fields), "examples": examples}  # fmt: skip


# --- the tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("pii_json", [False, True])
def test_report_measures_match_a_python_computation(store, pii_json):
    manifest = _publish(store, "d", _rows(0), shards=4, pii_json=pii_json, encoded=pii_json)
    summary = summarise_dataset(manifest)
    expected = _python_measures(manifest)
    assert (
        expected["languages"].get(None) and expected["scores"]["count"]["count"] < manifest.stats["rows_out"]
    )
    for key, value in expected.items():
        assert summary[key] == value, key


def test_report_of_a_dataset_without_text_or_rows(store):
    with Publisher(store, kind="dataset", name="n", stage="test", recipe={}, seed=0) as pub:
        pub.write_table(pa.table({"id": ["a", "b"], "score": pa.array([None, None], pa.float64())}))
        manifest = pub.publish(stats={"pii": {"EMAIL": 2}})
    summary = summarise_dataset(manifest)
    assert summary["scores"] == {"score": {"count": 0}} and summary["length_chars"] == {"count": 0}
    assert summary["pii"] == {"EMAIL": 2} and summary["languages"] == {}


def test_the_whitespace_class_is_what_python_and_arrow_split_on():
    every = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    found = pl.Series(every).str.contains(_WHITESPACE).to_list()
    assert [c for c, hit in zip(every, found, strict=True) if hit != c.isspace()] == []


@pytest.mark.parametrize("swap", [False, True])
def test_diff_matches_a_python_computation(store, swap):
    rows = _rows(0)
    old = _publish(store, "d", rows, shards=4)
    # int32 → int64, a string column dictionary-encoded: compared by value, as Python compares them.
    new = _publish(store, "d", _changed(rows), shards=3, small=pa.int64(), encoded=True)
    if swap:
        old, new = new, old
    d = diff(old, new)
    assert d.content == ["text"]
    # Metadata: every other column and source field, in schema order (old's first), as diff compares them.
    fields = []
    for manifest in (old, new):
        for f in read_shard(manifest.location / manifest.data_files()[0].path).schema:
            fields += [f"source.{s.name}" for s in f.type] if f.name == "source" else [f.name]
    skip = {"id", "parents", "text", "source.line", "source.row", "source.offset", "source.sha256"}
    expected = _python_diff(old, new, d.content, [f for f in dict.fromkeys(fields) if f not in skip])
    assert expected["moved"] and expected["changed"] and expected["added"] and expected["removed"]
    got = {"added": d.added, "removed": d.removed, "kept": d.kept, "moved": d.moved, "changed": d.changed,
           "changed_fields": d.changed_fields, "examples": d.examples}  # fmt: skip
    assert got["changed_fields"].keys() == expected["changed_fields"].keys()
    assert got == expected


def test_diff_compares_every_column_of_tables_without_a_content_column(store):
    def publish(values):
        with Publisher(store, kind="dataset", name="t", stage="test", recipe={"v": values}, seed=0) as pub:
            pub.write_table(
                pa.table({"id": [f"x{i}" for i in range(len(values))], "a": values, "b": [1] * len(values)})
            )
            return pub.publish()

    old, new = publish([1, 2, 2, 3, None]), publish([2, 1, None, 4, 2])
    d = diff(old, new)
    assert not set(d.content) & set(CONTENT_COLUMNS) and d.content == ["a", "b"]
    assert (d.added, d.removed, d.kept) == tuple(
        _python_diff(old, new, d.content, [])[k] for k in ("added", "removed", "kept")
    )


def test_a_scan_reads_only_the_columns_and_rows_a_query_needs(store):
    manifest = _publish(store, "d", _rows(0), shards=4)
    rows = scan_rows(manifest)
    first = rows.filter(pl.col("count") > 40).select("id").head(3).collect(engine="streaming")
    expected = [r["id"] for r in _rows(0) if r["count"] is not None and r["count"] > 40][:3]
    assert first["id"].to_list() == expected


def test_a_diff_of_a_rotted_shard_names_the_file(store):
    manifest = _publish(store, "d", _rows(0), shards=2)
    other = _publish(store, "e", _rows(1), shards=2)
    from manifests.verify import ensure_verified

    ensure_verified(manifest)  # the verification cache now trusts the shards' sizes and times
    shard = manifest.location / manifest.data_files()[0].path
    _rot_silently(shard, "text")
    with pytest.raises(DistilleryError, match=f"{shard.name}.*checksum"):
        diff(manifest, other)
    with pytest.raises(DistilleryError, match=shard.name):
        summarise_dataset(manifest)


def test_a_report_page_draws_rows_without_a_language(store):
    from manifests.report import render_html, summarise

    manifest = _publish(store, "d", _rows(0), shards=2)
    summary = summarise(manifest)
    assert None in summary["languages"]  # JSON: "null", as before
    assert render_html(summary).count("data:image/png;base64,") >= 3  # matplotlib took no None label
