"""A manifest protects itself: hand edits are caught; references, recipes, overrides, diffs, clean."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pytest

from manifests.errors import DistilleryError, VerificationError
from manifests.overrides import apply_overrides
from manifests.publish import Publisher
from manifests.recipes import read_recipe
from manifests.store import OWNER_PREFIX, Store, claim_work_folder, folder_owner_running
from manifests.verify import ensure_verified, verify

from .conftest import ROOT, assert_one_line_error, docs, write_jsonl, write_recipe


def _recipe(tmp_path: Path, src: Path) -> Path:
    return write_recipe(
        tmp_path / "r.yaml",
        f"stage: corpus.build\nname: c\ninputs: [{{path: {src}}}]\n"
        "steps: [{type: min_words, min_words: 1}]\n",
    )


def _publish(store: Store, name: str = "d", parents=None, texts=("a b c", "d e f"), stats=None):
    with Publisher(store, kind="dataset", name=name, stage="test", recipe={"texts": list(texts)},
                   parents=parents, seed=0) as pub:  # fmt: skip
        pub.write_table(pa.table({"id": [f"r{i}" for i in range(len(texts))], "text": list(texts)}))
        pub.write_ledger([{"id": "gone", "step": "s", "action": "drop", "reason": "r"}], step="s")
        return pub.publish(stats=stats or {"rows_out": len(texts), "ratio": 0.5})


def _edit(manifest, change) -> None:
    path = manifest.location / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def change(data):
        target = data
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value

    return change


EDITS = {
    "rows": _set("files", 0, "rows", 999),
    "ledger rows": _set("ledger", 0, "rows", 0),
    "bytes": _set("files", 0, "bytes", 1),
    "stats": _set("stats", "rows_out", 5),
    "new stat": _set("stats", "quality", "excellent"),
    "producer stage": _set("producer", "stage", "corpus.build"),
    "producer seed": _set("producer", "seed", 7),
    "producer version": _set("producer", "package_version", "9.9.9"),
    "started_at": _set("producer", "started_at", "2020-01-01T00:00:00Z"),
    "created_at": _set("created_at", "2020-01-01T00:00:00Z"),
    "parent name": _set("parents", 0, "name", "other"),
    "parent role": _set("parents", 0, "role", "model"),
    "name": _set("name", "renamed"),
    "kind": _set("kind", "run"),
    "split": _set("files", 0, "split", "test"),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_a_hand_edited_manifest_field_is_altered(cli, store, edit):
    parent = _publish(store, "p")
    m = _publish(store, "d", parents=[parent])
    assert cli("--store", store.root, "manifests", "verify", "d").code == 0
    _edit(m, EDITS[edit])
    result = cli("--store", store.root, "manifests", "verify", f"d@{m.id[:12]}")
    assert_one_line_error(result, code=1)
    assert "altered: manifest.json" in result.err
    edited = store.get(m.id)
    with pytest.raises(VerificationError, match="altered: manifest.json"):
        ensure_verified(edited)  # what every stage calls before reading an input


def test_show_of_an_edited_manifest_shows_it_but_fails(cli, store):
    m = _publish(store)
    _edit(m, EDITS["stats"])
    result = cli("--store", store.root, "manifests", "show", "d")
    assert '"rows_out": 5' in result.out
    assert_one_line_error(result, code=1)
    assert "edited after it was published" in result.err


def test_the_digest_ignores_how_the_json_is_laid_out(cli, store):
    m = _publish(store)
    path = m.location / "manifest.json"
    text = path.read_text()
    assert '"digest": ' in text
    data = json.loads(text)
    started = data["producer"]["started_at"]
    assert started.endswith("Z")
    data["producer"]["started_at"] = started[:-1] + "+00:00"  # the same instant, written another way
    path.write_text(json.dumps(data, sort_keys=True))
    result = cli("--store", store.root, "manifests", "verify", "d")
    assert result.code == 0, result.err
    assert "manifest intact" in result.out


def test_the_digest_is_not_part_of_the_id(tmp_path):
    first = _publish(Store(tmp_path / "a"))
    time.sleep(0.01)
    second = _publish(Store(tmp_path / "b"))
    assert first.id == second.id
    assert first.digest != second.digest  # (their timings differ)


def _unseal(m) -> None:
    """Make ``m`` look like a manifest written before the digest existed."""
    _edit(m, lambda data: data.pop("digest"))


def test_an_old_manifest_without_digest_loads_verifies_with_a_warning_and_a_rerun_seals_it(cli, store):
    m = _publish(store)
    _unseal(m)
    result = cli("--store", store.root, "manifests", "verify", "d")
    assert result.code == 0
    assert "warning:" in result.err and "no integrity digest" in result.err and "re-run" in result.err
    ensure_verified(store.resolve("d"))  # stages still read it
    _edit(m, EDITS["rows"])  # rows are checked against the Parquet footers even so
    assert "altered: manifest.json" in cli("--store", store.root, "manifests", "verify", "d").err
    _edit(m, _set("files", 0, "rows", 2))
    again = _publish(store)  # the same content and recipe: the same id, now sealed
    assert again.id == m.id and again.digest is not None
    result = cli("--store", store.root, "manifests", "verify", "d")
    assert result.code == 0 and "warning" not in result.err


def test_rerunning_over_a_tampered_version_replaces_it(cli, store):
    m = _publish(store)
    _edit(m, EDITS["stats"])
    again = _publish(store)
    assert again.id == m.id and again.stats["rows_out"] == 2
    assert cli("--store", store.root, "manifests", "verify", "d").code == 0
    assert not [p for p in (store.root / "datasets" / "d").iterdir() if p.name.startswith(".tmp-")]


# --- references and damaged manifests ----------------------------------------------------------


def test_an_empty_pin_is_refused(cli, store):
    _publish(store)
    result = cli("--store", store.root, "manifests", "show", "d@")
    assert_one_line_error(result)
    assert "no id prefix after '@'" in result.err


def test_a_damaged_sole_manifest_says_what_is_wrong_not_its_own_name(cli, store):
    m = _publish(store)
    (m.location / "manifest.json").write_text("garbage\n")
    result = cli("--store", store.root, "manifests", "show", "d")
    assert_one_line_error(result)
    assert "did you mean" not in result.err
    assert "damaged, not JSON" in result.err and "re-run the recipe" in result.err
    assert _publish(store).id == m.id  # re-running replaces the damaged version
    assert cli("--store", store.root, "manifests", "verify", "d").code == 0


def test_a_damaged_latest_version_is_not_replaced_by_an_older_one(cli, store):
    old = _publish(store, texts=("a b c",))
    new = _publish(store, texts=("x y z",))
    (new.location / "manifest.json").write_text("[]")
    result = cli("--store", store.root, "manifests", "show", "d")
    assert_one_line_error(result)
    assert new.id in result.err and "not a valid manifest" in result.err
    assert cli("--store", store.root, "manifests", "show", f"d@{old.id[:8]}").code == 0
    assert_one_line_error(cli("--store", store.root, "manifests", "show", f"d@{new.id[:8]}"))


def test_a_name_of_another_kind_says_so(store):
    _publish(store)
    with pytest.raises(DistilleryError, match="'d' is a dataset, and a run is needed"):
        store.resolve("d", kind="run")


# --- recipes and --set --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        ("stage: corpus.build\nname: a\nname: b\n", "key 'name' is given twice (lines 2 and 3)"),
        ("stage: corpus.build\nsteps:\n  - type: min_words\n    min_words: 3\n    min_words: 4\n",
         "key 'min_words' is given twice (lines 4 and 5)"),
        ("stage: corpus.build\nsteps: [{type: min_words, min_words: 3, min_words: 4}]\n",
         "key 'min_words' is given twice (both on line 2)"),
    ],
)  # fmt: skip
def test_a_duplicate_key_in_a_recipe_is_refused(cli, tmp_path, store, text, message):
    recipe = write_recipe(tmp_path / "r.yaml", text)
    result = cli("--store", store.root, "run", recipe)
    assert_one_line_error(result)
    assert message in result.err


def test_a_yaml_merge_key_may_be_overridden(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", "stage: x\nbase: &b {a: 1, b: 2}\nmine:\n  <<: *b\n  a: 3\n")
    assert read_recipe(recipe)["mine"] == {"a": 3, "b": 2}


def test_a_folder_given_as_recipe_says_it_is_a_folder(cli, store):
    result = cli("--store", store.root, "run", ROOT / "examples" / "recipes")
    assert_one_line_error(result)
    assert "is a folder; give a recipe file" in result.err


def test_set_indexes_into_lists():
    data = {"steps": [{"type": "min_words", "min_words": 1}, {"type": "x"}], "name": "n"}
    apply_overrides(data, ["steps.0.min_words=3", "steps.1={type: y}"])
    assert data["steps"] == [{"type": "min_words", "min_words": 3}, {"type": "y"}]
    with pytest.raises(
        DistilleryError, match=r"'steps' has 2 item\(s\), so index 5 is out of range \(0 to 1\)"
    ):
        apply_overrides(data, ["steps.5.min_words=3"])
    with pytest.raises(DistilleryError, match="'steps' is a list; give an item's index"):
        apply_overrides(data, ["steps.first.min_words=3"])
    with pytest.raises(DistilleryError, match="'name' is str 'n', which has no key 'x'"):
        apply_overrides(data, ["name.x=3"])


def test_set_with_a_list_index_runs_the_recipe(cli, tmp_path, store):
    src = write_jsonl(tmp_path / "in.jsonl", docs(3) + [{"text": "one two three"}])
    recipe = _recipe(tmp_path, src)
    result = cli("--store", store.root, "run", recipe, "--set", "steps.0.min_words=5")
    assert result.code == 0, result.err
    assert store.resolve("c").producer.recipe["steps"][0]["min_words"] == 5
    assert sum(f.rows for f in store.resolve("c").data_files()) == 3


# --- diff by content ------------------------------------------------------------------------------


def _diff(cli, store, old, new):
    result = cli("--store", store.root, "manifests", "diff", old.ref, new.ref)
    assert result.code == 0, result.err
    return result.out


def _build(cli, tmp_path, store, src: Path, rows):
    write_jsonl(src, rows)
    recipe = _recipe(tmp_path, src)
    assert cli("--store", store.root, "corpus", "build", recipe).code == 0
    return store.resolve("c")


def test_diff_reports_a_moved_line_as_moves_not_new_rows(cli, tmp_path, store):
    src, rows = tmp_path / "in.jsonl", docs(30)
    old = _build(cli, tmp_path, store, src, rows)
    new = _build(cli, tmp_path, store, src, [rows[-1], *rows[:-1]])
    assert "+0 added, -0 removed, 30 kept (0 unchanged, 30 moved, 0 changed" in _diff(cli, store, old, new)


def test_diff_reports_a_url_change(cli, tmp_path, store):
    src, rows = tmp_path / "in.jsonl", docs(10)
    old = _build(cli, tmp_path, store, src, rows)
    rows[3] = {**rows[3], "url": "https://elsewhere.example/"}
    out = _diff(cli, store, old, _build(cli, tmp_path, store, src, rows))
    assert "+0 added, -0 removed, 10 kept (9 unchanged, 0 moved, 1 changed" in out
    assert "changed: source.url (1)" in out


def test_diff_reports_an_added_line(cli, tmp_path, store):
    src, rows = tmp_path / "in.jsonl", docs(10)
    old = _build(cli, tmp_path, store, src, rows)
    new = _build(cli, tmp_path, store, src, rows[:5] + docs(1, offset=50) + rows[5:])
    assert "+1 added, -0 removed, 10 kept (5 unchanged, 5 moved, 0 changed" in _diff(cli, store, old, new)


def test_diff_of_a_tampered_dataset_fails(cli, store):
    old, new = _publish(store), _publish(store, texts=("x y z",))
    _edit(new, EDITS["stats"])
    assert_one_line_error(cli("--store", store.root, "manifests", "diff", old.ref, new.ref), code=1)


# --- output of odd data ----------------------------------------------------------------------------


def test_trace_and_show_print_data_that_looks_like_markup(cli, tmp_path, store):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "one two [/] three [bold]", "url": "https://x/[red]"}])
    recipe = _recipe(tmp_path, src)
    assert cli("--store", store.root, "corpus", "build", recipe).code == 0
    record = store.resolve("c")
    from manifests.data import read_table

    record_id = read_table(record).column("id")[0].as_py()
    result = cli("--store", store.root, "manifests", "trace", record_id)
    assert result.code == 0, result.err
    assert "text: one two [/] three [bold]" in result.out and "url https://x/[red]" in result.out
    assert "[train]" in cli("--store", store.root, "manifests", "show", "c").out


# --- unfinished jobs: owners ------------------------------------------------------------------------


def test_clean_removes_a_killed_jobs_folder_at_once_and_keeps_a_running_ones(cli, tmp_path, store):
    base = store.root / "datasets" / "c"
    dead, alive = base / ".work-dead", base / ".tmp-somehost-1-abc"
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from manifests.store import claim_work_folder
        claim_work_folder(Path({str(dead)!r}))
        print("claimed", flush=True)
        time.sleep(120)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "claimed"
        assert folder_owner_running(dead) is True
    finally:
        child.kill()
        child.wait()
    assert folder_owner_running(dead) is False
    claim_work_folder(alive)
    assert folder_owner_running(alive) is True
    unknown = base / ".work-unknown"
    unknown.mkdir()  # no owner recorded (made by an older version): the idle rule decides
    assert folder_owner_running(unknown) is None

    result = cli("--store", store.root, "manifests", "clean", "--dry-run")
    assert "would remove (its process is gone)" in result.out
    assert dead.is_dir()
    result = cli("--store", store.root, "manifests", "clean")
    assert not dead.exists()
    assert alive.is_dir() and "kept: its process is running" in result.out
    assert unknown.is_dir() and "changed recently" in result.out


def test_a_reused_pid_is_not_taken_for_the_owner(tmp_path):
    folder = claim_work_folder(tmp_path / ".work-x")
    (owner,) = folder.glob(f"{OWNER_PREFIX}*.json")
    record = json.loads(owner.read_text())
    assert record["pid"] == os.getpid() and record["start"]
    record["start"] = str(int(record["start"]) + 1)  # this pid, but another process
    owner.write_text(json.dumps(record))
    assert folder_owner_running(folder) is False
    record["host"] = "another-host"
    owner.write_text(json.dumps(record))
    assert folder_owner_running(folder) is None


def test_a_published_artefact_holds_no_owner_record(store):
    m = _publish(store)
    assert not list(m.location.glob(f"{OWNER_PREFIX}*"))
    assert verify(m).ok
