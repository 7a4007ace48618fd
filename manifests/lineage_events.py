"""OpenLineage run events of manifests: the stage run that made each one, as a START and a COMPLETE.

    distillery manifests export --openlineage lineage/               # every manifest in the store
    distillery manifests export --openlineage lineage/ demo-sft-run  # some

writes one file per manifest, ``lineage/<kind>-<name>-<id>.json``: a JSON list of its two
RunEvents (OpenLineage spec 2-0-2), ready to POST one by one to a lineage server such as Marquez.
One event, abridged::

    {"eventType": "COMPLETE", "eventTime": "2026-11-29T10:00:03.120000+00:00",
     "producer": "urn:distillery:0.1.0",
     "schemaURL": "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunEvent",
     "run": {"runId": "5f0c…",
             "facets": {"distillery_manifest": {"id": "3f9c…", "digest": "…", "recipe": {…}}}},
     "job": {"namespace": "distillery", "name": "corpus.build.demo-corpus"},
     "inputs": [{"namespace": "file:///data/distillery-store", "name": "datasets/web/1b04…"}],
     "outputs": [{"namespace": "file:///data/distillery-store", "name": "datasets/demo-corpus/3f9c…",
                  "facets": {"schema": {…}, "version": {"datasetVersion": "3f9c…"}},
                  "outputFacets": {"outputStatistics": {"rowCount": 222, "size": 111889, "fileCount": 1}}}]}

The run id is a UUID derived from the manifest id, so exporting twice gives the same events. A
dataset's namespace is its store (as a URI) and its name the folder inside it, so
``namespace/name`` is where the artefact lies. Times are the producer's ``started_at`` and
``finished_at``. The custom ``distillery_manifest`` run facet carries the manifest id, digest and
resolved recipe (which never holds secrets: ``Publisher`` refuses them); no environment value is
added.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa

from manifests.errors import VerificationError
from manifests.exports import data_schema, is_list_type, write_atomic
from manifests.schema import Manifest
from manifests.verify import manifest_edited

SPEC = "https://openlineage.io/spec"
RUN_EVENT_SCHEMA = f"{SPEC}/2-0-2/OpenLineage.json#/$defs/RunEvent"
JOB_NAMESPACE = "distillery"
RUN_IDS = uuid.uuid5(uuid.NAMESPACE_URL, "urn:distillery:runs")
"""The namespace of run ids: ``uuid5(RUN_IDS, manifest id)``."""

_FACET_SCHEMAS = {
    "schema": "facets/1-2-0/SchemaDatasetFacet.json#/$defs/SchemaDatasetFacet",
    "version": "facets/1-0-1/DatasetVersionDatasetFacet.json#/$defs/DatasetVersionDatasetFacet",
    "outputStatistics": (
        "facets/1-0-2/OutputStatisticsOutputDatasetFacet.json#/$defs/OutputStatisticsOutputDatasetFacet"
    ),
    "processing_engine": "facets/1-1-1/ProcessingEngineRunFacet.json#/$defs/ProcessingEngineRunFacet",
    "jobType": "facets/2-0-4/JobTypeJobFacet.json#/$defs/JobTypeJobFacet",
}


def producer_uri(manifest: Manifest) -> str:
    """The producer of the events: the distillery version that ran the stage. (A URN: the project
    has no public home page to name yet.)"""
    return f"urn:distillery:{manifest.producer.package_version}"


def run_id(manifest: Manifest) -> str:
    return str(uuid.uuid5(RUN_IDS, manifest.id))


def store_namespace(manifest: Manifest, store_root: Path) -> str:
    """The store holding ``manifest`` as a URI: the store around its folder when it lies in one
    (``<store>/<kind>s/<name>/<id>``), else ``store_root``."""
    folder = manifest.location
    in_store = folder.name == manifest.id and folder.parent.parent.name == f"{manifest.kind}s"
    return (folder.parent.parent.parent if in_store else Path(store_root).resolve()).as_uri()


def dataset_name(kind: str, name: str, id_: str) -> str:
    return f"{kind}s/{name}/{id_}"


def _facet(producer: str, key: str, **fields: Any) -> dict[str, Any]:
    return {"_producer": producer, "_schemaURL": f"{SPEC}/{_FACET_SCHEMAS[key]}", **fields}


def _custom_facet(producer: str, facet: str, /, **fields: Any) -> dict[str, Any]:
    # (None left out, as OpenLineage's own client writes facets: an unsealed manifest has no digest.)
    values = {key: value for key, value in fields.items() if value is not None}
    return {"_producer": producer, "_schemaURL": f"{producer}:facets:{facet}", **values}


def _type_name(type_: pa.DataType) -> str:
    if pa.types.is_struct(type_):
        return "struct"
    if is_list_type(type_):
        return f"list<{_type_name(type_.value_type)}>"
    return str(type_)


def _schema_fields(fields: list[pa.Field]) -> list[dict[str, Any]]:
    """The ``schema`` facet's fields: name, type, position; a struct's (or a list of structs')
    fields nested."""
    out = []
    for position, f in enumerate(fields, start=1):
        entry: dict[str, Any] = {"name": f.name, "type": _type_name(f.type), "ordinal_position": position}
        inner = f.type
        while is_list_type(inner):
            inner = inner.value_type
        if pa.types.is_struct(inner):
            entry["fields"] = _schema_fields(list(inner))
        out.append(entry)
    return out


def run_events(manifest: Manifest, store_root: Path) -> list[dict[str, Any]]:
    """The START and COMPLETE RunEvents of the stage run that published ``manifest``."""
    if manifest_edited(manifest):
        raise VerificationError(
            f"{manifest.ref}: manifest.json was edited after it was published, so its events would not be "
            f"trustworthy; restore it or re-run the stage that made it"
        )
    p = manifest.producer
    producer = producer_uri(manifest)
    namespace = store_namespace(manifest, store_root)
    files = manifest.files + manifest.ledger
    data = manifest.data_files()
    schema = data_schema(manifest)
    output_facets: dict[str, Any] = {"version": _facet(producer, "version", datasetVersion=manifest.id)}
    if schema is not None:
        output_facets["schema"] = _facet(producer, "schema", fields=_schema_fields(list(schema)))
    statistics: dict[str, Any] = {"size": sum(f.bytes for f in files), "fileCount": len(files)}
    if data:
        statistics["rowCount"] = sum(f.rows or 0 for f in data)
    inputs = [
        {"namespace": namespace, "name": dataset_name(q.kind, q.name, q.id),
         "facets": {"version": _facet(producer, "version", datasetVersion=q.id)},
         "inputFacets": {"distillery_parent": _custom_facet(producer, "ParentInputFacet", role=q.role,
                                                            kind=q.kind, ref=f"{q.name}@{q.id[:12]}")}}
        for q in manifest.parents
    ]  # fmt: skip
    run = {
        "runId": run_id(manifest),
        "facets": {
            "processing_engine": _facet(
                producer, "processing_engine", version=p.package_version, name="distillery"
            ),
            "distillery_manifest": _custom_facet(
                producer,
                "ManifestRunFacet",
                id=manifest.id,
                digest=manifest.digest,
                kind=manifest.kind,
                name=manifest.name,
                ref=manifest.ref,
                stage=p.stage,
                recipe=p.recipe,
                seed=p.seed,
                packageVersion=p.package_version,
                gitCommit=p.git_commit,
                gitDirty=p.git_dirty,
                libraries=p.libraries,
            ),  # fmt: skip
        },
    }
    job = {
        "namespace": JOB_NAMESPACE,
        "name": f"{p.stage}.{manifest.name}",
        "facets": {
            "jobType": _facet(
                producer, "jobType", processingType="BATCH", integration="DISTILLERY", jobType=p.stage
            )
        },
    }
    events = []
    for event_type, at in (("START", p.started_at), ("COMPLETE", p.finished_at)):
        output: dict[str, Any] = {
            "namespace": namespace,
            "name": dataset_name(manifest.kind, manifest.name, manifest.id),
            "facets": output_facets,
        }
        if event_type == "COMPLETE":  # what was written is known once the run is done
            output["outputFacets"] = {"outputStatistics": _facet(producer, "outputStatistics", **statistics)}
        events.append({
            "eventType": event_type, "eventTime": at.isoformat(), "producer": producer,
            "schemaURL": RUN_EVENT_SCHEMA, "run": run, "job": job, "inputs": inputs, "outputs": [output],
        })  # fmt: skip
    return json.loads(json.dumps(events))  # plain JSON values, no shared dicts between the two events


def event_file_name(manifest: Manifest) -> str:
    return f"{manifest.kind}-{manifest.name}-{manifest.id}.json"


def write_run_events(
    manifests: list[Manifest], folder: Path, store_root: Path
) -> tuple[list[Path], list[str]]:
    """Write each manifest's events to ``folder/<kind>-<name>-<id>.json`` (each file whole or not at
    all). Returns the files written and the references of manifests skipped because they were edited
    after publishing (the caller reports them)."""
    folder.mkdir(parents=True, exist_ok=True)
    written, edited = [], []
    for m in manifests:
        try:
            events = run_events(m, store_root)
        except VerificationError:
            edited.append(m.ref)
            continue
        path = folder / event_file_name(m)
        write_atomic(path, json.dumps(events, indent=2) + "\n")
        written.append(path)
    return written, edited
