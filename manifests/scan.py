"""A dataset's rows as a polars lazy frame, for aggregates over the whole dataset in bounded memory.

    frame = scan_rows(manifest)                 # after ensure_verified(manifest)
    frame.select(pl.col("text").str.len_chars().sum()).collect(engine="streaming")

polars reads no published file itself: its own Parquet reader checks no page checksums, so a byte
that rots inside a page of a shard whose size and time are unchanged (which verification trusts)
would be aggregated as other rows. The frame's source is ``manifests.data.shard_batches`` (the
checksum-checking reader), one record batch at a time, handed to polars without a copy; a damaged
page ends the query with ``unreadable_shard``'s one line. polars pushes the columns a query needs
down to that reader, so only those are read.

polars is imported here, inside the functions: it is heavy to import and only these readers use it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from manifests.data import shard_batches, unreadable_shard
from manifests.schema import Manifest

if TYPE_CHECKING:
    import polars as pl

_BATCH_ROWS = 8192
"""Rows handed to polars at a time (its own hint, 100,000 rows of text, doubled the peak memory)."""


def data_schema(manifest: Manifest) -> pa.Schema | None:
    """The Arrow schema of a dataset's shards (every shard of an artefact has it); None without any."""
    files = manifest.data_files()
    if not files:
        return None
    path = manifest.location / files[0].path
    try:
        return pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        raise unreadable_shard(path, e, manifest.ref) from None


def scan_rows(
    manifest: Manifest, schema: pa.Schema | None = None, columns: list[str] | None = None
) -> pl.LazyFrame:
    """Every data row of ``manifest`` in file order, as a lazy frame streamed from the checked reader:
    all its columns, or those of ``columns`` it has (a query reads no other, and a column of a type
    polars lacks is no obstacle unless named).

    The caller verifies the manifest first (``ensure_verified``); a dataset without files is an empty
    frame of ``schema``.
    """
    import polars as pl
    from polars.io.plugins import register_io_source

    schema = schema if schema is not None else data_schema(manifest)
    if schema is not None and columns is not None:
        schema = pa.schema([f for f in schema if f.name in columns])
    empty = pl.from_arrow((schema or pa.schema([])).empty_table())
    assert isinstance(empty, pl.DataFrame)
    paths = [manifest.location / f.path for f in manifest.data_files()]

    def batches(
        columns: list[str] | None, predicate: pl.Expr | None, n_rows: int | None, batch_size: int | None
    ) -> Iterator[pl.DataFrame]:
        left = n_rows  # batch_size, polars' hint, is not taken: see _BATCH_ROWS
        for path in paths:
            for batch in shard_batches(path, manifest.ref, batch_size=_BATCH_ROWS, columns=columns):
                frame = pl.from_arrow(batch)
                assert isinstance(frame, pl.DataFrame)
                if predicate is not None:
                    frame = frame.filter(predicate)
                if left is not None:
                    frame = frame.head(left)
                    left -= frame.height
                yield frame
                if left == 0:
                    return

    return register_io_source(batches, schema=empty.schema, is_pure=True, explain_name=manifest.ref)
