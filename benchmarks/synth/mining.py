"""Mined vs random selection of prompts for the teacher, at the same teacher-token budget, on arithmetic.

The figure of issue 16: does asking the student first (``synth.mine``) buy a better student for the same
teacher tokens than picking prompts at random?

The questions come from ``benchmarks/train/grpo_arith.py``'s seeded generator (one-digit sums, two-digit
plus or minus one-digit, one-digit products; ``domain`` is the kind), asked as "What is 7 + 5? End your
answer with 'Final answer: <number>'." with the number as the reference. The first ``--test`` questions
are held out; the next ``--pool`` are the candidates. Per setting (a student), every side runs the same
chain, each stage its own measured process:

1. ``synth.mine`` over the pool with ``select: {teacher_tokens: B, teacher_max_tokens: M,
   stratify_by: domain}`` -- ``scores: {random: 1}`` for the baseline, one mined side per score in
   ``--scores`` (``pass_at_k``: 1 - pass@1 of the student's ``--samples`` sampled answers checked by the
   numeric verifier; ``loss``: the student's NLL per token of the reference number, ``answer_column``),
   and the first score again at ``--fraction`` of B;
2. ``synth.cot`` on the kept rows: the setting's teacher, rejection sampling (at most ``--tries``), the
   numeric verifier on the last number;
3. the same LoRA SFT (``--steps`` steps) from the setting's student on the verified answers;
4. one ``eval`` of the student and every side on the held-out questions (greedy, the same verifier):
   accuracy with 95% bootstrap intervals, paired differences against the random side, per kind.

Settings (``--settings``, default ``strong``): ``strong`` -- SmolLM2-135M-Instruct taught by a *strong
teacher stand-in*: an OpenAI-compatible endpoint this script serves on 127.0.0.1 (``StrongTeacher``: POST
/v1/chat/completions, GET /v1/models) that parses each question and answers it correctly in one worked line
ending in "Final answer: <n>", with usage counted in SmolLM2 tokenizer tokens. It is not a model; it stands
in for a teacher much stronger than the student (an API model), every answer it gives verifies, so the
teacher asks one answer a question. This is the case mining is for. ``demo`` -- the demo student (``examples/recipes/demo-student.yaml``: SmolLM2 cut to 8 layers)
taught by SmolLM2-135M-Instruct, the issue's pairing; ``self`` -- SmolLM2-135M-Instruct taught by itself
(served on loopback, 2 answers a round) through rejection sampling (self-improvement), because the demo student answers no held-out question and
learns none in CPU-affordable steps, so that setting cannot tell the selections apart.

Teacher tokens are counted as spent, not as estimated: prompt + completion tokens of every teacher request
behind the ``synth.cot`` dataset, rows and ledger (``synth.loop.teacher_tokens``). The budget B bounds the
*estimate* (every prompt answered once at M tokens); hard prompts need more rejection tries, so a mined
side can spend more than a random one under the same B. The mining cost is the student's sampled requests
and tokens (from the ``synth.mine`` manifest's stats: a fresh store has nothing cached) and its seconds.

The student is sampled for pass@k in the mining process (``--sampler in_process``: one ``generate`` call
a prompt, much faster on CPU than the served student) or served on loopback (``--sampler served``, as the
self and demo results in the README were made). Every process runs on ``--threads`` torch threads (2).

    .venv/bin/python benchmarks/synth/mining.py [--settings strong,self,demo] [--pool 80] [--test 100]
        [--teacher-tokens 800] [--scores pass_at_k,loss] [--samples 8] [--sampler in_process|served]
        [--tries 2] [--steps 12] [--threads 2] [--store DIR] [--json PATH]

The defaults (``strong`` alone) are sized for about 15 minutes on 2 quiet cores; the self and demo settings
took 20-30 minutes each with 1 thread on shared cores. 100 held-out questions give intervals of about
+-0.09; raise --pool, --test, --teacher-tokens and --steps where there is time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks" / "train"))

from grpo_arith import POLICY, arithmetic_rows, by_kind, cli, measured  # noqa: E402

from manifests.stages import run_recipe_file  # noqa: E402
from manifests.store import Store  # noqa: E402

DATA = "mine-arith"
STUDENTS = {"strong": POLICY, "self": POLICY, "demo": "student-base"}
"""Each setting's student run; the teacher is POLICY (SmolLM2-135M-Instruct) served on loopback, except in
``strong``: the stand-in below."""
VERIFY = "{method: numeric, extract: last_number}"
ORACLE = "strong-arith-oracle"
QUESTION_RE = re.compile(r"What is (-?\d+) ([-+*]) (-?\d+)\?")


class StrongTeacher:
    """The ``strong`` setting's teacher: an OpenAI-compatible endpoint on 127.0.0.1, in a thread of this
    process, that stands in for a teacher much stronger than the student (as an API model would be). It is
    not a model: it parses the question grpo_arith's generator writes and answers it correctly with one
    worked line ending in "Final answer: <n>", so every answer it gives verifies. Usage counts are tokens of
    the SmolLM2 tokenizer (the prompt through its chat template, the answer as text), as a served SmolLM2
    would count them."""

    def __init__(self, tokenizer):
        self.tokenizer, self.lock = tokenizer, threading.Lock()
        self.requests = self.prompt_tokens = self.completion_tokens = 0
        teacher = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a) -> None:
                pass

            def reply(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/v1/models"):
                    return self.reply(200, {"object": "list", "data": [{"id": ORACLE, "object": "model",
                                                                           "owned_by": "benchmark"}]})  # fmt: skip
                self.reply(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                if not self.path.rstrip("/").endswith("/v1/chat/completions"):
                    return self.reply(404, {"error": {"message": f"no route {self.path}"}})
                try:
                    self.reply(200, teacher.complete(body))
                except ValueError as error:
                    self.reply(400, {"error": {"message": str(error), "type": "invalid_request_error"}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def answer(question: str) -> str:
        match = QUESTION_RE.search(question)
        if match is None:
            raise ValueError("not a question of grpo_arith's generator")
        a, op, b = int(match[1]), match[2], int(match[3])
        value = a + b if op == "+" else a - b if op == "-" else a * b
        return f"{a} {op} {b} = {value}. Final answer: {value}"

    def complete(self, body: dict) -> dict:
        messages = body.get("messages") or []
        question = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
        content = self.answer(question if isinstance(question, str) else json.dumps(question))
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        completion = len(self.tokenizer(content, add_special_tokens=False)["input_ids"])
        n = int(body.get("n") or 1)
        with self.lock:
            self.requests += 1
            self.prompt_tokens += prompt
            self.completion_tokens += completion * n
        choices = [{"index": i, "message": {"role": "assistant", "content": content}, "finish_reason": "stop",
                    "logprobs": None} for i in range(n)]  # fmt: skip
        return {"id": f"chatcmpl-{self.requests}", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model") or ORACLE, "choices": choices,
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion * n,
                          "total_tokens": prompt + completion * n}}  # fmt: skip

    def counts(self) -> dict:
        with self.lock:
            return {"requests": self.requests, "prompt_tokens": self.prompt_tokens,
                    "completion_tokens": self.completion_tokens}  # fmt: skip


TEACHER: dict = {}
"""The strong teacher's URL once it runs (set by main)."""


def publish_questions(store: Store, pool: int, test: int, seed: int):
    """grpo_arith's questions with the columns synth reads (``question``, ``answer``, ``domain``), as two
    datasets: the candidates, and the held-out questions (a synth input reads every split of a dataset)."""
    import pyarrow as pa

    from manifests.publish import Publisher

    rows = [r | {"question": r["prompt"][0]["content"], "answer": r["reference"], "domain": r["kind"]}
            for r in arithmetic_rows(pool + test, seed)]  # fmt: skip
    published = []
    for name, split, part in ((f"{DATA}-pool", "train", rows[test:]), (DATA, "test", rows[:test])):
        recipe = {"generator": "benchmarks/synth/mining.py", "pool": pool, "test": test, "seed": seed}
        with Publisher(store, kind="dataset", name=name, stage="benchmark.arith", recipe=recipe) as pub:
            pub.write_table(pa.Table.from_pylist(part), split=split)
            published.append(pub.publish(stats={"rows_out": len(part)}))
    return published


def mine_recipe(name: str, student: str, score: str, budget: int, args) -> str:
    head = (f"stage: synth.mine\nname: {name}\ninput: {DATA}-pool\nstudent: {student}\n"
            f"scores: {{{score}: 1}}\nprompt_template: '{{question}}'\nseed: 0\n")  # fmt: skip
    if score == "pass_at_k":
        if args.sampler == "in_process":
            head += "sampler: in_process\n"
        head += (f"samples: {args.samples}\nk: 1\nverify: {VERIFY}\nreference_column: answer\n"
                 f"sampling: {{temperature: {args.temperature}, max_tokens: {args.max_tokens}}}\n")  # fmt: skip
    # answer_column on every side: a mined row carries the reference (which synth.cot verifies against)
    # only when a score reads it -- pass_at_k's reference_column or this; random reads neither
    head += "answer_column: answer\n"
    strata = ", stratify_by: domain" if args.strata == "domain" else ""
    return head + f"select: {{teacher_tokens: {budget}, teacher_max_tokens: {args.max_tokens}{strata}}}\n"


def cot_recipe(name: str, mined: str, setting: str, args) -> str:
    # the strong stand-in's every answer verifies: one answer a question, no second sample to pay for
    teacher, samples = f"{{serve: {POLICY}, serve_max_batch: 8}}", min(2, args.tries)
    if setting == "strong":
        teacher, samples = f"{{name: {ORACLE}, model: {ORACLE}, base_url: '{TEACHER['url']}'}}", 1
    return (f"stage: synth.cot\nname: {name}\ninput: {mined}\nanswer_column: answer\n"
            f"teachers: [{teacher}]\nprompt_template: '{{question}}'\n"
            f"sampling: {{temperature: {args.temperature}, max_tokens: {args.max_tokens}}}\nmode: rejection\n"
            f"samples: {samples}\nmax_tries: {args.tries}\nextract: last_number\nverify: numeric\nseed: 0\n")  # fmt: skip


def sft_recipe(name: str, student: str, data: str, args) -> str:
    return (f"stage: train\nmethod: sft\nname: {name}\nmodel: {student}\ndatasets: [{{ref: {data}, split: train}}]\n"
            "peft: {method: lora, r: 16, alpha: 32, dropout: 0.0, target_modules: [q_proj, k_proj, v_proj, o_proj]}\n"
            f"max_steps: {args.steps}\nper_device_batch_size: 8\nlearning_rate: {args.lr}\nmax_length: 128\n"
            "save_every: 100000\nseed: 0\n")  # fmt: skip


def eval_recipe(name: str, models: list[str], data, args) -> str:
    return (f"stage: eval\nname: {name}\nmodels: [{', '.join(models)}]\ntasks:\n  - name: heldout\n"
            f"    dataset: {{ref: {data.ref}, split: test}}\n    prompt: prompt\n    target: reference\n"
            f"    metrics: [numeric]\n    verifier: {VERIFY}\n"
            f"    generation: {{max_new_tokens: {args.max_tokens}, batch_size: 25}}\n"
            "bootstrap: {samples: 2000, seed: 0}\n")  # fmt: skip


def score_spread(store: Store, mined) -> dict:
    """How the score spreads over the candidates (kept rows and the ledger's not-selected ones): a score that
    gives most candidates the same value cannot choose between them (ties go by id: random in effect)."""
    import pyarrow.parquet as pq

    from manifests.data import read_table

    scores = read_table(mined, split="train", columns=["mine_score"]).column("mine_score").to_pylist()
    for entry in mined.ledger:
        table = pq.read_table(mined.location / entry.path, columns=["reason", "score"]).to_pylist()
        scores += [r["score"] for r in table if r["reason"] == "not_selected"]
    top = max(scores)
    return {"candidates": len(scores), "distinct": len(set(scores)), "at_top": sum(s == top for s in scores),
            "top": top, "mean": sum(scores) / len(scores)}  # fmt: skip


def run_side(store: Store, setting: str, side: str, score: str, budget: int, folder: Path, args) -> dict:
    from synth.loop import teacher_tokens

    student, prefix = STUDENTS[setting], f"bm-{setting}-{side.replace('@', '-at-').replace('%', 'pct')}"
    out: dict = {"score": score, "budget": budget, "run": prefix, "train_s": 0.0}
    for step, text in (("mine", mine_recipe(f"{prefix}-mined", student, score, budget, args)),
                       ("cot", cot_recipe(f"{prefix}-cot", f"{prefix}-mined", setting, args)),
                       ("train", sft_recipe(prefix, student, f"{prefix}-cot", args))):  # fmt: skip
        recipe = folder / f"{prefix}-{step}.yaml"
        recipe.write_text(text)
        try:
            out[f"{step}_s"] = measured(cli(store, "run", str(recipe)), args.threads)["seconds"]
        except SystemExit as failed:  # the teacher verified none of the kept questions: nothing to train on
            if step != "cot" or "no output row" not in str(failed):
                raise
            out |= {"cot_s": float("nan"), "run": None, "cot_error": str(failed).strip().splitlines()[-1]}
            break
    mined = store.resolve(f"{prefix}-mined")
    out |= {"kept": mined.stats["mined"]["kept"], "estimated": mined.stats["mined"]["teacher_tokens_kept"],
            "strata": mined.stats["mined"]["strata"], "spread": score_spread(store, mined),
            "student_requests": mined.stats["requests"]["sent"] + mined.stats["requests"]["cache_hits"]
            # in process, the samples are no engine requests (the stats count none): candidates x samples
            or (mined.stats["input_rows"] * args.samples if score == "pass_at_k" and args.sampler == "in_process" else 0),
            "student_tokens": teacher_tokens(mined, store), "student_cached": mined.stats["requests"]["cache_hits"],
            "candidates": mined.stats["input_rows"], "verified": 0, "teacher_requests": None, "teacher_tokens": None}  # fmt: skip
    if out["run"] is not None:
        cot = store.resolve(f"{prefix}-cot")
        out |= {"verified": cot.stats["rows_out"], "teacher_requests": cot.stats["requests"]["sent"] + cot.stats["requests"]["cache_hits"],
                "teacher_tokens": teacher_tokens(cot, store), "cot_dropped": cot.stats["dropped"]}  # fmt: skip
    print(f"{setting}/{side}: kept {out['kept']} (estimate {out['estimated']} tokens), verified {out['verified']}, "
          f"teacher tokens {out['teacher_tokens']}; mine {out['mine_s']:.0f} s, cot {out['cot_s']:.0f} s, "
          f"train {out['train_s']:.0f} s" + (f" ({out['cot_error']}: not trained)" if out["run"] is None else ""),
          flush=True)  # fmt: skip
    return out


def paired_vs(paired: dict, a: str, b: str) -> dict:
    """b - a with its interval (the eval reports each pair once, in the order of its models)."""
    if a == b:
        return {"diff": 0.0, "low": 0.0, "high": 0.0}
    if (a, b) in paired:
        return paired[(a, b)]
    m = paired[(b, a)]
    return {"diff": -m["diff"], "low": -m["high"], "high": -m["low"]}


def run_setting(store: Store, setting: str, data, folder: Path, args) -> dict:
    scores = [s.strip() for s in args.scores.split(",") if s.strip()]
    sides = {"random": ("random", args.teacher_tokens)}
    sides |= {score: (score, args.teacher_tokens) for score in scores}
    sides[f"{scores[0]}@{args.fraction:.0%}"] = (scores[0], round(args.teacher_tokens * args.fraction))
    results = {side: run_side(store, setting, side, score, budget, folder, args)
               for side, (score, budget) in sides.items()}  # fmt: skip
    student, name = STUDENTS[setting], f"bm-{setting}-eval"
    models = [student, *(r["run"] for r in results.values() if r["run"])]
    (folder / f"{name}.yaml").write_text(eval_recipe(name, models, data, args))
    eval_s = measured(cli(store, "run", str(folder / f"{name}.yaml")), args.threads)["seconds"]
    evaluation = store.resolve(name)
    heldout = json.loads((evaluation.location / "metrics.json").read_text())["tasks"]["heldout"]
    accuracy = {label: m["metrics"]["numeric"] for label, m in heldout["models"].items()}
    paired = {(e["a"], e["b"]): e["metrics"]["numeric"] for e in heldout["paired"]}
    kinds = by_kind(store, evaluation, data)
    for side, r in results.items():
        model = r["run"] or student  # a side without verified rows trains nothing: the student as it was
        r["accuracy"], r["by_kind"] = accuracy[model], kinds[model]
        if side != "random":
            r["vs_random"] = paired_vs(paired, results["random"]["run"] or student, model)
    return {"student": student, "base": {"accuracy": accuracy[student], "by_kind": kinds[student]},
            "sides": results, "eval_s": eval_s, "eval": evaluation.id}  # fmt: skip


def print_setting(setting: str, out: dict) -> None:
    def cell(m: dict) -> str:
        return f"{m['value']:.3f} [{m['low']:.3f}, {m['high']:.3f}]"

    names = sorted(out["base"]["by_kind"])
    teacher = f"{ORACLE} (stand-in, not a model)" if setting == "strong" else POLICY
    print(f"\n{setting}: student {out['student']}, teacher {teacher}; eval {out['eval_s']:.0f} s")
    print("| side | budget (estimate) | kept | verified | teacher requests | teacher tokens (spent) | held-out "
          "accuracy | vs random (paired) | " + " | ".join(names) + " |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + " ---: |" * len(names))
    base = out["base"]
    print(f"| student before | | | | | | {cell(base['accuracy'])} | | "
          + " | ".join(f"{base['by_kind'][k]:.2f}" for k in names) + " |")  # fmt: skip
    for side, r in out["sides"].items():
        vs = "" if side == "random" else (f"{r['vs_random']['diff']:+.3f} [{r['vs_random']['low']:+.3f}, "
                                                f"{r['vs_random']['high']:+.3f}]")  # fmt: skip
        print(f"| {side} | {r['budget']} ({r['estimated']}) | {r['kept']} | {r['verified']} | {r['teacher_requests'] or 'n/a'} "
              f"| {r['teacher_tokens'] or 'n/a'} | {cell(r['accuracy'])} | {vs} | "
              + " | ".join(f"{r['by_kind'].get(k, float('nan')):.2f}" for k in names) + " |")  # fmt: skip
    print(
        "\nmining: what each side's selection cost and chose (mean score per stratum: the student's weakness)"
    )
    print(
        "| side | student requests (cached) | student tokens (prompt + sampled) | mine s | cot s | train s | "
        "distinct scores / candidates | at the top score | mean score per stratum | kept per stratum |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    for side, r in out["sides"].items():
        t, s = r["student_tokens"], r["spread"]
        strata = ", ".join(f"{k} {v['mean_score']:.2f}" for k, v in r["strata"].items())
        kept = ", ".join(f"{k} {v['kept']}/{v['candidates']}" for k, v in r["strata"].items())
        print(f"| {side} | {r['student_requests']} ({r['student_cached']}) | {t} | {r['mine_s']:.0f} | "
              f"{r['cot_s']:.0f} | {r['train_s']:.0f} | {s['distinct']} / {s['candidates']} | {s['at_top']} | "
              f"{strata} | {kept} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", default="strong", help="comma-separated, of: " + ", ".join(STUDENTS))
    parser.add_argument("--pool", type=int, default=80, help="candidate questions")
    parser.add_argument("--test", type=int, default=100, help="held-out questions")
    parser.add_argument(
        "--teacher-tokens", type=int, default=800, help="B: the teacher-token budget (estimate)"
    )
    parser.add_argument("--fraction", type=float, default=0.6, help="the smaller mined side's share of B")
    parser.add_argument("--scores", default="pass_at_k", help="mined sides; the first also at --fraction")
    parser.add_argument("--samples", type=int, default=8, help="the student's answers per candidate (pass@k)")
    parser.add_argument("--sampler", default="in_process", choices=["in_process", "served"],
                        help="how synth.mine samples the student: one generate call a prompt, or served")  # fmt: skip
    parser.add_argument("--max-tokens", type=int, default=24, help="new tokens of every answer (M)")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--tries", type=int, default=2, help="teacher samples per question at most")
    parser.add_argument("--steps", type=int, default=12, help="SFT steps (batches of 8)")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every process")
    parser.add_argument("--strata", default="domain", choices=["domain", "none"],
                        help="share the budget among the domains (default), or not")  # fmt: skip
    parser.add_argument("--store", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="the results (default: beside the store)")
    args = parser.parse_args()
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    if unknown := [s for s in settings if s not in STUDENTS]:
        sys.exit(f"--settings: unknown {unknown}")
    import torch

    started = time.time()
    store = Store(args.store or Path(tempfile.mkdtemp()) / "store")
    if not store.list(kind="run", name=POLICY):
        run_recipe_file(str(ROOT / "examples" / "recipes" / "demo-model.yaml"), store)
    if "demo" in settings and not store.list(kind="run", name=STUDENTS["demo"]):
        run_recipe_file(str(ROOT / "examples" / "recipes" / "demo-student.yaml"), store)
    if "strong" in settings:
        from manifests.models import load_tokenizer

        TEACHER["server"] = StrongTeacher(load_tokenizer(store.resolve(POLICY, kind="run")))
        TEACHER["url"] = TEACHER["server"].url
    pool, data = publish_questions(store, args.pool, args.test, seed=0)
    print(f"data: {data.ref} ({args.pool} candidates / {args.test} held out); models ready in "
          f"{time.time() - started:.0f} s", flush=True)  # fmt: skip
    folder = Path(tempfile.mkdtemp())
    path = args.json or store.root.parent / "mining.json"
    results: dict[str, dict] = {}
    for setting in settings:  # each setting's table as soon as it is done, the JSON rewritten with it
        results[setting] = run_setting(store, setting, data, folder, args)
        machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{args.threads} thread(s) a process, load average {os.getloadavg()[0]:.1f} now")  # fmt: skip
        print(f"\n{machine}; {args.pool} candidates / {args.test} held out; B {args.teacher_tokens} teacher tokens "
              f"(estimate, {args.max_tokens} a request), {args.samples} student samples a candidate, {args.tries} "
              f"teacher tries, {args.steps} SFT steps x 8, lr {args.lr}; {(time.time() - started) / 60:.1f} min so far")  # fmt: skip
        if setting == "strong":
            results[setting]["oracle_served"] = TEACHER["server"].counts()
            print(
                f"strong teacher stand-in served (all sides, cache misses only): {TEACHER['server'].counts()}"
            )
        print_setting(setting, results[setting])
        path.write_text(json.dumps({"machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
                                    "pool": pool.id, "data": data.id, "settings": results}, indent=2))  # fmt: skip
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
