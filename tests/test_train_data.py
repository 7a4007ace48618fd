"""Training data from manifests: checks before any model loads, mixture weights, pinned ids."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pytest

from manifests.errors import DistilleryError
from manifests.publish import Publisher
from train.data import DatasetInput, load_mixture, pinned, resolve_datasets


def _dataset(store, name: str, n: int, split: str = "train"):
    rows = [{"id": f"{name}-{i}", "parents": [], "messages": [{"role": "user", "content": "q"},
             {"role": "assistant", "content": f"{name} {i}"}]} for i in range(n)]  # fmt: skip
    with Publisher(store, kind="dataset", name=name, stage="test", recipe={"n": n}) as pub:
        pub.write_table(pa.Table.from_pylist(rows), split=split)
        return pub.publish()


def test_weights_set_the_mixture_and_repeat_the_smaller_dataset(store):
    _dataset(store, "big", 900)
    _dataset(store, "small", 100)
    inputs = [DatasetInput(ref="big", weight=1), DatasetInput(ref="small", weight=1)]
    manifests = resolve_datasets(inputs, store, ["id", "messages"], "SFT")
    mixed = load_mixture(inputs, manifests, ["id", "messages"], seed=0)
    counts = Counter(i.split("-")[0] for i in mixed["id"])
    # Equal weights: as many rows from each; every big row seen, small rows repeated about 9 times.
    assert counts["big"] >= 900 and abs(counts["big"] - counts["small"]) <= counts["big"] * 0.15
    assert len(set(mixed["id"])) == 1000
    again = load_mixture(inputs, manifests, ["id", "messages"], seed=0)
    assert again["id"] == mixed["id"]  # the same mixture in every run
    assert [p["ref"] for p in pinned(inputs, manifests)] == [m.id for m in manifests]


def test_a_memory_mapped_mixture_is_the_in_memory_one_read_from_disk(store, tmp_path):
    _dataset(store, "big", 300)
    _dataset(store, "small", 40)
    inputs = [DatasetInput(ref="big", weight=2), DatasetInput(ref="small", weight=1)]
    manifests = resolve_datasets(inputs, store, ["id"], "SFT")
    in_memory = load_mixture(inputs, manifests, ["id", "messages"], seed=3)
    mapped = load_mixture(inputs, manifests, ["id", "messages"], seed=3, cache_dir=tmp_path / "arrow")
    assert mapped["id"] == in_memory["id"] and mapped[:5]["messages"] == in_memory[:5]["messages"]
    files = [f["filename"] for part in [mapped] for f in part.cache_files]
    assert files and all(f.startswith(str(tmp_path / "arrow")) for f in files)  # read from there, not held


def test_packed_rows_are_checked_in_one_pass(store, tmp_path):
    from train.pretrain import TokenRows

    def packed(name, rows):
        with Publisher(store, kind="dataset", name=name, stage="test", recipe={"name": name}) as pub:
            pub.write_table(pa.table({"id": [str(i) for i in range(len(rows))], "input_ids": rows}))
            return pub.publish()

    for name, rows in {"even": [[1, 2, 3], [4, 5, 9]], "ragged": [[1, 2, 3], [4, 5]]}.items():
        packed(name, rows)
    inputs = [DatasetInput(ref="even")]
    tokens = TokenRows(load_mixture(inputs, resolve_datasets(inputs, store, ["input_ids"], "x"), ["input_ids"], 0,
                                    cache_dir=tmp_path / "a"))  # fmt: skip
    assert (len(tokens), tokens.seq_len, tokens.max_token) == (2, 3, 9)
    assert tokens[[1, 0]].tolist() == [[4, 5, 9], [1, 2, 3]]
    inputs = [DatasetInput(ref="ragged")]
    with pytest.raises(DistilleryError, match="input_ids of one length"):
        TokenRows(load_mixture(inputs, resolve_datasets(inputs, store, ["input_ids"], "x"), ["input_ids"], 0,
                               cache_dir=tmp_path / "b"))  # fmt: skip


def test_without_weights_the_datasets_are_concatenated(store):
    _dataset(store, "a", 3)
    _dataset(store, "b", 2)
    inputs = [DatasetInput(ref="a"), DatasetInput(ref="b")]
    mixed = load_mixture(inputs, resolve_datasets(inputs, store, ["id"], "SFT"), ["id"], seed=0)
    assert mixed["id"] == ["a-0", "a-1", "a-2", "b-0", "b-1"]


def test_checks_name_the_dataset_and_what_it_has(store):
    _dataset(store, "a", 3)
    with pytest.raises(
        DistilleryError,
        match="lacks column\\(s\\) input_ids needed for pretraining; it has: id, parents, messages",
    ):
        resolve_datasets([DatasetInput(ref="a")], store, ["input_ids"], "pretraining")
    with pytest.raises(DistilleryError, match="has no split 'validation'"):
        resolve_datasets([DatasetInput(ref="a", split="validation")], store, ["id"], "SFT")
    with pytest.raises(DistilleryError, match="every dataset a 'weight', or none"):
        resolve_datasets([DatasetInput(ref="a", weight=1), DatasetInput(ref="a")], store, ["id"], "SFT")
    with pytest.raises(DistilleryError, match="no dataset manifest named 'missing'"):
        resolve_datasets([DatasetInput(ref="missing")], store, ["id"], "SFT")
