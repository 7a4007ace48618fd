"""What on-policy RL methods (GRPO, PPO) share: prompts, sampled answers, rewards, token log-probs, and
the rollouts written down as data.

    rewards:
      - {verifier: numeric, weight: 1.0}            # synth cot's verifiers, against the row's reference
      - {verifier: tests}                           # the row's unit tests, in the sandbox
      - {reward_model: demo-rm, weight: 0.5}        # a ``method: reward`` run (the policy's tokenizer)

A prompt row is ``prompt`` (a chat, or text) with, for the verifiers, ``reference`` (or
``reference_column``) and ``tests``. Each reward function scores every answer; the answer's reward is
their weighted sum, and each function's own score and verdict are kept.

Every step's rollouts become rows of a dataset (``<run>-rollouts``) whose parents are the prompt
datasets and the run, one row per answer::

    {"id": "…", "parents": ["<prompt record id>"], "step": 3, "policy_step": 2, "prompt_id": "…", "sample": 1,
     "completion": "… Final answer: 42", "completion_tokens": 17, "truncated": false, "reward": 1.0,
     "rewards": "{\\"verifier:numeric\\": 1.0}", "verdicts": "[{…}]", "logp_sum": -12.3, "ref_logp_sum": -12.9,
     "advantage": 0.87, "zero_spread": false}

so ``manifests trace`` goes from a reward spike to the prompts and their sources, and the groups that
were all right or all wrong (``zero_spread``: GRPO learns nothing from them) can be filtered by mining.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
from pydantic import model_validator

from manifests.chat_labels import render_chat
from manifests.errors import DistilleryError
from manifests.recipes import RecipeConfig
from manifests.store import Store

VerifierMethod = Literal["exact", "numeric", "math", "regex", "tests"]

ROLLOUT_SCHEMA = pa.schema([
    ("id", pa.string()), ("parents", pa.list_(pa.string())), ("step", pa.int64()), ("policy_step", pa.int64()),
    ("prompt_id", pa.string()), ("sample", pa.int64()), ("completion", pa.string()),
    ("completion_tokens", pa.int64()), ("truncated", pa.bool_()), ("reward", pa.float64()),
    ("rewards", pa.string()), ("verdicts", pa.string()), ("logp_sum", pa.float64()),
    ("ref_logp_sum", pa.float64()), ("advantage", pa.float64()), ("zero_spread", pa.bool_()),
])  # fmt: skip


class RewardFunction(RecipeConfig):
    """One reward: a verifier of ``synth cot`` against the row, or a reward-model run."""

    verifier: VerifierMethod | None = None
    extract: str = "auto"
    """How the answer is found in the response (``synth/verify.py``: auto, final_line, boxed, last_number, regex, code)."""
    pattern: str | None = None
    reward_model: str | None = None
    weight: float = 1.0

    @model_validator(mode="after")
    def _one_kind(self) -> RewardFunction:
        if (self.verifier is None) == (self.reward_model is None):
            raise ValueError("a reward is a 'verifier' or a 'reward_model', one of them")
        return self

    @property
    def name(self) -> str:
        return f"verifier:{self.verifier}" if self.verifier else f"reward_model:{self.reward_model}"


def _source_version(module: str) -> str:
    """A hash of a module's source: the version of a reward function's code."""
    import importlib.util

    origin = importlib.util.find_spec(module).origin
    return hashlib.sha256(Path(origin).read_bytes()).hexdigest()[:16]


class Rewards:
    """The recipe's reward functions, loaded: ``score`` gives each answer its weighted reward."""

    def __init__(
        self, functions: list[RewardFunction], store: Store, policy_tokenizer, reference_column: str
    ):
        from manifests.models import tokenizer_fingerprint
        from synth.verify import Verifier

        self.functions, self.reference_column = functions, reference_column
        self.scorers: list[Any] = []
        self.lineage: list[dict[str, Any]] = []
        self.models = []
        for f in functions:
            if f.verifier:
                self.scorers.append(Verifier(f.verifier, f.extract, f.pattern))
                self.lineage.append({"name": f.name, "weight": f.weight, "extract": f.extract,
                                     "version": _source_version("synth.verify")})  # fmt: skip
                continue
            from manifests.model_runs import require_sequence_classifier
            from manifests.models import load_tokenizer
            from synth.preferences import RewardModel

            run = require_sequence_classifier(store.resolve(f.reward_model, kind="run"))
            if tokenizer_fingerprint(load_tokenizer(run)) != tokenizer_fingerprint(policy_tokenizer):
                raise DistilleryError(
                    f"reward model {run.ref} has another tokenizer than the policy; train the reward model on the "
                    "policy's base (method: reward) so both read the same tokens"
                )
            self.scorers.append(RewardModel(run, store))
            self.models.append(run)
            self.lineage.append({"name": f.name, "weight": f.weight, "run": run.id})

    def score(
        self, row: dict[str, Any], completions: list[str]
    ) -> tuple[list[float], list[dict], list[list]]:
        """Per answer: the weighted reward, each function's score, and the verifiers' verdicts."""
        totals = [0.0] * len(completions)
        parts: list[dict[str, float]] = [{} for _ in completions]
        verdicts: list[list[dict]] = [[] for _ in completions]
        for f, scorer in zip(self.functions, self.scorers, strict=True):
            if f.verifier:
                checks = [scorer(c, row.get(self.reference_column), row.get("tests")) for c in completions]
                scores = [float(v.passed) for v in checks]
                for i, v in enumerate(checks):
                    verdicts[i].append({"name": f.name, "passed": v.passed, "extracted": v.extracted})
            else:
                scores = scorer.score(as_messages(row["prompt"]), completions)
            for i, s in enumerate(scores):
                totals[i] += f.weight * s
                parts[i][f.name] = s
        return totals, parts, verdicts


def as_messages(prompt: Any) -> list[dict[str, Any]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{k: v for k, v in m.items() if v is not None} for m in prompt]


def without_dropout(model) -> None:
    """Dropout off everywhere (LoRA's too): an RL ratio compares two scorings of the same answers, and
    dropout noise would move it -- and trip the clip -- where the policy did not change."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def prompt_tokens(prompt: Any, tokenizer) -> list[int]:
    """A prompt row's tokens: a chat through the chat template with the generation prompt, text as is."""
    if isinstance(prompt, str):
        return tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if not tokenizer.chat_template:
        raise DistilleryError("the prompts are chats and the policy has no chat template; set chat_template:")
    return render_chat(tokenizer, as_messages(prompt), add_generation_prompt=True)


def sample_answers(model, prompt_ids: list[int], n: int, seed: int, sampling: dict[str, Any], eos: list[int],
                   pad: int) -> list[tuple[list[int], bool]]:  # fmt: skip
    """``n`` sampled answers to one prompt: (tokens through the first end-of-sequence, truncated?).

    Seeded per prompt and step, not by the batch around it: the same answers however the prompts are
    split over processes, and after a resume."""
    import torch

    torch.manual_seed(seed)
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids] * n, device=device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, pad_token_id=pad,
                             eos_token_id=eos, **sampling)  # fmt: skip
    answers = []
    for row in out[:, len(prompt_ids) :].tolist():
        end = next((i for i, t in enumerate(row) if t in eos), None)
        answers.append((row[: end + 1], False) if end is not None else (row, True))
    return answers


def _chunk(lm_head, hidden, targets, entropy: bool, temperature: float):
    import torch

    logprobs = torch.log_softmax(lm_head(hidden).float() / temperature, dim=-1)
    picked = logprobs.gather(-1, targets[:, None])[:, 0]
    if not entropy:
        return picked, torch.zeros_like(picked)
    return picked, -(logprobs.exp() * logprobs).sum(-1).detach()


def answer_logps(model, sequences: list[tuple[list[int], list[int]]], vocab_size: int, entropy: bool = False,
                 value_head=None, temperature: float = 1.0):  # fmt: skip
    """Per-token log-probs ``[B, T]`` of each answer after its prompt, the answers' mask, and (when asked)
    each position's entropy and -- with ``value_head``, a module on the last hidden state -- the value of the
    state before each answer token. The sequences run padding-free in one row (position ids restarting at
    every sequence); the LM head is applied only at the answers' positions, a checkpointed chunk at a time.
    Log-probs are those of the distribution sampled from: the logits over ``temperature``, as the sampler
    divides them (so the ratios, KL and entropy are of the policy that chose the answers).
    Returns ``(logps, mask, entropy, values)`` (entropy zeros, values None, when not asked)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    from train.sft import LOGITS_PER_CHUNK

    device = next(model.parameters()).device
    row = packed(sequences, device)
    none_kept = torch.empty(0, dtype=torch.long, device=device)
    out = model(input_ids=row.input_ids, position_ids=row.position_ids, use_cache=False, output_hidden_states=True,
                logits_to_keep=none_kept)  # fmt: skip
    hidden = out.hidden_states[-1][0][row.mask]
    wanted = row.targets[row.mask]
    head = model.get_output_embeddings()
    rows = max(1, LOGITS_PER_CHUNK // vocab_size)
    parts = [checkpoint(_chunk, head, hidden[i : i + rows], wanted[i : i + rows], entropy, temperature,
                        use_reentrant=False)
             for i in range(0, max(1, len(wanted)), rows)]  # fmt: skip
    logps = row.place(torch.cat([p[0] for p in parts])[: len(wanted)])
    entropies = row.place(torch.cat([p[1] for p in parts])[: len(wanted)])
    values = row.place(value_head(hidden).squeeze(-1).float()) if value_head is not None else None
    return logps, row.place(torch.ones(len(wanted), device=device)), entropies, values


@dataclass
class PackedRow:
    """Sequences laid end to end in one row, and where each answer token's prediction sits in it."""

    input_ids: Any
    position_ids: Any
    targets: Any
    """At each position, the next token where it is an answer's (0 elsewhere)."""
    mask: Any
    """The positions that predict an answer token."""
    where: tuple
    """(sequence, answer token) of each masked position, to place per-position values in ``[B, T]``."""
    shape: tuple[int, int]

    def place(self, flat):
        """Per-position values of the masked positions as ``[B, T]`` (0 past each answer's end)."""
        import torch

        return torch.zeros(self.shape, device=flat.device, dtype=flat.dtype).index_put(self.where, flat)


def packed(sequences: list[tuple[list[int], list[int]]], device) -> PackedRow:
    """``(prompt, answer)`` pairs as one padding-free row, position ids restarting at 0 at every sequence
    (attention then stays within each: the block-diagonal mask transformers derives from position ids)."""
    import torch

    ids, positions, targets, owners, places = [], [], [], [], []
    for index, (prompt, answer) in enumerate(sequences):
        tokens = list(prompt) + list(answer)
        ids += tokens
        positions += range(len(tokens))
        for t in range(len(tokens)):
            k = t - len(prompt) + 1  # position t predicts token t + 1: answer token k
            inside = 0 <= k < len(answer)
            targets.append(answer[k] if inside else 0)
            owners.append(index if inside else -1)
            places.append(k if inside else -1)
    owners_t, places_t = torch.tensor(owners, device=device), torch.tensor(places, device=device)
    mask = owners_t >= 0
    return PackedRow(torch.tensor([ids], device=device), torch.tensor([positions], device=device),
                     torch.tensor(targets, device=device), mask, (owners_t[mask], places_t[mask]),
                     (len(sequences), max(1, max(len(a) for _, a in sequences))))  # fmt: skip


def rollout_id(run_plan: str, step: int, prompt_id: str, sample: int) -> str:
    return hashlib.sha256(f"{run_plan} {step} {prompt_id} {sample}".encode()).hexdigest()[:32]


def write_step(folder: Path, step: int, rows: list[dict[str, Any]]) -> None:
    """One step's rollouts as ``step-NNNNNN.parquet`` in ``folder`` (atomically: a kill leaves none or all)."""
    import os

    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"step-{step:06d}.parquet"
    tmp = target.with_suffix(".tmp")
    pq.write_table(pa.Table.from_pylist(rows, schema=ROLLOUT_SCHEMA), tmp)
    os.replace(tmp, target)


def drop_after(folder: Path, step: int) -> None:
    """Forget the rollouts of steps after ``step`` (a resumed run makes them again)."""
    for path in folder.glob("step-*.parquet") if folder.is_dir() else []:
        if int(path.stem.split("-")[1]) > step:
            path.unlink()


def publish_rollouts(store: Store, name: str, folder: Path, prompts: list, run, recipe: dict[str, Any]):
    """The rollouts of every step as one dataset whose parents are the prompt datasets and the run."""
    import pyarrow.parquet as pq

    from manifests.publish import Publisher

    files = sorted(folder.glob("step-*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files]) if files else ROLLOUT_SCHEMA.empty_table()
    roles = {run.id: "run"}
    with Publisher(store, kind="dataset", name=name, stage="train.rollouts", recipe=recipe,
                   parents=[*prompts, run], parent_roles=roles) as pub:  # fmt: skip
        pub.write_table(table, split="train")
        zero = table.filter(pa.compute.field("zero_spread")) if table.num_rows else table
        return pub.publish(stats={"rows": table.num_rows, "steps": len(files),
                                  "zero_spread_prompts": len(set(zero["prompt_id"].to_pylist())),
                                  "mean_reward": float(pa.compute.mean(table["reward"]).as_py() or 0.0) if table.num_rows else None})  # fmt: skip


def rollout_rows(run_plan: str, step: int, row: dict[str, Any], answers, texts, rewards, parts, verdicts,
                 logp_sums, ref_sums, advantages, zero_spread: bool) -> list[dict[str, Any]]:  # fmt: skip
    """The rollout records of one prompt's group (see the module docstring)."""
    return [
        {"id": rollout_id(run_plan, step, row["id"], k), "parents": [row["id"]], "step": step,
         "policy_step": step - 1, "prompt_id": row["id"], "sample": k, "completion": texts[k],
         "completion_tokens": len(answers[k][0]), "truncated": answers[k][1], "reward": rewards[k],
         "rewards": json.dumps(parts[k], sort_keys=True), "verdicts": json.dumps(verdicts[k]),
         "logp_sum": logp_sums[k], "ref_logp_sum": ref_sums[k] if ref_sums is not None else None,
         "advantage": advantages[k], "zero_spread": zero_spread}
        for k in range(len(answers))
    ]  # fmt: skip
