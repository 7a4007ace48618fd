"""What a corpus build costs before its first document: input files are hashed once and remembered
in the store while they are unchanged (``FileHashes``), a large JSONL file's line ends likewise, and
starting a build imports no model library."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import corpus.sources
import manifests.hashing
from manifests.hashing import FileHashes

from .conftest import ROOT, corpus_recipe, docs, write_jsonl


@pytest.fixture
def hashed(monkeypatch) -> list[Path]:
    """The files read and hashed outside the store (its own shards are hashed when published)."""
    calls: list[Path] = []
    original = manifests.hashing.sha256_file

    def counting(path):
        if "store" not in Path(path).parts:
            calls.append(Path(path))
        return original(path)

    monkeypatch.setattr(manifests.hashing, "sha256_file", counting)
    # Files written by the test are seconds old: remember them (the guard is tested on its own below).
    monkeypatch.setattr(manifests.hashing, "RACY_SECONDS", 0.0)
    return calls


def _build(cli, store, recipe: Path) -> str:
    result = cli("--store", store.root, "corpus", "build", recipe)
    assert result.code == 0, result.err
    return store.resolve("c").id


def _set_mtime(path: Path, seconds_later: int) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds_later * 1_000_000_000))


def test_an_unchanged_input_is_hashed_once_and_a_changed_one_again(cli, store, tmp_path, hashed):
    src = write_jsonl(tmp_path / "in.jsonl", docs(40))
    recipe = corpus_recipe(tmp_path, src)
    first = _build(cli, store, recipe)
    assert hashed == [src.resolve()]
    assert _build(cli, store, recipe) == first and hashed == [src.resolve()]  # the rerun read nothing

    # The same size, another byte and a new mtime: hashed again, and a new dataset.
    text = src.read_text()
    src.write_text(text.replace("doc1", "doc0", 1))
    assert src.stat().st_size == len(text.encode())
    _set_mtime(src, 5)
    second = _build(cli, store, recipe)
    assert len(hashed) == 2 and second != first

    # Another size: hashed again, another dataset.
    write_jsonl(src, docs(41))
    third = _build(cli, store, recipe)
    assert len(hashed) == 3 and third not in (first, second)

    # Only touched: hashed again (its time changed), the same dataset.
    _set_mtime(src, 10)
    assert _build(cli, store, recipe) == third and len(hashed) == 4


def test_a_file_replaced_with_its_old_size_and_mtime_is_hashed_again(tmp_path, hashed):
    cache = FileHashes(tmp_path / "cache")
    src = write_jsonl(tmp_path / "in.jsonl", docs(5))
    first = cache.sha256(src)
    cache.save()
    st = src.stat()
    # What `cp -p` or an archive with fixed times does: other bytes, the old size and mtime.
    replacement = tmp_path / "other.jsonl"
    replacement.write_bytes(src.read_bytes().replace(b"doc1", b"doc0", 1))
    os.utime(replacement, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(replacement, src)
    assert src.stat().st_size == st.st_size and src.stat().st_mtime_ns == st.st_mtime_ns
    again = FileHashes(tmp_path / "cache").sha256(src)
    assert again != first and len(hashed) == 2


def test_a_file_just_written_is_not_remembered(tmp_path, hashed, monkeypatch):
    monkeypatch.setattr(manifests.hashing, "RACY_SECONDS", 2.0)
    src = write_jsonl(tmp_path / "in.jsonl", docs(5))
    cache = FileHashes(tmp_path / "cache")
    cache.sha256(src)
    cache.sha256(src)  # within one run it is
    cache.save()
    FileHashes(tmp_path / "cache").sha256(src)
    assert len(hashed) == 2


def test_an_unreadable_cache_is_a_miss(tmp_path, hashed):
    src = write_jsonl(tmp_path / "in.jsonl", docs(5))
    cache = FileHashes(tmp_path / "cache")
    digest = cache.sha256(src)
    cache.save()
    for file in (tmp_path / "cache").iterdir():
        file.write_text("{not json")
    assert FileHashes(tmp_path / "cache").sha256(src) == digest and len(hashed) == 2


def test_a_large_jsonl_file_is_cut_into_ranges_once(cli, store, tmp_path, hashed, monkeypatch):
    cuts: list[Path] = []
    original = corpus.sources._jsonl_ranges
    monkeypatch.setattr(
        corpus.sources, "_jsonl_ranges", lambda path, size: cuts.append(path) or original(path, size)
    )
    src = write_jsonl(tmp_path / "in.jsonl", docs(200))
    recipe = corpus_recipe(tmp_path, src, extra="split_bytes: 4096\n")
    first = _build(cli, store, recipe)
    assert len(cuts) == 1 and len(store.resolve("c").producer.recipe["inputs"]) == 1
    assert _build(cli, store, recipe) == first and len(cuts) == 1 and len(hashed) == 1


HEAVY = ("torch", "transformers", "datasets", "trl", "peft", "accelerate", "polars", "presidio_analyzer",
         "spacy", "sklearn", "matplotlib", "httpx", "warcio", "trafilatura")  # fmt: skip


def test_a_corpus_build_imports_no_model_library(tmp_path):
    """The CLI's parser and a build of a JSONL input (no step that needs a model): none of the heavy
    libraries is imported. Checked in a fresh interpreter, where nothing else imported them."""
    src = write_jsonl(tmp_path / "in.jsonl", docs(20))
    recipe = corpus_recipe(tmp_path, src)
    probe = (
        "import sys\n"
        "from manifests.cli import main\n"
        f"assert main(['--store', {str(tmp_path / 'store')!r}, 'corpus', 'build', {str(recipe)!r}]) == 0\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
