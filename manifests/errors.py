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


class RunFailed(DistilleryError):
    """A run that could not finish for a reason outside the recipe: an endpoint that keeps
    failing, a budget reached, an interruption. What was done is kept (caches, markers)."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
