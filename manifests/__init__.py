"""The contract between Distillery's stages: manifests, the store, records, ledgers and lineage.

Every stage reads manifests and publishes exactly one new one. A manifest is content-addressed
(its id is a hash over its files, schema, parents and resolved recipe), names its parents and
its producer, and is published last and atomically into the store.
"""

from manifests.errors import DistilleryError
from manifests.schema import FileEntry, Manifest, Producer

__all__ = ["DistilleryError", "FileEntry", "Manifest", "Producer"]
__version__ = "0.1.0"
