"""Long real documents found on this machine: man pages, Python docstrings, Rust books, text files.

Each source yields ``(name, text)`` pairs, in a fixed order (sorted paths), so two machines with the
same files yield the same documents. Long texts are cut at blank lines into pieces of about
``PIECE`` characters, the size of a web page's main text (the issue's corpus averaged ~5,700).
Nothing here dedupes: ``make_real.py`` does, without any of the project's code.

    .venv/bin/python benchmarks/dedup/real_text.py          # counts and sizes per source
"""

from __future__ import annotations

import gzip
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

MIN_CHARS = 1_000
PIECE = 6_000
MAX_FILE = 2_000_000

# ------------------------------------------------------------------------------------ man pages

_ROFF_TEXT_MACROS = {"SH", "SS", "B", "I", "BR", "BI", "IB", "IR", "RB", "RI", "SM", "SB", "IP", "Nm", "Nd"}
_ROFF_BREAK_MACROS = {"PP", "P", "LP", "sp", "SH", "SS", "IP", "TP", "HP", "Pp"}
_ROFF_GLYPHS = {"em": "—", "en": "–", "bu": "•", "aq": "'", "dq": '"', "lq": "“", "rq": "”", "co": "©",
                "oq": "‘", "cq": "’", "mi": "-", "hy": "-", "ti": "~", "ha": "^", "rs": "\\", "->": "→"}  # fmt: skip
_ROFF_CHARS = {"-": "-", "e": "\\", "\\": "\\", " ": " ", "~": " ", "0": " ", "'": "'", "`": "`"}
_ROFF_ESCAPE = re.compile(
    r'\\(?:"(.*)$|f(?:\(..|\[[^\]]*\]|.)|\((..)|\[([^\]]*)\]|\*(?:\(..|\[[^\]]*\]|.)|s[+-]?\d+|(.))'
)


def _roff_escape(m: re.Match) -> str:
    if m.group(1) is not None:  # a comment to the end of the line
        return ""
    glyph = m.group(2) or m.group(3)
    if glyph is not None:
        return _ROFF_GLYPHS.get(glyph, "")
    return _ROFF_CHARS.get(m.group(4), "") if m.group(4) else ""  # fonts, strings, sizes: nothing


def roff_to_text(source: str) -> str:
    """The running text of a man page, crudely: requests dropped, font and glyph escapes resolved."""
    out: list[str] = []
    skipping = False
    for line in source.splitlines():
        if skipping:  # inside a macro definition (.de ... ..)
            skipping = line.strip() != ".."
            continue
        if line.startswith((".", "'")):
            name, _, args = line[1:].strip().partition(" ")
            if name in ("de", "de1", "am", "ig"):
                skipping = True
            if name in _ROFF_BREAK_MACROS:
                out.append("")
            if name not in _ROFF_TEXT_MACROS or not args:
                continue
            args = [part.strip('"') for part in re.findall(r'"[^"]*"|\S+', args)]
            line = args[0] if name == "IP" else " ".join(args)  # IP's second argument is an indent
        line = re.sub(r"\\[{}]\\?", "", line)
        out.append(_ROFF_ESCAPE.sub(_roff_escape, line))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


def man_pages() -> Iterator[tuple[str, str]]:
    """English man pages (sections 1-8); ``.so`` redirections skipped."""
    for path in sorted(Path("/usr/share/man").glob("man[1-8]/*.gz")):
        try:
            source = gzip.decompress(path.read_bytes()).decode("utf-8", "replace")
        except (OSError, EOFError):
            continue
        if source.lstrip().startswith(".so ") or len(source) > MAX_FILE:
            continue
        yield str(path), roff_to_text(source)


# ------------------------------------------------------------------------------- Python sources

_TRIPLE_QUOTED = re.compile(r'"""(.*?)"""|\'\'\'(.*?)\'\'\'', re.S)


def _python_roots() -> list[Path]:
    roots = sorted(Path("/root/.pyenv/versions").glob("*/lib/python*")) + sorted(
        Path("/usr/lib").glob("python3*")
    )
    return roots + [Path(sys.prefix) / "lib"]


def python_docstrings() -> Iterator[tuple[str, str]]:
    """Per module: its triple-quoted strings of 20+ words (docstrings, mostly), joined by blank lines.

    Python's standard library comes in several versions here (pyenv), so many modules are
    near-copies of each other: the dedup step keeps one of each.
    """
    for root in _python_roots():
        for path in sorted(root.rglob("*.py")):
            try:
                source = path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            if len(source) > MAX_FILE:
                continue
            strings = [a or b for a, b in _TRIPLE_QUOTED.findall(source)]
            text = "\n\n".join(s.strip() for s in strings if len(s.split()) >= 20)
            if text:
                yield str(path), text


# ------------------------------------------------------------------------------------ Rust docs

_RUST_DOCS = "/root/.rustup/toolchains/*/share/doc/rust/html"
_RUST_BOOKS = ["book", "reference", "nomicon", "cargo", "rust-by-example", "edition-guide", "unstable-book",
               "rustc", "embedded-book", "error_codes", "rustdoc", "style-guide", "clippy"]  # fmt: skip


def rust_docs() -> Iterator[tuple[str, str]]:
    """The main text of the Rust books' pages and of the ``std`` API pages (stable and nightly)."""
    import lxml.html

    for html in sorted(Path("/").glob(_RUST_DOCS.lstrip("/"))):
        pages = [p for book in _RUST_BOOKS for p in sorted((html / book).rglob("*.html"))]
        pages += sorted((html / "std").rglob("*.html"))
        for path in pages:
            if (
                path.name in ("print.html", "toc.html", "404.html", "all.html")
                or path.stat().st_size > MAX_FILE
            ):
                continue
            try:
                tree = lxml.html.fromstring(path.read_bytes())
            except ValueError:
                continue
            main = tree.xpath('//main | //section[@id="main-content"]')
            if main:
                for junk in main[0].xpath(".//script | .//style | .//nav"):
                    junk.drop_tree()
                yield str(path), re.sub(r"\n\s*\n\s*", "\n\n", main[0].text_content()).strip()


# ----------------------------------------------------------------------------------- text files

_TEXT_GLOBS = [
    ("/usr/share/doc", ["**/*.txt", "**/*.md", "**/*.rst", "**/README*", "**/NEWS*", "**/*.txt.gz",
                        "**/NEWS*.gz", "**/changelog.gz", "**/README*.gz"]),
    ("/usr/share/vim", ["*/doc/*.txt"]),
    ("/usr/share", ["cmake-*/Help/**/*.rst"]),
    ("/usr/lib/node_modules", ["**/*.md"]),
    (sys.prefix + "/lib", ["python*/site-packages/*.dist-info/METADATA"]),
    ("/root/.pyenv/versions", ["*/lib/python*/site-packages/*.dist-info/METADATA"]),
]  # fmt: skip


def text_files() -> Iterator[tuple[str, str]]:
    """Plain-text documentation: /usr/share/doc, Vim's help, CMake's help, READMEs, package METADATA."""
    for root, patterns in _TEXT_GLOBS:
        paths = sorted({p for pattern in patterns for p in Path(root).glob(pattern) if p.is_file()})
        for path in paths:
            raw = path.read_bytes() if path.stat().st_size <= MAX_FILE else b""
            if path.suffix == ".gz":
                try:
                    raw = gzip.decompress(raw)
                except (OSError, EOFError):
                    continue
            if b"\0" in raw[:4096]:
                continue
            yield str(path), raw.decode("utf-8", "replace")


SOURCES: dict[str, Callable[[], Iterator[tuple[str, str]]]] = {
    "man": man_pages,
    "python": python_docstrings,
    "rust": rust_docs,
    "text": text_files,
}


def pieces(text: str, size: int = PIECE) -> list[str]:
    """The text cut at blank lines into pieces of about ``size`` characters (at least MIN_CHARS)."""
    text = text.strip()
    if len(text) < MIN_CHARS:
        return []
    if len(text) <= 2 * size:
        return [text]
    blocks = re.split(r"\n\s*\n", text)
    # A block without blank lines (a code listing, a changelog) is cut at line ends instead.
    blocks = [part for block in blocks for part in (block.split("\n") if len(block) > 2 * size else [block])]
    out, current = [], ""
    for paragraph in blocks:
        current = f"{current}\n\n{paragraph}" if current else paragraph
        if len(current) >= size:
            out.append(current)
            current = ""
    if current:
        if len(current) < MIN_CHARS and out:
            out[-1] = f"{out[-1]}\n\n{current}"
        else:
            out.append(current)
    return [piece for piece in out if len(piece) <= 4 * size]  # not one endless line (minified data)


def documents(sources: list[str]) -> Iterator[tuple[str, str, str]]:
    """``(source, name#piece, text)`` for every piece of every document of the given sources."""
    for source in sources:
        for name, text in SOURCES[source]():
            for i, piece in enumerate(pieces(text)):
                yield source, f"{name}#{i}", piece


def main() -> None:
    import time

    for source in SOURCES:
        start, count, chars = time.perf_counter(), 0, 0
        for _, _, text in documents([source]):
            count, chars = count + 1, chars + len(text)
        print(f"{source:8} {count:7,} pieces  {chars / max(count, 1):7,.0f} chars each  "
              f"{time.perf_counter() - start:6.1f} s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
