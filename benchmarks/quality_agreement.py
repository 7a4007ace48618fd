"""Heuristic quality filters vs datatrove: decision agreement and documents/s per core.

    .venv/bin/python benchmarks/quality_agreement.py [--docs 3000] [--seed 0] [--show 3] [--extra GLOB ...]

Builds one test set — the embedded sample (``examples/sample/web.jsonl``, ``notes/*.txt``) plus
seeded synthetic documents made to trip each rule, many of them near a threshold — and runs
every filter of ``corpus.quality`` (fast and datatrove-compatible word splitting) and the
corresponding datatrove filter on the same documents, in one process on one core. It prints,
per filter, how often the keep/drop decisions agree, the throughput of each, and which rule
pairs the disagreements fall under (``--show N`` prints N example documents of each).
datatrove is a benchmark dependency only; ``corpus.quality`` never imports it.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import random
import re
import time
from collections import Counter
from importlib.metadata import version
from pathlib import Path

import pyarrow as pa

ROOT = Path(__file__).resolve().parent.parent
REPEAT = 2  # timings are the best of this many runs (CPU time of this process, one thread)

# Our reason codes -> datatrove's, to report whether both sides drop for the same rule.
DATATROVE_REASONS = {
    "gopher_short_words": "gopher_below_avg_threshold",
    "gopher_long_words": "gopher_above_avg_threshold",
    "gopher_hash_ratio": "gopher_too_many_hashes",
    "gopher_ellipsis_ratio": "gopher_too_many_ellipsis",
    "gopher_bullet_lines": "gopher_too_many_bullets",
    "gopher_ellipsis_lines": "gopher_too_many_end_ellipsis",
    "gopher_alpha_ratio": "gopher_below_alpha_threshold",
    "gopher_few_stop_words": "gopher_enough_stop_words",
}


def datatrove_reason(reason: str) -> str:
    if reason in DATATROVE_REASONS or reason.startswith(("gopher_short_doc", "gopher_long_doc")):
        return DATATROVE_REASONS.get(reason, reason)
    reason = re.sub(r"^gopher_dup_(\d+)_gram$", r"duplicated_\1_n_grams", reason)
    return re.sub(r"^(gopher|c4|fineweb)_", "", reason)


# ---------------------------------------------------------------------------------------------
# The test set


def sample_documents() -> list[str]:
    sample = ROOT / "examples" / "sample"
    docs = [json.loads(line)["text"] for line in (sample / "web.jsonl").read_text().splitlines() if line]
    return docs + [p.read_text(encoding="utf-8") for p in sorted((sample / "notes").glob("*.txt"))]


FOREIGN = [
    "Der schnelle braune Fuchs springt über den faulen Hund. Es war einmal ein kleines Dorf am Fluss.",
    "Le renard brun rapide saute par-dessus le chien paresseux. Il était une fois un petit village.",
    "Быстрая коричневая лиса прыгает через ленивую собаку. Жила-была маленькая деревня у реки.",
    "敏捷的棕色狐狸跳过了懒狗。从前有一个小村庄。它位于河边，风景很美。",
    "El rápido zorro marrón salta sobre el perro perezoso. ¿Dónde está la biblioteca? ¡Qué día!",
    "Καλημέρα σας. Η γρήγορη καφέ αλεπού πηδάει πάνω από το τεμπέλικο σκυλί.",
    "Great trip 😀🎉 loved every minute ❤️ — would go again!!! 10/10 👍",
]
MENU = ["Home", "About us", "Contact", "Shop", "Blog", "Login", "Sign up", "FAQ", "Careers", "Cart (0)"]
NOISE = [
    "Please enable JavaScript in your browser to view this page.",
    "This site uses cookies. By continuing you accept our privacy policy.",
    "Read our terms of use before posting.",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.",
    "function init() { var x = document.getElementById('menu'); x.style.display = 'none'; }",
    "Click here to read more...",
    "Posted by admin | 12 comments | Share",
    "#travel #food #sunset #photooftheday #instagood",
    "https://example.com/a/very/long/path/with-many-segments-and-tracking?utm_source=newsletter&id=12345",
    "QmFzZTY0IGVuY29kZWQgZGF0YSBpcyBub3QgcHJvc2UgYW5kIHNob3VsZCBub3QgYmUgdHJhaW5lZCBvbg==",
    "| 2019 | 4,512 | 3.7% | 12.04 | -0.5 |",
    "Copyright © 2024 Example Ltd. All rights reserved.",
    "The Battle of Hastings was fought in 1066.[1] It changed England.[citation needed]",
    "Mr. Smith met Dr. Jones at 10 a.m. on Jan. 5, e.g. at the U.S. embassy.",
    "He said: \"don't go\" — and she didn't. We'll see, won't we?",
]


def sentences_from(docs: list[str]) -> list[str]:
    out = []
    for doc in docs:
        out += [s.strip() for s in re.split(r"(?<=[.!?])\s+", doc) if len(s.split()) >= 3]
    return out


def synthetic_documents(n: int, seed: int, pool: list[str]) -> list[str]:
    """Documents made of sample sentences with one or two kinds of noise, at random strength."""
    rng = random.Random(seed)

    def prose(k: int) -> list[str]:
        return [rng.choice(pool) for _ in range(k)]

    def paragraphs(sentences: list[str]) -> str:
        parts, i = [], 0
        while i < len(sentences):
            step = rng.randint(1, 4)
            parts.append(" ".join(sentences[i : i + step]))
            i += step
        return rng.choice(["\n", "\n\n"]).join(parts)

    def noisy(kind: str, base: list[str]) -> str:
        s = rng.random()
        if kind == "short":
            return " ".join(prose(rng.randint(1, 6)))
        if kind == "repeat_lines":
            line = rng.choice(base)
            return "\n".join(base + [line] * rng.randint(1, 8))
        if kind == "repeat_paragraph":
            para = " ".join(base[:3])
            return "\n\n".join([para] * rng.randint(2, 4) + [" ".join(base[3:])])
        if kind == "repeat_phrase":
            phrase = " ".join(rng.choice(pool).split()[: rng.randint(2, 7)])
            return (
                " ".join(base[:4]) + " " + " ".join([phrase] * rng.randint(2, 25)) + " " + " ".join(base[4:])
            )
        if kind == "menu":
            return "\n".join(rng.sample(MENU, rng.randint(3, 10)) + base[: rng.randint(0, 6)])
        if kind == "bullets":
            mark = rng.choice(["- ", "• ", "  - ", "* "])
            return "\n".join(mark + b for b in base) + ("\n" + base[0] if s < 0.5 else "")
        if kind == "ellipsis":
            cut = [
                b[: rng.randint(20, max(21, len(b)))].rstrip() + rng.choice(["...", "…", " ..."])
                for b in base
            ]
            keep = rng.randint(0, len(base))
            return "\n".join(base[:keep] + cut[keep:])
        if kind == "no_punct":
            return "\n".join(b.rstrip(".!?") for b in base)
        if kind == "noise_lines":
            lines = base + [rng.choice(NOISE) for _ in range(rng.randint(1, 6))]
            rng.shuffle(lines)
            return "\n".join(lines)
        if kind == "hashtags":
            return " ".join(base) + " " + " ".join(f"#{w.strip('.,')}" for w in rng.choice(pool).split()[:12])
        if kind == "numbers":
            rows = [" ".join(str(rng.randint(0, 9999)) for _ in range(rng.randint(3, 8))) for _ in range(10)]
            return paragraphs(base[: rng.randint(1, 8)]) + "\n" + "\n".join(rows)
        if kind == "keywords":
            words = [w.strip(".,;:") for w in " ".join(base).split() if w.lower() not in {"the", "and", "of"}]
            return ", ".join(words[: rng.randint(40, 200)])
        if kind == "punctuation":
            return " ".join(
                re.sub(r" ", lambda _: rng.choice([" ", ", ", " - ", " (", ") ", " ; ", "! "]), b)
                for b in base
            )
        if kind == "foreign":
            return (
                "\n".join(rng.choice(FOREIGN) for _ in range(rng.randint(1, 12))) + "\n" + " ".join(base[:2])
            )
        if kind == "verse":  # lines of a few long words: newlines per word near FineWeb's limit
            words = " ".join(base).split()
            lines, i = [], 0
            while i < len(words):
                step = rng.randint(3, 6)
                lines.append(" ".join(words[i : i + step]))
                i += step
            return "\n".join(lines)
        if kind == "few_sentences":  # near C4's five sentences, with abbreviations and ellipses
            extra = ["Mr. Brown agreed.", "See e.g. the map.", "It rained... then stopped.", "Wait. Go!"]
            return "\n".join(
                " ".join(base[i : i + 2] + [rng.choice(extra)]) for i in range(rng.randint(1, 4))
            )
        if kind == "whitespace":
            return (
                rng.choice(["", " ", "\n\n", "\t", "\u00a0"])
                + "\r\n".join(base)
                + rng.choice(["", "\n", " \n"])
            )
        return paragraphs(base)

    kinds = ["clean", "short", "repeat_lines", "repeat_paragraph", "repeat_phrase", "menu", "bullets"]
    kinds += ["ellipsis", "no_punct", "noise_lines", "hashtags", "numbers", "keywords", "punctuation"]
    kinds += ["foreign", "whitespace", "verse", "few_sentences"]
    docs = ["", "   ", "\n", "{}", "lorem ipsum"]
    while len(docs) < n:
        base = prose(rng.randint(3, 20))
        doc = noisy(rng.choice(kinds), base)
        if rng.random() < 0.3:  # a second kind of noise on top
            doc = doc + "\n" + noisy(rng.choice(kinds), prose(rng.randint(2, 8)))
        docs.append(doc)
    return docs[:n]


# ---------------------------------------------------------------------------------------------
# Running both sides


def run_ours(config, texts: list[str], batch_rows: int = 1000) -> tuple[list[str | None], float]:
    """Each document's drop reason (None: kept) and the CPU seconds the step took, ledger included."""
    batches = [
        pa.RecordBatch.from_pydict({"id": [str(i) for i in range(start, start + len(chunk))], "text": chunk})
        for start in range(0, len(texts), batch_rows)
        for chunk in [texts[start : start + batch_rows]]
    ]
    seconds = []
    for _ in range(REPEAT):  # a fresh step each time: its word cache starts cold
        step = config.build()
        started = time.process_time()
        for batch in batches:
            step(batch)
        seconds.append(time.process_time() - started)
    reasons: list[str | None] = [None] * len(texts)
    for entry in step.ledger:
        reasons[int(entry["id"])] = entry["reason"]
    return reasons, min(seconds)


def run_datatrove(make, texts: list[str]) -> tuple[list[str | None], float]:
    from datatrove.data import Document

    seconds = []
    for _ in range(REPEAT):
        step = make()
        docs = [Document(text=t, id=str(i)) for i, t in enumerate(texts)]  # C4 rewrites the text
        results = []
        started = time.process_time()
        for doc in docs:
            try:
                results.append(step.filter(doc))
            except ZeroDivisionError:
                results.append((False, "error"))
        seconds.append(time.process_time() - started)
    reasons: list[str | None] = []
    for result in results:
        kept, reason = result if isinstance(result, tuple) else (result, None)
        reasons.append(None if kept else (reason or "dropped"))
    return reasons, min(seconds)


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}, pyarrow {pa.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=3000, help="synthetic documents to add to the sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", type=int, default=0, help="example disagreeing documents to print")
    parser.add_argument(
        "--extra", nargs="*", default=[], help="glob(s) of text files to add (first 30k chars)"
    )
    args = parser.parse_args()
    pa.set_cpu_count(1)  # one core for both sides

    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )

    from corpus.quality import (
        C4QualityConfig,
        FineWebQualityConfig,
        GopherQualityConfig,
        GopherRepetitionConfig,
    )

    sample = sample_documents()
    texts = sample + synthetic_documents(args.docs, args.seed, sentences_from(sample))
    extra = sorted(
        {p for pattern in args.extra for p in glob.glob(pattern, recursive=True) if Path(p).is_file()}
    )
    texts += [Path(p).read_text(encoding="utf-8", errors="replace")[:30_000] for p in extra]
    print(f"machine: {machine()}, datatrove {version('datatrove')}")
    print(
        f"documents: {len(texts)}: {len(sample)} sample, {args.docs} synthetic (seed {args.seed}), {len(extra)} extra"
    )
    print("one core; docs/s of each step over the same documents; x = ours / datatrove\n")
    print(
        f"{'filter':<18} {'agree fast':>10} {'agree compat':>12} {'datatrove/s':>11} {'fast/s':>8} {'x':>6}"
        f" {'compat/s':>8} {'x':>6} {'dropped':>8}"
    )
    pairs = [
        ("gopher_quality", GopherQualityConfig, GopherQualityFilter),
        ("gopher_repetition", GopherRepetitionConfig, GopherRepetitionFilter),
        ("c4_quality", C4QualityConfig, C4QualityFilter),
        ("fineweb_quality", FineWebQualityConfig, FineWebQualityFilter),
    ]
    details = []
    for name, config, reference in pairs:
        theirs, seconds = run_datatrove(reference, texts)
        reference_speed = len(texts) / seconds
        agree, speed = {}, {}
        for mode in ("fast", "datatrove"):
            ours, seconds = run_ours(config(tokenizer=mode), texts)
            speed[mode] = len(texts) / seconds
            differ = [
                i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if (a is None) != (b is None)
            ]
            agree[mode] = 1 - len(differ) / len(texts)
            both = [i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a and b]
            same_reason = sum(datatrove_reason(ours[i]) == theirs[i] for i in both) / max(len(both), 1)
            parts = {"sample": range(len(sample)), "synthetic": range(len(sample), len(texts) - len(extra))}
            parts["extra"] = range(len(texts) - len(extra), len(texts))
            by_part = {
                part: 1 - sum(i in rows for i in differ) / len(rows) for part, rows in parts.items() if rows
            }
            pairs_seen = Counter(
                (datatrove_reason(ours[i]) if ours[i] else "keep", theirs[i] or "keep") for i in differ
            )
            details.append((name, mode, by_part, same_reason, pairs_seen))
            for i in differ[: args.show]:
                print(f"--- {name} [{mode}] ours {ours[i]} / datatrove {theirs[i]}\n{texts[i][:600]!r}")
        print(
            f"{name:<18} {agree['fast']:>10.2%} {agree['datatrove']:>12.2%} {reference_speed:>11.0f}"
            f" {speed['fast']:>8.0f} {speed['fast'] / reference_speed:>5.1f}x {speed['datatrove']:>8.0f}"
            f" {speed['datatrove'] / reference_speed:>5.1f}x {sum(r is not None for r in theirs):>8}"
        )
    print("\nper mode: agreement on each part of the set, same rule where both drop, and the disagreements")
    print("(our rule in datatrove's words / datatrove's rule: documents)")
    for name, mode, by_part, same_reason, pairs_seen in details:
        listed = ", ".join(f"{a} / {b}: {k}" for (a, b), k in pairs_seen.most_common(6)) or "none"
        parts = ", ".join(f"{part} {value:.2%}" for part, value in by_part.items())
        print(f"  {name} [{mode}]: {parts}; same rule {same_reason:.2%}; {listed}")


if __name__ == "__main__":
    main()
