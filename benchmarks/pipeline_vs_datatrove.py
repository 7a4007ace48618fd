"""The full heuristic cleaning pipeline, this project vs datatrove, on the same documents.

Both read the same JSONL file, run Gopher repetition → Gopher quality → C4 → FineWeb with their
default thresholds, and write Parquet, in one process on one core:

- ours: ``distillery corpus build`` (workers: 1, exact dedup off, as datatrove's pipeline has none);
- datatrove: ``LocalPipelineExecutor`` with ``JsonlReader`` → the four filters → ``ParquetWriter``.

It prints documents/s per core (CPU seconds of the process and its children), wall time, how
many documents each side kept, and the ratio. Language ID is left out of the comparison:
datatrove's ``LanguageFilter`` downloads its model at run time, which this machine cannot.

    .venv/bin/python benchmarks/pipeline_vs_datatrove.py [--docs 6000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))

from quality_agreement import machine, sample_documents, sentences_from, synthetic_documents  # noqa: E402

DATATROVE = textwrap.dedent(
    """
    import sys
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.filters import C4QualityFilter, FineWebQualityFilter, GopherQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import ParquetWriter

    data, out, logs = sys.argv[1:4]
    LocalPipelineExecutor(
        pipeline=[JsonlReader(data, text_key="text", id_key="id"), GopherRepetitionFilter(), GopherQualityFilter(),
                  C4QualityFilter(), FineWebQualityFilter(), ParquetWriter(out)],
        tasks=1, workers=1, logging_dir=logs,
    ).run()
    """
)


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the command and its children)."""
    probe = (
        "import resource, subprocess, sys, time;"
        f"t = time.perf_counter(); subprocess.run({cmd!r}, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL);"
        "r = resource.getrusage(resource.RUSAGE_CHILDREN);"
        "print(time.perf_counter() - t, r.ru_utime + r.ru_stime)"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, check=True, capture_output=True, text=True)
    wall, cpu = out.stdout.split()
    return float(wall), float(cpu)


def rows(folder: Path, pattern: str = "*.parquet") -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in folder.rglob(pattern))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--docs", type=int, default=6000, help="synthetic documents added to the sample")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sample = sample_documents()
    texts = sample + synthetic_documents(args.docs, args.seed, sentences_from(sample))
    print(f"machine: {machine()}; {len(texts)} documents, one worker each side")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "in" / "docs.jsonl"
        data.parent.mkdir()
        data.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(texts)))
        recipe = tmp / "recipe.yaml"
        recipe.write_text(
            f"stage: corpus.build\nname: bench\nworkers: 1\ndedup: {{exact: false}}\ninputs: [{{path: {data}}}]\n"
            "steps: [{type: gopher_repetition}, {type: gopher_quality}, {type: c4_quality}, {type: fineweb_quality}]\n"
        )
        started = time.perf_counter()
        ours_wall, ours_cpu = timed(
            [
                sys.executable,
                "-m",
                "manifests.cli",
                "--store",
                str(tmp / "store"),
                "corpus",
                "build",
                str(recipe),
            ]
        )
        ours_rows = rows(tmp / "store" / "datasets" / "bench", "data/*.parquet")
        theirs_wall, theirs_cpu = timed(
            [sys.executable, "-c", DATATROVE, str(data.parent), str(tmp / "dt-out"), str(tmp / "dt-logs")]
        )
        theirs_rows = rows(tmp / "dt-out")
        print(f"{'':<12} {'docs/s/core':>12} {'CPU s':>8} {'wall s':>8} {'kept':>7}")
        for name, cpu, wall, kept in (("distillery", ours_cpu, ours_wall, ours_rows),
                                      ("datatrove", theirs_cpu, theirs_wall, theirs_rows)):  # fmt: skip
            print(f"{name:<12} {len(texts) / cpu:>12.0f} {cpu:>8.1f} {wall:>8.1f} {kept:>7}")
        print(
            f"speed-up per core: {theirs_cpu / ours_cpu:.1f}x (target >= 3x); total {time.perf_counter() - started:.0f} s"
        )
        print("(CPU time includes each side's start-up: interpreter, imports, executor)")


if __name__ == "__main__":
    main()
