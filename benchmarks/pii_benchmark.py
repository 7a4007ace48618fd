"""PII detection: Distillery's ``pii`` step against presidio's default AnalyzerEngine, same documents.

Generates labelled web-like documents (``benchmarks/pii_data.py``, seeded), then measures

- the ``pii`` step with its default config (the pattern types): throughput of ``transform`` over
  Arrow batches, and span-level precision / recall / F1 of what it found, on every document;
- presidio's default ``AnalyzerEngine`` (every predefined recogniser, spaCy ``en_core_web_sm``
  through ``NlpEngineProvider``): one ``analyze`` call per document, as users call it, on the first
  ``--presidio-docs`` documents (it is ~100× slower; the step is scored on that subset too);
- the ``pii`` step with PERSON and LOCATION added (presidio NER on selected sentences), same subset.

A finding counts as correct only with exact boundaries and type. Presidio's results of other types
(DATE_TIME, NRP, US_BANK_NUMBER…) are out of scope and ignored; its in-scope results are scored as
returned (the default score threshold is 0). Throughput is single-process: docs/s is per core, and
docs per CPU-second is shown beside it. Run::

    .venv/bin/python benchmarks/pii_benchmark.py            # ~1–2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time
from collections import Counter
from pathlib import Path

# One thread per BLAS/OpenMP pool, so "per core" means one core for both engines.
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyarrow as pa  # noqa: E402

from benchmarks.pii_data import FILLER, NER_TYPES, PATTERN_TYPES, Document, generate  # noqa: E402
from corpus.pii import DEFAULT_NER_MODEL, PiiConfig, ner_sentences, use_bundled_public_suffix_list  # noqa: E402

PRESIDIO_TYPES = {"EMAIL_ADDRESS": "EMAIL", "URL": "URL", "PHONE_NUMBER": "PHONE", "CREDIT_CARD": "CREDIT_CARD",
                  "IBAN_CODE": "IBAN", "US_SSN": "SSN", "IP_ADDRESS": "IP_ADDRESS", "PERSON": "PERSON",
                  "LOCATION": "LOCATION"}  # fmt: skip

Spans = list[set[tuple[int, int, str]]]


def score(gold: Spans, found: Spans, types: tuple[str, ...]) -> dict[str, tuple[float, float, float, int]]:
    """Precision, recall, F1 and gold support per type and over ``types`` (micro-averaged)."""
    tp, fp, fn = Counter(), Counter(), Counter()
    for g, f in zip(gold, found, strict=True):
        g = {s for s in g if s[2] in types}
        f = {s for s in f if s[2] in types}
        for s in g & f:
            tp[s[2]] += 1
        for s in f - g:
            fp[s[2]] += 1
        for s in g - f:
            fn[s[2]] += 1
    out = {}
    for t in (*types, "overall"):
        a, b, c = (sum(x.values()) for x in (tp, fp, fn)) if t == "overall" else (tp[t], fp[t], fn[t])
        p = a / (a + b) if a + b else 1.0
        r = a / (a + c) if a + c else 1.0
        out[t] = (p, r, 2 * p * r / (p + r) if p + r else 0.0, a + c)
    return out


def timed(fn, repeat: int = 1) -> tuple[float, float, object]:
    """Best wall and CPU seconds over ``repeat`` runs, and the last result."""
    best_wall = best_cpu = float("inf")
    result = None
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return best_wall, best_cpu, result


def make_batches(docs: list[Document], rows: int) -> list[pa.RecordBatch]:
    return [
        pa.RecordBatch.from_pydict(
            {"id": [f"doc-{k + i}" for i in range(len(chunk))], "text": [d.text for d in chunk]}
        )
        for k in range(0, len(docs), rows)
        for chunk in [docs[k : k + rows]]
    ]


def presidio_engine():
    use_bundled_public_suffix_list()
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import NlpEngineProvider

    provider = NlpEngineProvider(
        nlp_configuration={
            "nlp_engine_name": "spacy",
            "models": [{"lang_code": "en", "model_name": DEFAULT_NER_MODEL}],
        }
    )
    return AnalyzerEngine(nlp_engine=provider.create_engine())


def table(title: str, rows: dict[str, dict], types: tuple[str, ...]) -> str:
    names = list(rows)
    head = f"| {title} | " + " | ".join(f"{n} P / R / F1" for n in names) + " |"
    lines = [head, "|" + " --- |" * (len(names) + 1)]
    for t in (*types, "overall"):
        cells = []
        for n in names:
            p, r, f, support = rows[n][t]
            cells.append(
                f"{p:.3f} / {r:.3f} / **{f:.3f}**" if t == "overall" else f"{p:.3f} / {r:.3f} / {f:.3f}"
            )
        lines.append(f"| {t} ({rows[names[0]][t][3]}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=3000, help="labelled documents generated")
    parser.add_argument(
        "--presidio-docs", type=int, default=600, help="documents presidio analyses (a prefix)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    docs = generate(args.docs, seed=args.seed)
    subset = docs[: args.presidio_docs]
    chars = sum(len(d.text) for d in docs)
    gold = [set(d.spans) for d in docs]
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}")  # fmt: skip
    print(f"documents: {len(docs)} (seed {args.seed}), {chars / len(docs):.0f} chars on average, "
          f"gold spans: {dict(sorted(Counter(s[2] for g in gold for s in g).items()))}")  # fmt: skip

    # --- Distillery, pattern types (the default config), every document -----------------------------
    step, batches = PiiConfig().build(), make_batches(docs, 1000)
    wall, cpu, _ = timed(lambda: [step.transform(b) for b in batches], repeat=3)
    ours = [set(s) for s in step.find([d.text for d in docs])]
    candidates = sum(len(step.detect(b.column("text"))[0]) for b in batches)
    ours_rate, ours_cpu_rate = len(docs) / wall, len(docs) / cpu
    print(f"\npii step (pattern types): {ours_rate:,.0f} docs/s ({ours_rate * chars / len(docs) / 1e6:.1f} M chars/s), "
          f"{ours_cpu_rate:,.0f} docs per CPU-second; {candidates / len(docs):.0%} of documents pass the prefilter")  # fmt: skip
    print(table("type (gold)", {"pii step, all docs": score(gold, ours, PATTERN_TYPES)}, PATTERN_TYPES))

    # Prose without a candidate (no digit groups, '@', domains): what the column prefilter saves.
    rng = random.Random(args.seed)
    plain = [Document(" ".join(rng.choice(FILLER) for _ in range(8))) for _ in range(len(docs))]
    plain_batches = make_batches(plain, 1000)
    pw, pc_, _ = timed(lambda: [step.transform(b) for b in plain_batches], repeat=3)
    print(
        f"\nprose without candidates: {len(plain) / pw:,.0f} docs/s, {len(plain) / pc_:,.0f} docs per CPU-second"
    )

    # --- presidio default AnalyzerEngine, subset ------------------------------------------------------
    t0 = time.perf_counter()
    engine = presidio_engine()
    load_s = time.perf_counter() - t0
    engine.analyze("warm up with jane@example.com", language="en")
    p_wall, p_cpu, results = timed(lambda: [engine.analyze(d.text, language="en") for d in subset])
    presidio_found = [{(r.start, r.end, PRESIDIO_TYPES[r.entity_type]) for r in res if r.entity_type in PRESIDIO_TYPES}
                      for res in results]  # fmt: skip
    presidio_05 = [{(r.start, r.end, PRESIDIO_TYPES[r.entity_type]) for r in res
                    if r.entity_type in PRESIDIO_TYPES and r.score >= 0.5} for res in results]  # fmt: skip
    p_rate, p_cpu_rate = len(subset) / p_wall, len(subset) / p_cpu

    # --- Distillery with NER types, subset --------------------------------------------------------------
    ner_config = PiiConfig(entities=[*PATTERN_TYPES, *NER_TYPES])
    ner_step, ner_batches = ner_config.build(), make_batches(subset, 200)
    n_wall, n_cpu, _ = timed(lambda: [ner_step.transform(b) for b in ner_batches])
    ours_ner = [set(s) for s in ner_step.find([d.text for d in subset])]
    ner_chars = sum(len(s) for d in subset for _, s in ner_sentences(d.text))
    n_rate, n_cpu_rate = len(subset) / n_wall, len(subset) / n_cpu

    sub_gold = gold[: len(subset)]
    sub_ours = ours[: len(subset)]
    print(
        f"\nsubset: first {len(subset)} documents (presidio analyses each one; model load {load_s:.1f} s, not timed)\n"
    )
    print("| engine | docs/s (1 process) | docs per CPU-second | × presidio (per core) |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| presidio AnalyzerEngine (default) | {p_rate:,.1f} | {p_cpu_rate:,.1f} | 1× |")
    print(
        f"| pii step, pattern types | {ours_rate:,.0f} | {ours_cpu_rate:,.0f} | {ours_cpu_rate / p_cpu_rate:,.0f}× |"
    )
    print(
        f"| pii step, + PERSON, LOCATION (NER) | {n_rate:,.1f} | {n_cpu_rate:,.1f} | {n_cpu_rate / p_cpu_rate:,.1f}× |"
    )
    print(f"\n(NER saw {ner_chars / sum(len(d.text) for d in subset):.0%} of the subset's characters.)\n")
    print(table("type (gold)", {"presidio default": score(sub_gold, presidio_found, PATTERN_TYPES),
                                "presidio, score ≥ 0.5": score(sub_gold, presidio_05, PATTERN_TYPES),
                                "pii step": score(sub_gold, sub_ours, PATTERN_TYPES)}, PATTERN_TYPES))  # fmt: skip
    print()
    print(table("NER type (gold)", {"presidio default": score(sub_gold, presidio_found, NER_TYPES),
                                    "pii step + NER": score(sub_gold, ours_ner, NER_TYPES)}, NER_TYPES))  # fmt: skip

    # The commonest errors of each engine, grouped by type and shape, with one example each.
    for name, found in (("presidio default", presidio_found), ("pii step", sub_ours)):
        for kind, pick in (("false positives", lambda g, f: f - g), ("missed", lambda g, f: g - f)):
            errors, example = Counter(), {}
            for d, g, f in zip(subset, sub_gold, found, strict=True):
                in_scope = ({s for s in x if s[2] in PATTERN_TYPES} for x in (g, f))
                for s, e, t in pick(*in_scope):
                    key = f"{t} {_shape(d.text[s:e])}"
                    errors[key] += 1
                    example.setdefault(
                        key, f"{d.text[max(0, s - 25) : s]}[{d.text[s:e]}]{d.text[e : e + 10]}"
                    )
            print(f"\n{name}, {kind}: {sum(errors.values())}")
            for key, count in errors.most_common(10):
                print(f"  {count:4d}  {key:28s} e.g. {example[key]!r}")


def _shape(value: str) -> str:
    """A value's shape (digits → 9, letters → a/A), so error lists group alike and print no PII."""
    return "".join("9" if c.isdigit() else "a" if c.islower() else "A" if c.isupper() else c for c in value)[
        :40
    ]


if __name__ == "__main__":
    main()
