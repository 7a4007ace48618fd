"""User-facing errors: one clear line naming the thing and the fix, never a traceback."""

from __future__ import annotations


class DistilleryError(Exception):
    """A mistake in what the user gave us (input, recipe, reference, tampered data).

    The CLI prints ``error: <message>`` and exits non-zero; anything else is a bug and keeps its
    traceback.
    """

    exit_code = 2


class VerificationError(DistilleryError):
    """A published artefact no longer matches its manifest (missing, extra or altered files)."""

    exit_code = 1
