"""The hashed keys a build compares documents by: id, normalised text and URL, as fixed-width columns.

Phase 1 appends them to every task file (``add_keys``, in the worker where the text already is);
phase 2 compares them as NumPy arrays (``key_values``) without reading a text; a dedup index stores
the same text keys (``text_keys``), so indexed and new documents compare. A leaf module: the
combiner, the dedup index and the build all read the keys from here.

    id "web/00017"  ->  _id_key  8 bytes  (blake2b-64 of the id)
    text            ->  _dedup_key 16 bytes (blake2b-128 of the normalised text, ``corpus.steps.normalise``:
                                         whitespace and case, or with ``normalize: simplify`` its words)
    source.url      ->  _url_key 8 bytes  (blake2b-64 of the normalised URL; zero without one)
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from corpus.crawl_policy import normalise_url
from corpus.lines import UNIT_KEYS
from corpus.steps import TextNormalization, normalise

ID_KEY = "_id_key"
DEDUP_KEY = "_dedup_key"
URL_KEY = "_url_key"
MINHASH_KEYS = "_minhash_keys"
KEY_COLUMNS = (ID_KEY, DEDUP_KEY, URL_KEY)
"""Hidden columns phase 1 adds to its task files; they never reach the published shards."""
HIDDEN_COLUMNS = (*KEY_COLUMNS, UNIT_KEYS, MINHASH_KEYS)
"""Every column the build adds for its own use (an input field of one of these names is refused)."""
KEY128 = np.dtype([("hi", ">u8"), ("lo", ">u8")])
"""A 16-byte text key as NumPy sees it: two big-endian halves, ``hi`` picks the hash partition."""


def url_key(url: str | None) -> bytes:
    """8 bytes per normalised URL; zero for a document without one (never a duplicate)."""
    if not url:
        return bytes(8)
    try:
        url = normalise_url(url)
    except ValueError:
        url = url.strip()
    return hashlib.blake2b(url.encode(), digest_size=8).digest() or bytes(8)


def text_key_bytes(normalised: list[str]) -> bytes:
    """16-byte keys of normalised texts, concatenated: exact dedup and dedup indexes share them."""
    return b"".join(
        hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=16).digest() for t in normalised
    )


def fixed_binary(values: bytes, width: int, n: int) -> pa.Array:
    """``n`` concatenated ``width``-byte keys as a ``fixed_size_binary(width)`` array (no copy)."""
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), n, [None, pa.py_buffer(values)])


def text_keys(texts: pa.Array | pa.ChunkedArray, case_fold: bool, normalize: TextNormalization) -> pa.Array:
    """The 16-byte exact-dedup key of each text, after the build's normalisation."""
    normal = normalise(texts, case_fold, normalize).to_pylist()
    return fixed_binary(text_key_bytes(normal), 16, len(normal))


def add_keys(batch: pa.RecordBatch, case_fold: bool, normalize: TextNormalization) -> pa.RecordBatch:
    """Append the id, text and URL keys (computed in the worker, where the text already is)."""
    n = batch.num_rows
    ids = batch.column("id").to_pylist()
    has_source = "source" in batch.schema.names
    urls = pc.struct_field(batch.column("source"), "url").to_pylist() if has_source else [None] * n
    id_keys = b"".join(hashlib.blake2b(i.encode(), digest_size=8).digest() for i in ids)
    url_keys = b"".join(url_key(u) for u in urls)
    batch = batch.append_column(ID_KEY, fixed_binary(id_keys, 8, n))
    batch = batch.append_column(DEDUP_KEY, text_keys(batch.column("text"), case_fold, normalize))
    return batch.append_column(URL_KEY, fixed_binary(url_keys, 8, n))


def key_values(column: pa.Array | pa.ChunkedArray, dtype: np.dtype) -> np.ndarray:
    """A key column as a NumPy array of ``dtype`` (``>u8`` for 8-byte keys, ``KEY128``), copied."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    width = array.type.byte_width
    return np.frombuffer(
        array.buffers()[1], dtype=dtype, count=len(array), offset=array.offset * width
    ).copy()
