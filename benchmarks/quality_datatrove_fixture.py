"""Record datatrove's quality-filter decisions as a test fixture, so tests compare without datatrove.

    .venv/bin/python benchmarks/quality_datatrove_fixture.py          # (re)write the fixture
    .venv/bin/python benchmarks/quality_datatrove_fixture.py --check  # compare with a live datatrove

``tests/test_quality.py`` checks the compatibility mode (``tokenizer: datatrove``) of every filter
in ``corpus.quality`` against ``tests/fixtures/quality_datatrove.json``: the keep/drop decision
and the rule, document by document. datatrove is a benchmark dependency only (``pip install
datatrove``), so this script runs datatrove's four filters (``GopherQualityFilter``,
``GopherRepetitionFilter``, ``C4QualityFilter``, ``FineWebQualityFilter``, default settings) once
and writes what they decided, with datatrove's version. Rerun it after upgrading datatrove, or
after changing the embedded sample or the rule cases of ``tests/test_quality.py``.

The documents:

- *sample*: every document of the embedded sample (``examples/sample/web.jsonl`` by line,
  ``notes/*.txt``), named by file and line with their sha256, not copied;
- *crafted*: the rule cases of ``tests/test_quality.py`` (each made to trip one rule) and the
  empty, whitespace-only and near-empty documents;
- *synthetic*: the near-threshold documents of ``benchmarks/quality_agreement.py`` (seed 0), as
  many of each datatrove decision as ``--per-decision`` allows, so every rule is represented.

One fixture record (text shortened)::

    {"origin": "synthetic", "text": "Home\\nShop\\nLogin\\n...",
     "datatrove": {"gopher_quality": "gopher_short_doc", "gopher_repetition": null,
                   "c4_quality": "too_few_sentences", "fineweb_quality": "line_punct_ratio"}}

``datatrove`` holds datatrove's own reason (``null``: kept); ``reason_codes`` at the top level
translates each reason seen into this project's code.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from collections import Counter
from importlib.metadata import version
from pathlib import Path

from quality_agreement import DATATROVE_REASONS, datatrove_reason, sentences_from, synthetic_documents

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "quality_datatrove.json"
SAMPLE = ROOT / "examples" / "sample"
FILTERS = ["gopher_quality", "gopher_repetition", "c4_quality", "fineweb_quality"]
EDGE = ["", " ", "   ", "\n", "\n \n\t", "\u00a0", ".", "{}", "lorem ipsum", "Hello.", "Hello world."]


def sample_records() -> list[dict]:
    records = []
    for n, line in enumerate((SAMPLE / "web.jsonl").read_text(encoding="utf-8").splitlines(), start=1):
        if line:
            records.append(
                {"origin": "examples/sample/web.jsonl", "line": n, "text": json.loads(line)["text"]}
            )
    for path in sorted((SAMPLE / "notes").glob("*.txt")):
        records.append(
            {"origin": path.relative_to(ROOT).as_posix(), "text": path.read_text(encoding="utf-8")}
        )
    for record in records:
        record["sha256"] = hashlib.sha256(record["text"].encode()).hexdigest()
    return records


def crafted_texts() -> list[str]:
    sys.path.insert(0, str(ROOT))
    from tests.test_quality import C4_CASES, FINEWEB_CASES, GOPHER_QUALITY_CASES, REPETITION_CASES

    texts = [text for cases in (GOPHER_QUALITY_CASES, REPETITION_CASES) for _, text, _ in cases]
    texts += [text for cases in (C4_CASES, FINEWEB_CASES) for text, _ in cases]
    return list(dict.fromkeys(EDGE + texts))


def datatrove_filters() -> dict:
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )

    makers = [GopherQualityFilter, GopherRepetitionFilter, C4QualityFilter, FineWebQualityFilter]
    return dict(zip(FILTERS, makers, strict=True))


def datatrove_decisions(texts: list[str]) -> list[dict[str, str | None]]:
    """Each document's decision by each datatrove filter: its reason, None when kept."""
    from datatrove.data import Document

    decisions: list[dict[str, str | None]] = [{} for _ in texts]
    for name, make in datatrove_filters().items():
        step = make()
        for i, text in enumerate(texts):
            try:
                result = step.filter(Document(text=text, id=str(i)))  # a fresh Document: C4 rewrites it
            except ZeroDivisionError:  # a document datatrove fails on is left out of the fixture
                result = (False, "error")
            kept, reason = result if isinstance(result, tuple) else (result, None)
            decisions[i][name] = None if kept else (reason or "dropped")
    return decisions


def our_reason(name: str, reason: str) -> str:
    """This project's reason code for datatrove's ``reason`` from filter ``name``."""
    inverse = {theirs: ours for ours, theirs in DATATROVE_REASONS.items()}
    if name == "gopher_quality":
        code = inverse.get(reason, reason)
    elif match := re.fullmatch(r"duplicated_(\d+)_n_grams", reason):
        code = f"gopher_dup_{match[1]}_gram"
    else:
        code = f"{name.split('_')[0]}_{reason}"
    if datatrove_reason(code) != reason:
        raise SystemExit(f"no reason code of ours for datatrove's {name} reason {reason!r}")
    return code


def select_synthetic(decisions: list[dict], per_decision: int) -> list[int]:
    """Up to ``per_decision`` documents for each (filter, datatrove reason or keep), in set order."""
    taken: Counter = Counter()
    chosen = []
    for i, decision in enumerate(decisions):
        keys = [(name, decision[name]) for name in FILTERS]
        if "error" in decision.values() or all(taken[key] >= per_decision for key in keys):
            continue
        chosen.append(i)
        taken.update(keys)
    return chosen


def build(docs: int, seed: int, per_decision: int) -> dict:
    sample = sample_records()
    crafted = crafted_texts()
    synthetic = synthetic_documents(docs, seed, sentences_from([r["text"] for r in sample]))
    synthetic = [t for t in dict.fromkeys(synthetic) if t not in crafted]
    sample_decisions = datatrove_decisions([r["text"] for r in sample])
    crafted_decisions = datatrove_decisions(crafted)
    synthetic_decisions = datatrove_decisions(synthetic)
    chosen = select_synthetic(synthetic_decisions, per_decision)
    documents = [
        {k: v for k, v in record.items() if k != "text"} | {"datatrove": decision}
        for record, decision in zip(sample, sample_decisions, strict=True)
    ]
    documents += [
        {"origin": "crafted", "text": text, "datatrove": decision}
        for text, decision in zip(crafted, crafted_decisions, strict=True)
    ]
    documents += [
        {"origin": "synthetic", "text": synthetic[i], "datatrove": synthetic_decisions[i]} for i in chosen
    ]
    documents = [d for d in documents if "error" not in d["datatrove"].values()]
    seen = {(name, d["datatrove"][name]) for d in documents for name in FILTERS if d["datatrove"][name]}
    reason_codes = {name: {} for name in FILTERS}
    for name, reason in sorted(seen):
        reason_codes[name][reason] = our_reason(name, reason)
    return {
        "about": "datatrove's decisions on these documents; written by benchmarks/quality_datatrove_fixture.py",
        "datatrove": version("datatrove"),
        "python": sys.version.split()[0],
        "filters": {
            name: f"{make.__name__}() with its defaults" for name, make in datatrove_filters().items()
        },
        "synthetic": {"docs": docs, "seed": seed, "per_decision": per_decision, "kept": len(chosen)},
        "reason_codes": reason_codes,
        "documents": documents,
    }


def check(fixture: dict) -> int:
    """Run the installed datatrove on the fixture's documents; count decisions that changed."""
    texts = [d["text"] if "text" in d else sample_text(d) for d in fixture["documents"]]
    changed = 0
    for d, now in zip(fixture["documents"], datatrove_decisions(texts), strict=True):
        if now != d["datatrove"]:
            changed += 1
            print(f"changed: {d['origin']} {d.get('line', '')}: {d['datatrove']} -> {now}")
    print(
        f"datatrove {version('datatrove')} (fixture: {fixture['datatrove']}): {changed} of {len(texts)} changed"
    )
    return 1 if changed else 0


def sample_text(document: dict) -> str:
    path = ROOT / document["origin"]
    if "line" in document:
        return json.loads(path.read_text(encoding="utf-8").splitlines()[document["line"] - 1])["text"]
    return path.read_text(encoding="utf-8")


def dump(fixture: dict) -> str:
    """JSON with one document a line, so a regenerated fixture diffs document by document."""
    head = json.dumps({k: v for k, v in fixture.items() if k != "documents"}, ensure_ascii=False, indent=1)
    documents = ",\n".join(json.dumps(d, ensure_ascii=False) for d in fixture["documents"])
    return f'{head[:-2]},\n "documents": [\n{documents}\n ]\n}}\n'


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=3000, help="synthetic documents to choose from")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-decision", type=int, default=8, help="synthetic documents per decision")
    parser.add_argument("--out", type=Path, default=FIXTURE)
    parser.add_argument("--check", action="store_true", help="compare a live datatrove with the fixture")
    args = parser.parse_args()
    if args.check:
        return check(json.loads(args.out.read_text(encoding="utf-8")))
    fixture = build(args.docs, args.seed, args.per_decision)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(dump(fixture), encoding="utf-8")
    origins = Counter(
        d["origin"] if d["origin"] in ("crafted", "synthetic") else "sample" for d in fixture["documents"]
    )
    print(f"datatrove {fixture['datatrove']}: {len(fixture['documents'])} documents ({dict(origins)})")
    for name in FILTERS:
        reasons = Counter(d["datatrove"][name] or "keep" for d in fixture["documents"])
        print(f"  {name}: " + ", ".join(f"{r} {k}" for r, k in reasons.most_common()))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
