from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from manifests.errors import DistilleryError, VerificationError
from manifests.publish import Publisher
from manifests.store import Store
from manifests.verify import ensure_verified, verify

from .conftest import ROOT, corpus_recipe, docs, write_jsonl


def _build(cli, tmp_path, store, rows, name="c", extra=""):
    src = write_jsonl(tmp_path / f"{name}-src.jsonl", rows)
    result = cli("--store", store.root, "corpus", "build", corpus_recipe(tmp_path, src, name, extra))
    assert result.code == 0, result.err
    return store.resolve(name)


def test_same_inputs_and_recipe_give_the_same_id(cli, tmp_path, store):
    first = _build(cli, tmp_path, store, docs(20))
    other = Store(tmp_path / "other-store")
    second = _build(cli, tmp_path, other, docs(20))
    assert first.id == second.id
    assert len(store.list()) == 1


def test_one_changed_byte_gives_a_new_id(cli, tmp_path, store):
    rows = docs(20)
    first = _build(cli, tmp_path, store, rows)
    rows[7]["text"] = rows[7]["text"].replace("alpha", "alphb")
    second = _build(cli, tmp_path, store, rows)
    assert first.id != second.id
    assert store.resolve("c").id == second.id  # the name resolves to the latest version


def test_verify_names_the_altered_missing_and_extra_files(cli, tmp_path, store):
    rows = docs(20)
    m = _build(cli, tmp_path, store, rows + rows[:2])  # two duplicates → a ledger file
    assert cli("--store", store.root, "manifests", "verify", "c").code == 0
    shard = m.location / "data" / "train-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = cli("--store", store.root, "manifests", "verify", "c")
    assert result.code == 1
    assert "altered: data/train-00000.parquet" in result.err
    assert len(result.err.strip().splitlines()) == 1
    (m.location / "data" / "stray.parquet").write_bytes(b"x")
    ledger = m.location / m.ledger[0].path
    ledger.unlink()
    report = verify(m)
    assert report.extra == ["data/stray.parquet"]
    assert report.missing == [m.ledger[0].path]


def test_reading_a_tampered_dataset_fails_even_after_a_cached_verification(cli, tmp_path, store):
    m = _build(cli, tmp_path, store, docs(20))
    ensure_verified(m)  # fills the size+mtime cache
    shard = m.location / "data" / "train-00000.parquet"
    table = pq.read_table(shard)
    pq.write_table(table.slice(1), shard)  # different size and mtime
    with pytest.raises(VerificationError, match="altered: data/train-00000.parquet"):
        ensure_verified(m)


def test_a_failing_stage_leaves_nothing(store):
    with pytest.raises(RuntimeError), Publisher(store, kind="dataset", name="x", stage="t", recipe={}) as pub:
        pub.write_table(pa.table({"id": ["a"], "text": ["t"]}))
        raise RuntimeError("boom")
    assert store.list() == []
    assert not (store.root / "datasets" / "x").exists()  # not even an empty name folder


CRASH = textwrap.dedent(
    """
    import os, sys
    import pyarrow as pa
    import manifests.publish as publish
    from manifests.store import Store

    def die(*a, **k):
        os._exit(9)  # killed between writing manifest.json and the rename into place

    store = Store(sys.argv[1])
    pub = publish.Publisher(store, kind="dataset", name="x", stage="t", recipe={"v": 1})
    pub.__enter__()
    pub.write_table(pa.table({"id": ["a", "b"], "text": ["t", "u"]}))
    if sys.argv[2] == "crash":
        publish._fsync_dir = die
    print(pub.publish().id)
    """
)


def test_a_killed_publish_is_never_seen_and_a_rerun_publishes(tmp_path):
    root = tmp_path / "store"
    crashed = subprocess.run(
        [sys.executable, "-c", CRASH, str(root), "crash"], cwd=ROOT, capture_output=True, text=True
    )
    assert crashed.returncode == 9
    leftovers = list((root / "datasets" / "x").iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".tmp-")
    assert (leftovers[0] / "manifest.json").exists()  # written, but never renamed into place
    store = Store(root)
    assert store.list() == []
    with pytest.raises(DistilleryError, match="no dataset manifest named 'x'"):
        store.resolve("x", kind="dataset")
    ok = subprocess.run(
        [sys.executable, "-c", CRASH, str(root), "ok"], cwd=ROOT, capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    assert [m.id for m in store.list()] == [ok.stdout.strip()]


def test_a_publish_killed_right_after_its_rename_is_still_the_latest(store, monkeypatch):
    import manifests.publish as publish

    def publish_version(v: int) -> None:
        with Publisher(store, kind="dataset", name="x", stage="t", recipe={"v": v}) as pub:
            pub.write_table(pa.table({"id": ["a"], "text": [f"t{v}"]}))
            pub.publish()

    publish_version(1)
    real = os.replace

    def rename_then_die(src, dst):
        real(src, dst)
        if Path(src).name.startswith(".tmp-"):
            raise SystemExit(9)  # killed between the rename and whatever followed it

    monkeypatch.setattr(publish.os, "replace", rename_then_die)
    with pytest.raises(SystemExit):
        publish_version(2)
    monkeypatch.undo()
    versions = store.list(kind="dataset", name="x")
    assert [m.producer.recipe["v"] for m in versions] == [1, 2]
    assert store.resolve("x").producer.recipe["v"] == 2


def test_clean_removes_what_unfinished_jobs_left_but_not_recent_work(store, cli):
    with Publisher(store, kind="dataset", name="x", stage="t", recipe={}) as pub:
        pub.write_table(pa.table({"id": ["a"], "text": ["t"]}))
        published = pub.publish()
    old, recent = store.root / "runs" / "r" / ".work-aaaa", store.root / "datasets" / "x" / ".work-bbbb"
    for folder in (old, recent):
        (folder / "step-000002").mkdir(parents=True)
        (folder / "step-000002" / "trainer.pt").write_bytes(b"0" * 2048)
    hours_ago = time.time() - 3 * 3600
    for path in [old, *old.rglob("*")]:
        os.utime(path, (hours_ago, hours_ago))
    dry = cli("--store", store.root, "manifests", "clean", "--dry-run")
    assert dry.code == 0 and "would remove" in dry.out and "runs/r/.work-aaaa" in dry.out and old.is_dir()
    result = cli("--store", store.root, "manifests", "clean")
    assert result.code == 0, result.err
    assert not old.exists() and recent.is_dir()  # changed within the hour: its job may be running
    assert "freed 2.0 KiB" in result.out
    assert store.resolve("x").id == published.id and (published.location / "manifest.json").is_file()
    # A publish in progress (its process alive) is kept however long it has been quiet.
    with Publisher(store, kind="dataset", name="y", stage="t", recipe={}) as pub:
        pub.write_table(pa.table({"id": ["a"], "text": ["t"]}))
        for path in [pub.dir, *pub.dir.rglob("*")]:
            os.utime(path, (hours_ago, hours_ago))
        result = cli("--store", store.root, "manifests", "clean")
        assert result.code == 0 and "kept: its process is running" in result.out and pub.dir.is_dir()
        assert pub.publish().name == "y"


def test_publishing_identical_content_twice_keeps_one_version(store):
    ids = []
    for _ in range(2):
        with Publisher(store, kind="dataset", name="x", stage="t", recipe={"v": 1}) as pub:
            pub.write_table(pa.table({"id": ["a"], "text": ["t"]}))
            ids.append(pub.publish().id)
    assert ids[0] == ids[1]
    assert len(store.list()) == 1


def _fake(store: Store, name: str, id_: str, created: str) -> None:
    folder = store.root / "datasets" / name / id_
    folder.mkdir(parents=True)
    manifest = {
        "id": id_, "name": name, "kind": "dataset", "created_at": created,
        "producer": {"stage": "t", "recipe": {}, "package_version": "0", "started_at": created, "finished_at": created},
    }  # fmt: skip
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_references_latest_pinned_ambiguous_missing_and_path(store, cli):
    _fake(store, "web", "abc1" + "0" * 60, "2026-01-01T00:00:00Z")
    _fake(store, "web", "abc2" + "0" * 60, "2026-02-01T00:00:00Z")
    _fake(store, "notes", "ffff" + "0" * 60, "2026-01-01T00:00:00Z")
    assert store.resolve("web").id.startswith("abc2")
    assert store.resolve("web@abc1").id.startswith("abc1")
    with pytest.raises(DistilleryError, match=r"ambiguous: 2 versions match \(abc1.*abc2"):
        store.resolve("web@abc")
    with pytest.raises(DistilleryError, match="no version of 'web' has an id starting with 'dd'"):
        store.resolve("web@dd")
    with pytest.raises(DistilleryError, match="did you mean 'web'"):
        store.resolve("wbe")
    path = store.root / "datasets" / "notes" / ("ffff" + "0" * 60)
    assert store.resolve(str(path)).name == "notes"
    result = cli("--store", store.root, "manifests", "show", "web@abc")
    assert result.code == 2 and result.err.startswith("error: ") and "Traceback" not in result.err


def test_a_secret_in_a_recipe_never_reaches_a_manifest(store):
    with pytest.raises(
        DistilleryError, match=r"'teacher.api_key' holds a secret; name its environment variable"
    ):
        Publisher(store, kind="dataset", name="x", stage="t", recipe={"teacher": {"api_key": "sk-123"}})
    Publisher(
        store,
        kind="dataset",
        name="x",
        stage="t",
        recipe={"teacher": {"api_key_env": "OPENAI_API_KEY", "max_tokens": 5}},
    )


def test_a_failed_publish_of_a_new_name_leaves_no_name_folder(store):
    # Any stage, not only a corpus build: a job that fails before its first version leaves nothing.
    with pytest.raises(DistilleryError), Publisher(store, kind="run", name="never", stage="t", recipe={}):
        raise DistilleryError("the job failed")
    assert not store.name_dir("run", "never").exists()
    with Publisher(store, kind="run", name="kept", stage="t", recipe={"a": 1}) as pub:
        (pub.dir / "x.txt").write_text("x")
        first = pub.publish()
    with (
        pytest.raises(DistilleryError),
        Publisher(store, kind="run", name="kept", stage="t", recipe={"a": 2}),
    ):
        raise DistilleryError("the second job failed")
    assert [m.id for m in store.list(kind="run", name="kept")] == [first.id]
