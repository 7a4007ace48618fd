"""HTML → main text with trafilatura, bounded in time and size so one page cannot stall a worker.

    text, reason = extract_html(payload, content_type="text/html; charset=utf-8", limits=ExtractLimits())
    # ("Bread\\nBake the bread slowly…", None)  or  (None, "extract_timeout")

Failures come back as reason codes for the ledger, never as exceptions.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from manifests.time_limit import TimeLimitExceeded, call_with_time_limit

_CHARSET = re.compile(r"charset=[\"']?([A-Za-z0-9_.:-]+)", re.IGNORECASE)


@dataclass(frozen=True)
class ExtractLimits:
    max_bytes: int = 2_000_000
    """Pages larger than this are skipped (``too_large``): boilerplate removal is super-linear."""
    timeout_s: float = 5.0
    """Wall time one page may take; past it the page is skipped (``extract_timeout``)."""
    min_chars: int = 1
    """Extracted text shorter than this counts as empty (``extract_empty``)."""


def decode_html(payload: bytes, content_type: str | None) -> str:
    """Bytes → str with the declared charset, falling back to UTF-8; invalid bytes are replaced."""
    charset = None
    if content_type:
        match = _CHARSET.search(content_type)
        charset = match.group(1) if match else None
    if charset is None:
        head = payload[:2048].decode("ascii", errors="ignore")
        match = _CHARSET.search(head)
        charset = match.group(1) if match else "utf-8"
    try:
        return payload.decode(charset, errors="replace")
    except LookupError:
        return payload.decode("utf-8", errors="replace")


def extract_html(
    payload: bytes, content_type: str | None, limits: ExtractLimits
) -> tuple[str | None, str | None]:
    """(text, None) or (None, reason): ``too_large``, ``extract_timeout``, ``extract_error``, ``extract_empty``."""
    if len(payload) > limits.max_bytes:
        return None, "too_large"
    import trafilatura

    # Its per-page parser complaints are our ledger's reasons; they need not flood the console.
    logging.getLogger("trafilatura").setLevel(logging.CRITICAL)
    html = decode_html(payload, content_type)
    try:
        text = call_with_time_limit(
            lambda: trafilatura.extract(html, include_comments=False, include_tables=True, deduplicate=False),
            limits.timeout_s,
        )
    except TimeLimitExceeded:
        return None, "extract_timeout"
    except Exception:  # noqa: BLE001 - a parser failure on one hostile page is data, not a crash
        return None, "extract_error"
    if not text or len(text.strip()) < limits.min_chars:
        return None, "extract_empty"
    return text, None
