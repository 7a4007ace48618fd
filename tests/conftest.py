from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from manifests.cli import main
from manifests.store import Store

ROOT = Path(__file__).resolve().parent.parent


def _one_thread_per_worker() -> None:
    """Under pytest-xdist (``make test`` runs 2 workers on 2 cores) torch gets one thread in each worker
    and in every process a test starts (they inherit the environment): threads beyond the cores spin
    waiting for descheduled peers (on a busy machine the demo's chain took 245 CPU seconds with 2
    threads, 114 with one). Set here, before anything imports torch (nothing above does), so that torch
    reads it; an explicit setting is kept."""
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(name, "1")


_one_thread_per_worker()


@pytest.fixture(autouse=True)
def _project_cwd(monkeypatch):
    # Recipes name their inputs relative to the project root, as `make demo` runs them.
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("DISTILLERY_STORE", raising=False)


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "store")


SMOLLM2 = "smollm2-135m-instruct"
"""The run ``train import-model`` makes with its defaults (the demo's teacher)."""


@pytest.fixture(scope="session")
def imported_smollm2(tmp_path_factory) -> Store:
    """A store holding SmolLM2-135M-Instruct as ``train import-model`` imports it (its defaults: the demo's
    teacher), imported once for the session: dequantising the GGUF takes most of a minute. Tests that use
    it are marked ``xdist_group("smollm2")``, so that one worker of ``make test`` imports it, once."""
    imported = Store(tmp_path_factory.mktemp("smollm2") / "store")
    assert main(["--store", str(imported.root), "train", "import-model"]) == 0
    return imported


def add_imported_smollm2(imported: Store, store: Store) -> Store:
    """``store`` with the imported SmolLM2 run in it (its weights hard-linked, not copied)."""
    import shutil

    def link_large(src: str, dst: str) -> None:
        # Only the big weight files are shared; small ones (manifest, history) stay the test's own.
        if os.path.getsize(src) > 1 << 20:
            os.link(src, dst)
        else:
            shutil.copy2(src, dst)

    shutil.copytree(
        imported.name_dir("run", SMOLLM2), store.name_dir("run", SMOLLM2), copy_function=link_large
    )
    return store


@pytest.fixture
def smollm2(store, imported_smollm2) -> Store:
    """The test's own ``store`` with the imported SmolLM2 run in it."""
    return add_imported_smollm2(imported_smollm2, store)


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


TINY_SPECIAL = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>", "system", "user", "assistant"]
TINY_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def tiny_tokenizer(words: list[str] | None = None):
    """A word-level tokenizer (``TINY_SPECIAL`` then ``words``) with a ChatML-like template, for tiny models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(TINY_SPECIAL + (WORDS if words is None else words))}
    model = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    model.decoder = decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=model, pad_token="<pad>", eos_token="<|im_end|>", unk_token="<unk>",
        additional_special_tokens=["<|im_start|>"],
    )  # fmt: skip
    tokenizer.chat_template = TINY_TEMPLATE
    return tokenizer


def assert_cache_faults_are_one_line(cli, store: Store, recipe_for, monkeypatch) -> None:
    """A damaged request cache, then one locked by another process, each end a synth run in one line
    (``recipe_for(url)`` writes the run's recipe for an endpoint)."""
    import functools
    import sqlite3

    from synth.cache import RequestCache
    from synth.serve import start_server

    cache = store.root / "cache" / "synth.sqlite"
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_bytes(b"not a database, " * 64)
    result = cli("--store", store.root, "synth", "generate", recipe_for("http://127.0.0.1:9/v1"))
    assert_one_line_error(result, code=1)
    assert "synth.sqlite: file is not a database" in result.err and "move it away" in result.err

    cache.unlink()
    RequestCache(cache).close()
    holder = sqlite3.connect(cache, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # as another process in a long write would
    # A short busy timeout: the run must give up with the one line, not wait for the lock for ever.
    monkeypatch.setattr(sqlite3, "connect", functools.partial(sqlite3.connect, timeout=0.1))
    try:
        with start_server("echo") as server:
            result = cli("--store", store.root, "synth", "generate", recipe_for(server.url))
    finally:
        holder.close()
    assert_one_line_error(result, code=1)
    assert "database is locked" in result.err and "another process holds it" in result.err
