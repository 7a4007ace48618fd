"""One console for the command line: plain text when piped, wide enough not to crop trees."""

from __future__ import annotations

from rich.console import Console


def make_console(stderr: bool = False) -> Console:
    console = Console(highlight=False, soft_wrap=True, stderr=stderr)
    if not console.is_terminal:
        # Piped output (logs, tests, `| grep`): do not crop lineage trees at 80 columns.
        console = Console(highlight=False, soft_wrap=True, stderr=stderr, width=200)
    return console
