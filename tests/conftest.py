from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from manifests.cli import main
from manifests.store import Store

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _project_cwd(monkeypatch):
    # Recipes name their inputs relative to the project root, as `make demo` runs them.
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("DISTILLERY_STORE", raising=False)


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "store")


class CliResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err


@pytest.fixture
def cli(capsys):
    def run(*args: str) -> CliResult:
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def assert_one_line_error(result, code: int = 2) -> None:
    """A user's mistake: one ``error:`` line, the exit code, no traceback."""
    assert result.code == code, (result.code, result.err)
    assert result.err.startswith("error: ") and len(result.err.strip().splitlines()) == 1, result.err
    assert "Traceback" not in result.err


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_recipe(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def corpus_recipe(tmp_path: Path, source: Path, name: str = "c", extra: str = "") -> Path:
    return write_recipe(
        tmp_path / f"{name}.yaml",
        f"stage: corpus.build\nname: {name}\ninputs:\n  - {{path: {source}, format: jsonl}}\nsteps: [{{type: min_words, min_words: 3}}]\n{extra}",
    )


WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
]


def docs(n: int, offset: int = 0) -> list[dict]:
    return [{"text": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(6)) + f" doc{i + offset}", "url": f"https://x.example/{i}"}
            for i in range(n)]  # fmt: skip


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
