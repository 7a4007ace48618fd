"""Incremental dedup: an index of what earlier datasets hold, so a new build drops what they have.

    distillery corpus dedup-index web-2025 --name web-2025-index --minhash-threshold 0.8

publishes a run holding ``index/keys.parquet`` (each document's id, its exact-text key and, with
MinHash, its band keys) and ``index/settings.json``; a later build refers to it::

    dedup: {exact: true, minhash: {threshold: 0.8}, against: [web-2025-index]}

and drops documents whose text (or near-duplicate) is already in the index, naming the indexed
document in the ledger — without reading or reprocessing the earlier datasets. An index built with
other text or shingle settings than the build's is refused: its keys would not be comparable. That
includes the text normalisation (``normalize``, of exact dedup and of MinHash's shingles) recorded
in ``settings.json``; an index from before that setting was recorded normalised nothing, so it
counts as ``normalize: none`` and a build with MinHash's default (``simplify``) refuses it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from corpus.document_keys import text_keys
from corpus.minhash import MinHashConfig, band_keys
from corpus.steps import TextNormalization
from manifests.data import read_shard, read_table, require_columns
from manifests.errors import DistilleryError
from manifests.publish import Publisher, write_parquet
from manifests.recipes import Name, RecipeConfig
from manifests.schema import Manifest
from manifests.store import Store, load_manifest
from manifests.verify import ensure_verified

KEYS_FILE = "index/keys.parquet"
SETTINGS_FILE = "index/settings.json"


class DedupIndexConfig(RecipeConfig):
    """Index a published dataset for later incremental dedup."""

    name: Name
    """Name of the index (a run) in the store."""
    dataset: str
    """The dataset to index (its documents will be dropped from later builds that use the index)."""
    case_fold: bool = True
    """Fold case in the exact-text keys; must match the later build's ``dedup.case_fold``."""
    normalize: TextNormalization = "none"
    """Text normalisation of the exact-text keys; must match the later build's ``dedup.normalize``."""
    minhash: MinHashConfig | None = None
    """Also index MinHash band keys (near-duplicates); must match the later build's settings."""


def settings_of(
    case_fold: bool, minhash: MinHashConfig | None, normalize: TextNormalization
) -> dict[str, Any]:
    """What makes keys comparable: text normalisation and, with MinHash, shingles and banding."""
    settings: dict[str, Any] = {"case_fold": case_fold, "normalize": normalize, "minhash": None}
    if minhash is not None:
        bands, rows = minhash.banding()
        settings["minhash"] = {"normalize": minhash.normalize, "shingle": minhash.shingle, "ngram": minhash.ngram,
                               "lowercase": minhash.lowercase, "num_perm": minhash.num_perm, "seed": minhash.seed,
                               "bands": bands, "rows": rows}  # fmt: skip
    return settings


def _recorded_settings(path: Path) -> tuple[dict[str, Any], bool]:
    """An index's ``settings.json``, and whether it predates ``normalize``: such an index normalised
    nothing, so it counts as ``normalize: none`` (never as whatever the build uses)."""
    settings = json.loads(path.read_text())
    older = "normalize" not in settings
    settings.setdefault("normalize", "none")
    if settings["minhash"] is not None:
        settings["minhash"].setdefault("normalize", "none")
    return settings, older


def _shown(settings: dict[str, Any], keys: list[str]) -> str:
    """``key: value, ...`` as a recipe writes them."""
    values = {k: settings.get(k) for k in keys}
    return ", ".join(f"{k}: {v if isinstance(v, str) else json.dumps(v)}" for k, v in values.items())


def _mismatch(index: Manifest, have: dict[str, Any], want: dict[str, Any], older: bool) -> str | None:
    """The one-line refusal of an index whose keys the build cannot compare with its own, or None."""
    why = " (the index predates the setting: it counts as normalize: none)" if older else ""
    for key in ("case_fold", "normalize"):
        if have[key] != want[key]:
            return (f"dedup index {index.ref} was built with {_shown(have, [key])}, the build's dedup has "
                    f"{_shown(want, [key])}{why if key == 'normalize' else ''}; rebuild the index with "
                    f"{_shown(want, [key])}, or set {_shown(have, [key])} in the build's dedup")  # fmt: skip
    if want["minhash"] is None or have["minhash"] == want["minhash"]:
        return None
    if have["minhash"] is None:
        return (f"dedup index {index.ref} was built without MinHash band keys; rebuild it with the build's "
                f"minhash settings (corpus dedup-index --minhash-threshold ...)")  # fmt: skip
    differ = [k for k in want["minhash"] if have["minhash"].get(k) != want["minhash"][k]]
    return (f"dedup index {index.ref} was built with other shingle settings than the build's minhash "
            f"({_shown(have['minhash'], differ)}; the build has {_shown(want['minhash'], differ)})"
            f"{why if 'normalize' in differ else ''}; rebuild the index with the build's minhash settings, "
            f"or set them in the build's minhash: {{{_shown(have['minhash'], differ)}}}")  # fmt: skip


def build_index(cfg: DedupIndexConfig, store: Store) -> Manifest:
    dataset = store.resolve(cfg.dataset, kind="dataset")
    require_columns(dataset, ["id", "text"], "dedup-index")
    table = read_table(dataset, columns=["id", "text"])
    if table.num_rows == 0:
        raise DistilleryError(f"dataset {dataset.ref} is empty: nothing to index")
    text = table.column("text").combine_chunks()
    columns = {"id": table.column("id"), "text_key": text_keys(text, cfg.case_fold, cfg.normalize)}
    if cfg.minhash is not None:
        columns["band_keys"] = band_keys(text, cfg.minhash)
    recipe = cfg.resolved() | {"dataset": dataset.id}
    with Publisher(store, kind="run", name=cfg.name, stage="corpus.dedup-index", recipe=recipe, parents=[dataset],
                   parent_roles={dataset.id: "indexed"}) as pub:  # fmt: skip
        (pub.dir / "index").mkdir()
        write_parquet(pa.table(columns), pub.dir / KEYS_FILE)
        (pub.dir / SETTINGS_FILE).write_text(
            json.dumps(settings_of(cfg.case_fold, cfg.minhash, cfg.normalize), sort_keys=True) + "\n"
        )
        return pub.publish(stats={"documents": table.num_rows, "minhash": cfg.minhash is not None})


class LoadedIndex:
    """An index's keys, checked against the settings of the build that uses it."""

    def __init__(
        self,
        manifest: Manifest,
        case_fold: bool,
        minhash: MinHashConfig | None,
        normalize: TextNormalization = "none",
    ):
        self.manifest = manifest
        folder = manifest.location
        if not (folder / KEYS_FILE).is_file():
            raise DistilleryError(
                f"{manifest.ref} is not a dedup index (no {KEYS_FILE}); build one with 'corpus dedup-index'"
            )
        # A build trusts the index's keys to drop rows: a tampered index must not drop (or keep) any.
        ensure_verified(manifest)
        have, older = _recorded_settings(folder / SETTINGS_FILE)
        problem = _mismatch(manifest, have, settings_of(case_fold, minhash, normalize), older)
        if problem is not None:
            raise DistilleryError(problem)
        self.keys_path = folder / KEYS_FILE
        table = read_shard(self.keys_path, ref=manifest.ref, kind="run")
        self.ids = table.column("id").to_pylist()
        self.text_keys = table.column("text_key").combine_chunks()
        self.band_keys = (
            table.column("band_keys").combine_chunks() if "band_keys" in table.column_names else None
        )
        self.texts = IndexedTexts(str(folder))
        """Texts of indexed documents by position (for verifying near-duplicate candidates)."""


@dataclass(frozen=True)
class IndexedTexts:
    """``indexed_texts`` of one index as a callable that pickles small (it travels to verify tasks)."""

    folder: str

    def __call__(self, rows: np.ndarray) -> list[str]:
        return indexed_texts(Path(self.folder), rows)


def indexed_texts(folder: Path, rows: np.ndarray) -> list[str]:
    """Texts of the documents at positions ``rows`` of the index in ``folder``, read from the
    indexed dataset (one pass over its shards, keeping only the wanted texts)."""
    manifest = load_manifest(folder)
    parent = next(p for p in manifest.parents if p.role == "indexed")
    dataset = Store(Path(folder).parent.parent.parent).get(parent.id)
    keys = read_shard(Path(folder) / KEYS_FILE, ["id"], manifest.ref, kind="run")
    ids = keys.column("id").take(pa.array(rows)).to_pylist()
    wanted = set(ids)
    found: dict[str, str] = {}
    for f in dataset.data_files():
        # Named like any other damaged shard: the dataset is read long after the index was built.
        table = read_shard(dataset.location / f.path, ["id", "text"], dataset.ref)
        for rid, text in zip(table.column("id").to_pylist(), table.column("text").to_pylist(), strict=True):
            if rid in wanted:
                found[rid] = text
    return [found[i] for i in ids]


def run_build_index(data: dict[str, Any], store: Store, source: str) -> Manifest:
    from manifests.recipes import parse_config

    return build_index(parse_config(DedupIndexConfig, data, source), store)
