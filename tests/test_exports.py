"""Exports: Croissant (validated and read by mlcroissant), the Hugging Face card (loaded by
``datasets``), OpenLineage run events (rebuilt through the client's typed classes), and the
``manifests export`` verb's errors. Everything offline: a guard refuses any connection that is not
to this machine."""

from __future__ import annotations

import datetime
import json
import shutil
import socket
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from manifests.exports import croissant, hf_card, hf_feature, size_category
from manifests.lineage_events import RUN_IDS, run_events
from manifests.publish import Publisher
from manifests.store import Store

from .conftest import assert_one_line_error

SCHEMA = pa.schema([
    ("id", pa.string()), ("parents", pa.list_(pa.string())), ("text", pa.string()),
    ("source", pa.struct([("uri", pa.string()), ("line", pa.int64())])),
    ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
    ("language", pa.string()), ("score", pa.float32()), ("n", pa.int64()), ("ok", pa.bool_()),
    ("day", pa.date32()), ("odd name", pa.string()),
])  # fmt: skip
LANGS = ["en", "en", "fr", "en", "en", "de", "en"]


def _rows(start: int, count: int) -> pa.Table:
    rows = [
        {"id": f"r{i}", "parents": [f"s{i}"], "text": f"text number {i}",
         "source": {"uri": f"file:///in/{i}.jsonl", "line": i},
         "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
         "language": LANGS[i], "score": i / 4, "n": i * 10, "ok": i % 2 == 0,
         "day": datetime.date(2026, 1, 1 + i), "odd name": f"odd {i}"}
        for i in range(start, start + count)
    ]  # fmt: skip
    return pa.Table.from_pylist(rows, schema=SCHEMA)


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    """A parent dataset; a dataset with two splits (two train shards), a ledger and a funnel; a run
    made from it; an eval of the run on it."""
    store = Store(tmp_path_factory.mktemp("exports") / "store")
    with Publisher(store, kind="dataset", name="seed", stage="corpus.build", recipe={"steps": []}) as pub:
        pub.write_table(pa.table({"id": [f"s{i}" for i in range(7)], "text": ["x"] * 7}))
        seed = pub.publish()
    recipe = {"name": "mix", "steps": [{"type": "min_words", "min_words": 3}], "seed": 0}
    with Publisher(
        store, kind="dataset", name="mix", stage="synth.generate", recipe=recipe, parents=[seed], seed=0
    ) as pub:
        pub.write_table(_rows(0, 3), split="train")
        pub.write_table(_rows(3, 2), split="train")
        pub.write_table(_rows(5, 2), split="test")
        pub.write_ledger(
            [{"id": "s9", "step": "min_words", "action": "drop", "reason": "too_short"}], "min_words"
        )
        funnel = [{"step": "min_words", "in": 8, "out": 7, "removed": {"too_short": 1}}]
        mix = pub.publish(stats={"rows_in": 8, "rows_out": 7, "funnel": funnel})
    with Publisher(
        store, kind="run", name="tuned", stage="train.sft", recipe={"lr": 1e-4}, parents=[mix]
    ) as pub:
        (pub.dir / "checkpoint").mkdir()
        (pub.dir / "checkpoint" / "weights.bin").write_bytes(b"\0" * 64)
        run = pub.publish()
    with Publisher(
        store, kind="eval", name="scores", stage="eval", recipe={"tasks": ["exact"]}, parents=[run, mix],
        parent_roles={run.id: "model", mix.id: "eval_data"},
    ) as pub:  # fmt: skip
        (pub.dir / "metrics.json").write_text('{"exact": 0.5}')
        scores = pub.publish()
    return store, seed, mix, run, scores


@pytest.fixture
def offline(monkeypatch):
    """Fail any connection off this machine (a loader that reaches for the network fails the test)."""
    connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in ("127.0.0.1", "::1", "localhost") and "/" not in host:
            raise AssertionError(f"network access to {address} during an offline test")
        return connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def _copy(manifest, folder: Path) -> Path:
    """The dataset folder as it would be uploaded (an export is never written into the store)."""
    shutil.copytree(manifest.location, folder)
    return folder


# --- Croissant --------------------------------------------------------------------------------------


def test_croissant_is_valid_for_mlcroissant_and_reads_back_the_rows(
    artefacts, cli, tmp_path, offline, monkeypatch
):
    store, seed, mix, _, _ = artefacts
    monkeypatch.setenv("CROISSANT_CACHE", str(tmp_path / "croissant-cache"))
    hub = _copy(mix, tmp_path / "hub")
    result = cli("--store", store.root, "manifests", "export", "mix", "--format", "croissant",
                 "--out", hub / "croissant.json", "--license", "CC-BY-4.0")  # fmt: skip
    assert result.code == 0, result.err
    doc = json.loads((hub / "croissant.json").read_text())
    assert doc["conformsTo"] == "http://mlcommons.org/croissant/1.0"
    assert doc["license"] == "https://spdx.org/licenses/CC-BY-4.0.html"
    assert doc["datePublished"] == mix.producer.finished_at.isoformat()
    assert doc["identifier"] == mix.id and doc["version"] == f"1.0.0+{mix.id[:12]}"
    assert [p["identifier"] for p in doc["isBasedOn"]] == [seed.id]
    assert doc["inLanguage"] == ["en", "de", "fr"]
    objects = {d["contentUrl"]: d for d in doc["distribution"] if d["@type"] == "cr:FileObject"}
    assert {path: d["sha256"] for path, d in objects.items()} == {f.path: f.sha256 for f in mix.data_files()}
    assert all(d["encodingFormat"] == "application/x-parquet" for d in doc["distribution"])
    sets = {d["@id"]: d["includes"] for d in doc["distribution"] if d["@type"] == "cr:FileSet"}
    assert sets == {
        "train-files": [f.path for f in mix.data_files("train")],
        "test-files": ["data/test-00000.parquet"],
    }
    for record_set in doc["recordSet"]:
        fields = {f["name"]: f for f in record_set["field"]}
        assert list(fields) == SCHEMA.names  # every top-level column, each read from its own column
        assert all(f["source"]["extract"] == {"column": name} for name, f in fields.items())
        assert fields["text"]["dataType"] == "sc:Text" and fields["n"]["dataType"] == "sc:Integer"
        assert fields["score"]["dataType"] == "sc:Float" and fields["ok"]["dataType"] == "sc:Boolean"
        assert fields["day"]["dataType"] == "sc:Date"
        assert fields["parents"]["repeated"] and fields["messages"]["repeated"]
        assert [s["name"] for s in fields["source"]["subField"]] == ["uri", "line"]

    import mlcroissant as mlc

    dataset = mlc.Dataset(jsonld=hub / "croissant.json")  # raises on any validation error
    assert not dataset.metadata.ctx.issues.errors
    # A license was given: only the citation, which distillery never knows, is missing.
    assert [w for w in dataset.metadata.ctx.issues.warnings if "citeAs" not in w] == []
    expected = {split: pq.read_table([hub / f.path for f in mix.data_files(split)]).to_pylist()
                for split in ("train", "test")}  # fmt: skip
    for split, rows in expected.items():
        records = list(dataset.records(split))
        assert len(records) == len(rows) == sum(f.rows for f in mix.data_files(split))
        for record, row in zip(records, rows, strict=True):
            assert record[f"{split}/id"].decode() == row["id"]
            assert record[f"{split}/text"].decode() == row["text"]
            assert record[f"{split}/odd%20name"].decode() == row["odd name"]
            assert [p.decode() for p in record[f"{split}/parents"]] == row["parents"]
            assert record[f"{split}/n"] == row["n"] and record[f"{split}/ok"] == row["ok"]
            assert record[f"{split}/score"] == pytest.approx(row["score"])
            assert record[f"{split}/day"].date() == row["day"]
            source = record[f"{split}/source"]
            assert source[f"{split}/source/uri"].decode() == row["source"]["uri"]
            assert source[f"{split}/source/line"] == row["source"]["line"]
            roles = [m[f"{split}/messages/role"].decode() for m in record[f"{split}/messages"]]
            assert roles == [m["role"] for m in row["messages"]]


# --- Hugging Face card ------------------------------------------------------------------------------


def _front_matter(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    front, _, body = text[4:].partition("\n---\n")
    return yaml.safe_load(front), body


def test_hf_card_describes_splits_and_loads_with_datasets(artefacts, cli, tmp_path, offline):
    store, seed, mix, _, _ = artefacts
    hub = _copy(mix, tmp_path / "hub")
    result = cli("--store", store.root, "manifests", "export", "mix", "--format", "hf-card",
                 "--out", hub / "README.md", "--license", "CC-BY-4.0")  # fmt: skip
    assert result.code == 0, result.err
    front, body = _front_matter((hub / "README.md").read_text())
    assert front["license"] == "cc-by-4.0" and front["language"] == ["en", "de", "fr"]
    assert front["size_categories"] == ["n<1K"]
    info = front["dataset_info"]
    assert {s["name"]: s["num_examples"] for s in info["splits"]} == {"train": 5, "test": 2}
    assert [f["name"] for f in info["features"]] == SCHEMA.names
    data_files = {d["split"]: d["path"] for d in front["configs"][0]["data_files"]}
    assert data_files == {split: [f.path for f in mix.data_files(split)] for split in ("train", "test")}
    assert f"`{seed.ref}` (input), stage `corpus.build`" in body  # the lineage
    assert "| min_words | 8 | 7 | too_short: 1 |" in body and "ledger/min_words.parquet" in body
    assert f"data_files={json.dumps(data_files)}" in body

    import datasets

    cache = str(tmp_path / "hf-cache")
    by_paths = datasets.load_dataset(
        "parquet",
        data_files={s: [str(hub / p) for p in paths] for s, paths in data_files.items()},
        cache_dir=cache,
    )
    assert {s: by_paths[s].num_rows for s in by_paths} == {"train": 5, "test": 2}
    # The folder with its card: datasets takes the features, splits and data files from the front
    # matter (without a card it knows no features before reading the data).
    builder = datasets.load_dataset_builder(str(hub), cache_dir=cache)
    assert builder.info.features == by_paths["train"].features
    assert {s: info.num_examples for s, info in builder.info.splits.items()} == {"train": 5, "test": 2}
    assert {
        s: [Path(p).relative_to(hub).as_posix() for p in paths]
        for s, paths in builder.config.data_files.items()
    } == data_files
    by_card = datasets.load_dataset(str(hub), cache_dir=cache)
    assert {s: by_card[s].num_rows for s in by_card} == {"train": 5, "test": 2}
    assert by_card["test"][0]["messages"] == [
        {"role": "user", "content": "q5"},
        {"role": "assistant", "content": "a5"},
    ]


def test_arrow_types_map_to_hub_features_and_size_categories():
    assert hf_feature(pa.float32()) == {"dtype": "float32"}
    assert hf_feature(pa.date32()) == {"dtype": "date32"}
    assert hf_feature(pa.timestamp("us", tz="UTC")) == {"dtype": "timestamp[us, tz=UTC]"}
    assert hf_feature(pa.dictionary(pa.int32(), pa.string())) == {"dtype": "string"}
    assert hf_feature(pa.list_(pa.int64())) == {"list": "int64"}
    assert hf_feature(pa.large_list(pa.string())) == {"large_list": "string"}
    assert hf_feature(pa.list_(pa.float32(), 3)) == {"list": "float32", "length": 3}
    assert hf_feature(pa.list_(pa.struct([("a", pa.bool_())]))) == {"list": [{"name": "a", "dtype": "bool"}]}
    assert hf_feature(pa.list_(pa.list_(pa.string()))) == {"list": {"list": "string"}}
    assert [size_category(n) for n in (0, 999, 1000, 2_500_000)] == ["n<1K", "n<1K", "1K<n<10K", "1M<n<10M"]


# --- OpenLineage ------------------------------------------------------------------------------------


def _without_nulls(value):
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value if v is not None]
    return value


def _typed(event: dict):
    """``event`` rebuilt through openlineage-python's attrs classes: an unknown or missing field, a
    run id that is not a UUID or a time without a zone fails here."""
    from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
    from openlineage.client.generated.base import InputDatasetFacet, RunFacet
    from openlineage.client.generated.dataset_version_dataset import DatasetVersionDatasetFacet
    from openlineage.client.generated.job_type_job import JobTypeJobFacet
    from openlineage.client.generated.output_statistics_output_dataset import (
        OutputStatisticsOutputDatasetFacet,
    )
    from openlineage.client.generated.processing_engine_run import ProcessingEngineRunFacet
    from openlineage.client.generated.schema_dataset import SchemaDatasetFacet, SchemaDatasetFacetFields

    standard = {"schema": SchemaDatasetFacet, "version": DatasetVersionDatasetFacet, "jobType": JobTypeJobFacet,
                "outputStatistics": OutputStatisticsOutputDatasetFacet,
                "processing_engine": ProcessingEngineRunFacet}  # fmt: skip

    def schema_field(f: dict) -> SchemaDatasetFacetFields:
        return SchemaDatasetFacetFields(**{**f, "fields": [schema_field(x) for x in f.get("fields", [])]})

    def facets(data: dict, custom) -> dict:
        out = {}
        for key, facet in data.items():
            fields = {k: v for k, v in facet.items() if not k.startswith("_")}
            if key in standard:
                cls = standard[key]
                # The facet names the schema of the class that reads it (spec versions may differ).
                name = cls._get_schema().rsplit("/", 1)[-1]
                assert facet["_schemaURL"].startswith("https://openlineage.io/spec/facets/")
                assert facet["_schemaURL"].endswith(f"/{name}.json#/$defs/{name}"), facet["_schemaURL"]
                if key == "schema":
                    fields["fields"] = [schema_field(f) for f in fields["fields"]]
                out[key] = cls(**fields, producer=facet["_producer"])
            else:
                assert key.startswith("distillery_")  # custom facets carry the producer's prefix
                out[key] = custom(producer=facet["_producer"]).with_additional_properties(**fields)
        return out

    def dataset(d: dict, cls, extra: str):
        typed = {**d, "facets": facets(d.get("facets", {}), None)}
        if extra in d:
            typed[extra] = facets(d[extra], InputDatasetFacet)
        return cls(**typed)

    return RunEvent(
        eventType=RunState(event["eventType"]), eventTime=event["eventTime"], producer=event["producer"],
        run=Run(**{**event["run"], "facets": facets(event["run"]["facets"], RunFacet)}),
        job=Job(**{**event["job"], "facets": facets(event["job"]["facets"], None)}),
        inputs=[dataset(d, InputDataset, "inputFacets") for d in event["inputs"]],
        outputs=[dataset(d, OutputDataset, "outputFacets") for d in event["outputs"]],
    )  # fmt: skip


def _strip_schema_urls(value):
    """Without the facets' schema URLs (checked by ``_typed``) and empty maps and lists (which the
    typed classes fill in as defaults)."""
    if isinstance(value, dict):
        return {k: _strip_schema_urls(v) for k, v in value.items() if k != "_schemaURL" and v not in ({}, [])}
    if isinstance(value, list):
        return [_strip_schema_urls(v) for v in value]
    return value


def test_openlineage_events_are_typed_run_events_with_lineage(artefacts):
    from openlineage.client.serde import Serde

    store, seed, mix, run, scores = artefacts
    namespace = store.root.resolve().as_uri()
    for manifest in (seed, mix, run, scores):
        start, complete = run_events(manifest, store.root)
        for event in (start, complete):
            typed = _typed(event)
            assert typed.schemaURL == event["schemaURL"]
            assert _strip_schema_urls(Serde.to_dict(typed)) == _strip_schema_urls(_without_nulls(event))
        assert (start["eventType"], complete["eventType"]) == ("START", "COMPLETE")
        assert start["eventTime"] == manifest.producer.started_at.isoformat()
        assert complete["eventTime"] == manifest.producer.finished_at.isoformat()
        assert start["run"]["runId"] == complete["run"]["runId"] == str(uuid.uuid5(RUN_IDS, manifest.id))
        assert complete["job"] == {**complete["job"], "namespace": "distillery",
                                   "name": f"{manifest.producer.stage}.{manifest.name}"}  # fmt: skip
        assert [(d["namespace"], d["name"]) for d in complete["inputs"]] == [
            (namespace, f"{q.kind}s/{q.name}/{q.id}") for q in manifest.parents
        ]
        (output,) = complete["outputs"]
        assert (output["namespace"], output["name"]) == (
            namespace,
            f"{manifest.kind}s/{manifest.name}/{manifest.id}",
        )
        assert Path(output["namespace"].removeprefix("file://"), output["name"]) == manifest.location
        custom = complete["run"]["facets"]["distillery_manifest"]
        assert (custom["id"], custom["digest"], custom["recipe"]) == (
            manifest.id,
            manifest.digest,
            manifest.producer.recipe,
        )
        stats = output["outputFacets"]["outputStatistics"]
        assert stats["fileCount"] == len(manifest.files + manifest.ledger)
        assert stats["size"] == sum(f.bytes for f in manifest.files + manifest.ledger)
    (output,) = run_events(mix, store.root)[1]["outputs"]
    assert output["outputFacets"]["outputStatistics"]["rowCount"] == 7
    fields = {f["name"]: f for f in output["facets"]["schema"]["fields"]}
    assert list(fields) == SCHEMA.names
    assert [f["name"] for f in fields["messages"]["fields"]] == ["role", "content"]
    roles = [
        d["inputFacets"]["distillery_parent"]["role"] for d in run_events(scores, store.root)[0]["inputs"]
    ]
    assert roles == ["model", "eval_data"]
    assert "outputStatistics" not in json.dumps(run_events(run, store.root)[0])  # known once the run is done


def test_openlineage_verb_writes_one_file_per_manifest(artefacts, cli, tmp_path):
    store, seed, mix, run, scores = artefacts
    out = tmp_path / "lineage"
    result = cli("--store", store.root, "manifests", "export", "--openlineage", out)
    assert result.code == 0, result.err
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"{m.kind}-{m.name}-{m.id}.json" for m in (seed, mix, run, scores))
    first = {name: (out / name).read_bytes() for name in names}
    assert [e["eventType"] for e in json.loads(first[names[0]])] == ["START", "COMPLETE"]
    # Deterministic: the same events again; only the named manifests when refs are given.
    assert cli("--store", store.root, "manifests", "export", "--openlineage", out).code == 0
    assert {name: (out / name).read_bytes() for name in names} == first
    some = tmp_path / "some"
    assert cli("--store", store.root, "manifests", "export", "--openlineage", some, "tuned", "mix").code == 0
    assert sorted(p.name for p in some.iterdir()) == sorted(
        f"{m.kind}-{m.name}-{m.id}.json" for m in (run, mix)
    )


# --- bad input ----------------------------------------------------------------------------------------


def test_export_mistakes_are_one_error_line_and_write_nothing(artefacts, cli, tmp_path):
    store, _, mix, _, _ = artefacts
    out = tmp_path / "out.json"

    def export(*args):
        return cli("--store", store.root, "manifests", "export", *args)

    result = export("nope", "--format", "croissant", "--out", out)
    assert_one_line_error(result)
    assert "no manifest named 'nope'" in result.err
    for ref, fmt in (("tuned", "croissant"), ("scores", "hf-card")):
        result = export(ref, "--format", fmt, "--out", out)
        assert_one_line_error(result)
        assert f"{fmt} describes datasets" in result.err and "--openlineage" in result.err
    assert_one_line_error(export("mix"))  # no format
    assert_one_line_error(export("--openlineage", tmp_path / "ol", "--format", "croissant"))
    result = export("mix", "--format", "croissant", "--out", tmp_path)
    assert_one_line_error(result)
    assert "is a folder" in result.err
    result = export("mix", "--format", "hf-card", "--out", mix.location / "README.md")
    assert_one_line_error(result)
    assert "verify report it as extra" in result.err
    result = export("--openlineage", mix.location / "events")
    assert_one_line_error(result)
    assert f"inside the published folder of {mix.ref}" in result.err
    assert not (mix.location / "README.md").exists() and not (mix.location / "events").exists()
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temporary file left either
    assert cli("--store", store.root, "manifests", "verify", "mix").code == 0


def test_export_of_a_tampered_dataset_or_edited_manifest_fails(cli, tmp_path):
    store = Store(tmp_path / "store")
    with Publisher(store, kind="dataset", name="d", stage="corpus.build", recipe={}) as pub:
        pub.write_table(_rows(0, 3))
        d = pub.publish()
    with Publisher(
        store, kind="dataset", name="e", stage="corpus.build", recipe={"x": 1}, parents=[d]
    ) as pub:
        pub.write_table(_rows(3, 2))
        e = pub.publish()
    shard = d.location / d.data_files()[0].path
    pq.write_table(pq.read_table(shard).slice(1), shard)
    result = cli("--store", store.root, "manifests", "export", "d", "--format", "croissant")
    assert_one_line_error(result, code=1)
    assert "altered: data/train-00000.parquet" in result.err
    data = json.loads((e.location / "manifest.json").read_text())
    data["stats"] = {"rows_out": 99}
    (e.location / "manifest.json").write_text(json.dumps(data))
    result = cli("--store", store.root, "manifests", "export", "--openlineage", tmp_path / "ol")
    assert_one_line_error(result, code=1)
    assert "skipped e@" in result.err
    assert [p.name for p in (tmp_path / "ol").iterdir()] == [f"dataset-d-{d.id}.json"]


def test_croissant_and_card_leave_out_what_is_not_known(artefacts):
    """No license or web page given: none is claimed; without a store the card lists the direct parents."""
    _, seed, mix, _, _ = artefacts
    doc = croissant(mix)
    assert "license" not in doc and "url" not in doc  # not known: left out
    front, body = _front_matter(hf_card(mix))
    assert "license" not in front
    front, _ = _front_matter(hf_card(mix, license="https://example.org/terms"))
    assert (front["license"], front["license_link"]) == ("other", "https://example.org/terms")
    assert f"- dataset `{seed.name}@{seed.id[:12]}` (input)" in body
