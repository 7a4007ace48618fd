from __future__ import annotations

from datetime import datetime, timezone

import pytest
from pydantic import ValidationError

from manifests.hashing import manifest_id
from manifests.schema import FileEntry, Manifest, ParentRef, Producer


def _manifest(**over) -> Manifest:
    now = datetime(2026, 11, 29, tzinfo=timezone.utc)
    fields = dict(
        id="ab" * 32, name="d", kind="dataset", created_at=now,
        parents=[ParentRef(id="cd" * 32, name="p", kind="dataset")],
        producer=Producer(stage="corpus.build", recipe={"name": "d", "api_key_env": "OPENAI_API_KEY"},
                          package_version="0.1.0", seed=3, started_at=now, finished_at=now),
        files=[FileEntry(path="data/train-00000.parquet", sha256="ef" * 32, bytes=10, rows=2, split="train")],
        stats={"rows_out": 2},
    )  # fmt: skip
    fields.update(over)
    return Manifest(**fields)


def test_round_trip_is_lossless():
    m = _manifest()
    again = Manifest.model_validate_json(m.to_json())
    assert again == m
    assert again.data_files("train")[0].rows == 2
    assert again.splits() == ["train"]


def test_unknown_field_is_rejected():
    data = _manifest().model_dump(mode="json")
    data["surprise"] = 1
    with pytest.raises(ValidationError):
        Manifest.model_validate(data)


def test_kind_is_checked():
    with pytest.raises(ValidationError):
        _manifest(kind="model")


def test_id_depends_on_content_not_order():
    base = dict(
        kind="dataset", arrow_schema="id: string", parent_ids=["p1", "p2"], recipe={"a": 1}, schema_version=1
    )
    a = manifest_id(files=[("x", "1"), ("y", "2")], **base)
    b = manifest_id(files=[("y", "2"), ("x", "1")], **base)
    c = manifest_id(files=[("x", "1"), ("y", "3")], **base)
    d = manifest_id(files=[("x", "1"), ("y", "2")], **(base | {"recipe": {"a": 2}}))
    e = manifest_id(files=[("x", "1"), ("y", "2")], **(base | {"parent_ids": ["p1"]}))
    assert a == b
    assert len({a, c, d, e}) == 4


def test_splits_meet_their_shares_and_do_not_depend_on_order():
    from manifests.records import assign_splits

    keys = [f"k{i}" for i in range(10)]
    splits = assign_splits(keys, {"train": 0.8, "test": 0.2})
    assert splits.count("train") == 8 and splits.count("test") == 2
    reordered = assign_splits(keys[::-1], {"train": 0.8, "test": 0.2})
    assert dict(zip(keys[::-1], reordered, strict=True)) == dict(zip(keys, splits, strict=True))
    few = assign_splits(keys[:3], {"train": 0.95, "test": 0.05})
    assert few.count("test") == 1
