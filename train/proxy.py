"""``train`` (method ``proxy``): an open stand-in for a black-box teacher, to distil a student from.

    stage: train
    method: proxy
    name: teacher-proxy
    model: proxy-base                  # an open model of the student's tokenizer
    datasets: [{ref: api-answers}]     # `synth generate` rows: messages + requests (+ logprobs)
    student: student-base              # optional: checked to share the proxy's tokenizer
    logprobs_weight: 1.0               # the top-k term beside the SFT loss
    max_steps: 200

A teacher behind an API gives text, and at best the log-probs of its top-k tokens -- never its whole
distribution, hidden states or attention. The proxy is fitted to what it does give: SFT on its answers
(the shared core, ``train/sft.py``), plus, on the rows that carry ``logprobs`` (``synth generate`` with
``sampling: {top_logprobs: k}``), a sparse divergence between the API's top-k and the proxy's
distribution at those answer tokens. Then ``method: distill`` with ``teacher: teacher-proxy`` distils the
student white-box from the proxy (every logit, hidden states, attention).

**The top-k term.** At an aligned position the API names k tokens with their log-probs; the rest of its
mass (1 - their sum) is one more outcome, and the proxy's mass outside those k tokens is its counterpart.
The term is the forward KL between these two (k+1)-outcome distributions (``sparse_topk_kl``): zero
exactly when the proxy gives each named token the API's probability. It is summed over the aligned
positions and divided, like the cross-entropy, by the answer tokens of the batch.

**Alignment.** The API's tokenizer is generally not the proxy's. Both sides' answer tokens are turned
into character spans of the answer text (each token's text as decoded after the tokens before it, so a
leading space is its own); an API position is used only where its token has the very span and text of
one proxy token (the boundaries coincide), and every one of its alternatives (and the chosen token) is
a single proxy token (the text encodes to one id, not the unknown token). Other positions are skipped;
``stats.logprob_positions`` counts them by reason. Rows without log-probs (an endpoint that returns
none) are plain SFT rows, counted in ``stats.rows_without_logprobs``.

The run's parents are the datasets and the base; its recipe and stats name the black-box teacher(s) as
the data's ``requests`` lineage recorded them: ``{"endpoint", "served_model", "teacher"}``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, model_validator

from manifests.chat_labels import IGNORED, labelled_conversation, render_chat
from manifests.console import make_console
from manifests.data import read_table
from manifests.errors import DistilleryError, RunFailed
from manifests.model_runs import require_causal_lm
from manifests.models import (
    CHECKPOINT_DIR,
    checkpoint_path,
    load_causal_lm,
    load_tokenizer,
    tokenizer_fingerprint,
)
from manifests.publish import Publisher
from manifests.recipes import parse_config
from manifests.schema import Manifest
from manifests.store import Store
from train.checkpoint import trainer_work_folder
from train.data import DatasetInput, load_mixture, pinned, resolve_datasets
from train.launch import as_a_job_of_one
from train.peft_config import build_peft_config, check_target_modules, model_load_kwargs
from train.sft import (
    LOGITS_PER_CHUNK,
    REPORTING_FIELDS,
    SFTRecipe,
    architecture,
    chat_template_text,
    check_trainer_recipe,
    count_parameters,
    deepspeed_contradictions,
    lm_head_problem,
    sft_arguments,
    train_watched,
    trainer_watch,
)
from train.strategy import zero_stage

COLUMNS = ["id", "messages", "requests"]
"""What a proxy's data must have (``synth generate`` rows); ``logprobs`` is used where present."""
CONTEXT_TOKENS = 8
"""Tokens decoded before a token to find its own text (its leading space, a merged byte piece)."""
SKIPS = ("boundary", "alternatives", "beyond_max_length", "unaligned_row")


class ProxyRecipe(SFTRecipe):
    """SFT of an open proxy on a black-box teacher's answers, matching its top-k log-probs where given."""

    method: Literal["proxy"] = "proxy"  # type: ignore[assignment]
    logprobs_weight: float = Field(default=1.0, ge=0)
    """Weight of the top-k term (the KL to the API's top-k log-probs) beside the cross-entropy; 0 is plain SFT."""
    student: str | None = None
    """The run that will distil from this proxy: checked, before training, to share the proxy's tokenizer."""

    @model_validator(mode="after")
    def _consistent(self) -> ProxyRecipe:
        if self.packing:
            raise ValueError(
                "packing: a proxy trains on padded rows (the top-k targets follow each row); drop it"
            )
        if (
            getattr(self, "curriculum", None) is not None
        ):  # (the rows would silently keep the mixture's order)
            raise ValueError("curriculum: method proxy does not order its rows yet; drop curriculum")
        if self.loss != "labelled_positions":
            raise ValueError("loss: a proxy computes its own loss on the answer positions; drop loss: trl")
        return self


# --------------------------------------------------------------------------------------------- alignment


def token_texts(tokenizer, ids: list[int], start: int, end: int) -> list[str]:
    """The text each of ``ids[start:end]`` adds after the tokens before it (special tokens as text)."""
    texts = []
    for i in range(start, end):
        window = ids[max(0, i - CONTEXT_TOKENS) : i]
        before = tokenizer.decode(window, skip_special_tokens=False)
        after = tokenizer.decode([*window, ids[i]], skip_special_tokens=False)
        texts.append(after[len(before) :] if after.startswith(before) else tokenizer.decode([ids[i]]))
    return texts


def spans_in(texts: list[str], content: str) -> list[tuple[int, int, str]] | None:
    """Each token's ``(start, end, text)`` in characters of ``content`` (the tokens' joined text holds it,
    perhaps after a leading space or before an end-of-turn), or None where it does not."""
    joined = "".join(texts)
    offset = joined.find(content)
    if offset < 0:
        return None
    spans, at = [], -offset
    for text in texts:
        spans.append((at, at + len(text), text))
        at += len(text)
    return spans


@dataclass
class Alignment:
    """The API's top-k of one answer, at the proxy's answer positions."""

    targets: dict[int, tuple[list[int], list[float]]] = field(default_factory=dict)
    """Proxy answer position → (proxy token ids, the API's log-probs of them)."""
    api_positions: int = 0
    skipped: Counter = field(default_factory=Counter)
    """Skipped API positions by reason (``SKIPS``)."""


def align_top_logprobs(content: str, api_tokens: list[dict[str, Any]], proxy_texts: list[str],
                       proxy_ids: list[int], to_proxy: Callable[[str], int | None]) -> Alignment:  # fmt: skip
    """Where the API's answer tokens ``api_tokens`` (``{"token", "logprob", "top": [{"token", "logprob"}]}``)
    can teach the proxy, whose answer tokens are ``proxy_ids`` with texts ``proxy_texts``.

    An API position is used where its token has the same span of ``content`` and the same text as a proxy
    token, and its alternatives (with the chosen token) each map to one proxy token (``to_proxy``), no two
    to the same one."""
    out = Alignment(api_positions=len(api_tokens))
    api_spans = spans_in([t["token"] for t in api_tokens], content)
    proxy_spans = spans_in(proxy_texts, content)
    if api_spans is None or proxy_spans is None:
        out.skipped["unaligned_row"] = len(api_tokens)
        return out
    position_of = {span: j for j, span in enumerate(proxy_spans)}
    for token, span in zip(api_tokens, api_spans, strict=True):
        j = position_of.get(span)
        if j is None:
            out.skipped["boundary"] += 1
            continue
        named = {a["token"]: a["logprob"] for a in token.get("top") or []}
        named.setdefault(token["token"], token["logprob"])  # (sampled outside the top-k: still known)
        ids = [proxy_ids[j] if text == token["token"] else to_proxy(text) for text in named]
        if any(i is None for i in ids) or len(set(ids)) < len(ids):
            out.skipped["alternatives"] += 1
            continue
        out.targets[j] = (ids, list(named.values()))
    return out


def single_token_mapper(tokenizer, vocab_size: int) -> Callable[[str], int | None]:
    """``text`` → the one proxy token it encodes to, or None (several tokens, none, the unknown token)."""
    known: dict[str, int | None] = {}

    def to_proxy(text: str) -> int | None:
        if text not in known:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
            one = len(ids) == 1 and ids[0] != tokenizer.unk_token_id and ids[0] < vocab_size
            known[text] = ids[0] if one else None
        return known[text]

    return to_proxy


# --------------------------------------------------------------------------------------------- data


@dataclass
class ProxyData:
    examples: list[dict[str, Any]]
    top_k: int
    """Targets per position (the most any position has; fewer are padded with id -1)."""
    rows_with_logprobs: int = 0
    api_positions: int = 0
    used: int = 0
    skipped: Counter = field(default_factory=Counter)


def proxy_examples(rows: list[dict[str, Any]], logprobs: dict[str, list | None], tokenizer, max_length: int,
                   vocab_size: int) -> ProxyData:  # fmt: skip
    """Tokenized rows (``input_ids``, ``labels``) with, per answer target position, the API's top-k
    mapped to proxy ids (``topk_ids``, ``topk_logprobs``: flattened, -1 where a position has none)."""
    to_proxy = single_token_mapper(tokenizer, vocab_size)
    data = ProxyData([], 1)
    aligned: list[dict[int, tuple[list[int], list[float]]]] = []
    for row in rows:
        messages = [{k: v for k, v in m.items() if v is not None} for m in row["messages"]]
        tokens = labelled_conversation(messages, tokenizer, row["id"])
        ids, labels = tokens["input_ids"][:max_length], tokens["labels"][:max_length]
        # The target index of every labelled token (position p - 1 predicts token p), as the loss visits them.
        target_of = {p: n for n, p in enumerate(p for p in range(1, len(labels)) if labels[p] != IGNORED)}
        targets: dict[int, tuple[list[int], list[float]]] = {}
        api = logprobs.get(row["id"])
        if api is not None and messages[-1].get("role") == "assistant":
            data.rows_with_logprobs += 1
            start = len(render_chat(tokenizer, messages[:-1], add_generation_prompt=True))
            whole = tokens["input_ids"]
            answer = whole[start:]
            alignment = align_top_logprobs(messages[-1]["content"], api, token_texts(tokenizer, whole, start, len(whole)),
                                           answer, to_proxy)  # fmt: skip
            data.api_positions += alignment.api_positions
            data.skipped.update(alignment.skipped)
            for j, target in alignment.targets.items():
                if start + j in target_of:
                    targets[target_of[start + j]] = target
                    data.top_k = max(data.top_k, len(target[0]))
                else:
                    data.skipped["beyond_max_length"] += 1
            data.used += len(targets)
        data.examples.append(
            {"id": row["id"], "input_ids": ids, "labels": labels, "_targets": len(target_of)}
        )
        aligned.append(targets)
    k = data.top_k
    for example, targets in zip(data.examples, aligned, strict=True):
        n = example.pop("_targets")
        flat_ids, flat_lp = [-1] * (n * k), [0.0] * (n * k)
        for t, (ids, values) in targets.items():
            flat_ids[t * k : t * k + len(ids)], flat_lp[t * k : t * k + len(values)] = ids, values
        example["topk_ids"], example["topk_logprobs"] = flat_ids, flat_lp
    return data


def black_box_teachers(manifests: list[Manifest], inputs: list[DatasetInput]) -> list[dict[str, Any]]:
    """The teachers the data's ``requests`` lineage names, with the rows each answered."""
    counts: Counter = Counter()
    for m, d in zip(manifests, inputs, strict=True):
        for requests in read_table(m, split=d.split, columns=["requests"])["requests"].to_pylist():
            for r in requests or []:
                counts[(r.get("endpoint"), r.get("served_model"), r.get("teacher"))] += 1
    return [
        {"endpoint": e, "served_model": s, "teacher": t, "rows": n}
        for (e, s, t), n in sorted(counts.items(), key=str)
    ]


def api_logprobs(manifests: list[Manifest], inputs: list[DatasetInput]) -> dict[str, list | None]:
    """Row id → its ``logprobs`` (None where the endpoint returned none), from the datasets that have the column."""
    import pyarrow.parquet as pq

    found: dict[str, list | None] = {}
    for m, d in zip(manifests, inputs, strict=True):
        if "logprobs" in pq.read_schema(m.location / m.data_files()[0].path).names:
            table = read_table(m, split=d.split, columns=["id", "logprobs"])
            found |= dict(zip(table["id"].to_pylist(), table["logprobs"].to_pylist(), strict=True))
    return found


# --------------------------------------------------------------------------------------------- the loss


def sparse_topk_kl(logits, ids, logprobs):
    """Per position, KL(API || proxy) over the API's named tokens plus one outcome for the rest.

    ``logits`` [n, V] (the proxy's), ``ids`` [n, k] (proxy token ids, -1 for none), ``logprobs`` [n, k]
    (the API's). A position without any id gives 0."""
    import torch

    valid = ids >= 0
    safe = ids.clamp(min=0).long()
    log_z = logits.logsumexp(-1)
    proxy = logits.gather(-1, safe) - log_z[:, None]
    api = logprobs.float().masked_fill(~valid, float("-inf"))
    p = api.exp()
    p = p / p.sum(-1, keepdim=True).clamp(min=1.0)  # (rounded API values may sum past 1)
    named = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, safe, valid)
    proxy_rest = logits.masked_fill(named, float("-inf")).logsumexp(-1) - log_z
    p_rest = (1 - p.sum(-1)).clamp(min=0)
    terms = torch.where(valid, p * (p.clamp(min=1e-30).log() - proxy), torch.zeros_like(proxy)).sum(-1)
    rest = torch.special.xlogy(p_rest, p_rest) - torch.where(p_rest > 0, p_rest * proxy_rest, 0.0)
    return torch.where(valid.any(-1), terms + rest, torch.zeros_like(terms))


def _chunk_terms(head, hidden, targets, ids, logprobs):
    """(summed cross-entropy, summed top-k KL) of one chunk of answer positions."""
    import torch
    import torch.nn.functional as F

    logits = head(hidden).float()
    ce = F.cross_entropy(logits, targets, reduction="sum")
    return torch.stack([ce, sparse_topk_kl(logits, ids, logprobs).sum()])


def proxy_collator(pad_token_id: int, top_k: int):
    """TRL's padding collator, with the examples' top-k targets concatenated in the order of their answer
    positions (the order the loss visits them): ``topk_ids`` and ``topk_logprobs`` [positions, k]."""
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    base = DataCollatorForLanguageModeling(pad_token_id=pad_token_id)

    def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = base([{k: e[k] for k in ("input_ids", "labels")} for e in examples])
        batch["topk_ids"] = torch.tensor([i for e in examples for i in e["topk_ids"]]).view(-1, top_k)
        values = [v for e in examples for v in e["topk_logprobs"]]
        batch["topk_logprobs"] = torch.tensor(values, dtype=torch.float32).view(-1, top_k)
        return batch

    return collate


def proxy_trainer(cfg: ProxyRecipe, **kwargs):
    """TRL's SFTTrainer machinery with the proxy's loss: cross-entropy plus the weighted top-k KL."""
    import torch
    from torch.utils.checkpoint import checkpoint
    from trl import SFTTrainer

    class ProxyTrainer(SFTTrainer):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.tokens_seen = 0
            self.logged: dict[str, list[float]] = {}
            self.vocab_size = self.model.config.get_text_config().vocab_size

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ids, logprobs = inputs.pop("topk_ids"), inputs.pop("topk_logprobs")
            labels = inputs["labels"]
            forward = {k: v for k, v in inputs.items() if k not in ("labels", "use_cache")}
            none_kept = torch.empty(0, dtype=torch.long, device=labels.device)
            out = model(**forward, use_cache=False, output_hidden_states=True, logits_to_keep=none_kept)
            hidden = out.hidden_states[-1][:, -labels.size(1) :][:, :-1]  # (prompt-learning: real positions)
            targets = labels[:, 1:]
            mask = targets != IGNORED
            hidden, targets = hidden[mask], targets[mask]
            if len(ids) != len(targets):
                raise RunFailed("the top-k targets do not line up with the batch's answer positions")
            head = self.model.get_output_embeddings()
            rows = max(1, LOGITS_PER_CHUNK // self.vocab_size)
            ce, kl = sum(
                checkpoint(
                    _chunk_terms,
                    head,
                    hidden[i : i + rows],
                    targets[i : i + rows],
                    ids[i : i + rows],
                    logprobs[i : i + rows],
                    use_reentrant=False,
                )  # fmt: skip
                for i in range(0, max(1, len(targets)), rows)
            )
            # Normalised as SFT's loss (train/sft.py): by the answer tokens of every accumulated micro-batch
            # (of all processes) when the Trainer counts them. Held out, the proxy's own cross-entropy.
            weight = cfg.logprobs_weight if model.training else 0.0
            count = mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = (ce + weight * kl) / torch.as_tensor(count, device=ce.device).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            if model.training:
                n, used = mask.sum().clamp(min=1), (ids[:, 0] >= 0).sum()
                for name, value in (("proxy_ce", ce / n), ("proxy_topk_kl", kl / used.clamp(min=1))):
                    total, calls = self.logged.get(name, [0.0, 0])
                    self.logged[name] = [total + float(value.detach()), calls + 1]
                local = inputs["attention_mask"].sum().reshape(1)
                self.tokens_seen += int(self.accelerator.gather(local).sum())
            return (loss, None) if return_outputs else loss

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            device = self.args.device
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            with torch.no_grad():
                loss = self.compute_loss(model, inputs)
            return loss.detach(), None, None

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            if "loss" in logs:
                logs["num_tokens"] = float(self.tokens_seen)
                logs |= {key: total / max(1, calls) for key, (total, calls) in self.logged.items()}
                self.logged = {}
            super().log(logs, start_time)

    return ProxyTrainer(**kwargs)


# --------------------------------------------------------------------------------------------- the run


def _check_student(cfg: ProxyRecipe, store: Store, tokenizer, base: Manifest) -> Manifest | None:
    if cfg.student is None:
        return None
    student = require_causal_lm(store.resolve(cfg.student, kind="run"), store)
    if tokenizer_fingerprint(load_tokenizer(student)) != tokenizer_fingerprint(tokenizer):
        raise DistilleryError(
            f"student {student.ref} and proxy base {base.ref} have different tokenizers; the student distils "
            "from the proxy's logits token id by token id -- give a proxy base of the student's tokenizer"
        )
    return student


def _examples_of(
    cfg: ProxyRecipe, store: Store, inputs: list[DatasetInput], tokenizer, vocab: int, purpose: str
):
    datasets = resolve_datasets(inputs, store, COLUMNS, purpose)
    mixture = load_mixture(inputs, datasets, ["id", "messages"], cfg.seed)
    if len(mixture) == 0:
        raise DistilleryError(
            f"datasets: {', '.join(m.ref for m in datasets)} hold no rows in the split(s) given"
        )
    logprobs = api_logprobs(datasets, inputs)
    return datasets, proxy_examples(mixture.to_list(), logprobs, tokenizer, cfg.max_length, vocab)


def train_proxy(cfg: ProxyRecipe, store: Store) -> Manifest | None:
    import torch
    from datasets import Dataset

    check_trainer_recipe(cfg)
    if cfg.guard.action == "rollback":
        raise DistilleryError("guard.action rollback needs method pretrain; for a proxy use skip or stop")
    base = require_causal_lm(store.resolve(cfg.model, kind="run"), store)
    tokenizer = load_tokenizer(base)
    if cfg.chat_template:
        tokenizer.chat_template = chat_template_text(cfg.chat_template)
    if not tokenizer.chat_template:
        raise DistilleryError(
            f"model {base.ref} has no chat template and the data are chats; set chat_template:"
        )
    student = _check_student(cfg, store, tokenizer, base)
    config = architecture(base, store).config
    problem = lm_head_problem(config)
    if problem:
        raise DistilleryError(f"a proxy's loss applies the model's LM head itself, but {problem}")
    if cfg.peft.target_modules:
        check_target_modules(cfg.peft.target_modules, architecture(base, store), base.ref)
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    cfg.check_launch(processes, torch.cuda.is_available())
    vocab = config.get_text_config().vocab_size
    datasets, data = _examples_of(cfg, store, cfg.datasets, tokenizer, vocab, "a proxy")
    teachers = black_box_teachers(datasets, cfg.datasets)
    eval_data = None
    if cfg.eval_split:
        held_out = [d.model_copy(update={"split": cfg.eval_split, "weight": None}) for d in cfg.datasets]
        _, held = _examples_of(cfg, store, held_out, tokenizer, vocab, "a proxy's evaluation")
        rows = [
            {k: v for k, v in (e | _padded(e, held.top_k, data.top_k)).items() if k != "id"}
            for e in held.examples
        ]
        eval_data = Dataset.from_list(rows)
    without = len(data.examples) - data.rows_with_logprobs
    if without and cfg.logprobs_weight:
        make_console().print(
            f"{cfg.name}: {without} of {len(data.examples)} rows carry no top-logprobs (the endpoint returned "
            "none): plain SFT on those"
        )

    recipe = {k: v for k, v in cfg.resolved().items() if k != "resume"}
    recipe |= {"model": base.id, "datasets": pinned(cfg.datasets, datasets), "student": student.id if student else None,
               "black_box_teachers": [{k: t[k] for k in ("endpoint", "served_model", "teacher")} for t in teachers]}  # fmt: skip
    plan = {k: v for k, v in recipe.items() if k not in REPORTING_FIELDS}
    main = int(os.environ.get("RANK", "0")) == 0
    work, last, metrics = trainer_work_folder(store, cfg.name, plan, cfg.resume, main)
    publisher = Publisher(store, kind="run", name=cfg.name, stage="train.proxy", recipe=recipe,
                          parents=[*datasets, base], parent_roles={base.id: "base_model"}, seed=cfg.seed,
                          execution={"resume": cfg.resume})  # fmt: skip
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    alone = as_a_job_of_one(zero_stage(cfg.strategy) is not None)
    with publisher if main else contextlib.nullcontext() as pub, alone:
        torch.manual_seed(cfg.seed)
        model, _ = load_causal_lm(base, store, **model_load_kwargs(cfg.peft))
        peft_config = build_peft_config(cfg.peft, model, str(checkpoint_path(base)))
        args = sft_arguments(cfg, work, model, processes)
        args.remove_unused_columns = False  # the top-k targets travel with each example
        watch = trainer_watch(cfg, model, metrics, processes)
        train_data = Dataset.from_list([{k: v for k, v in e.items() if k != "id"} for e in data.examples])
        with deepspeed_contradictions():
            trainer = proxy_trainer(cfg, model=model, args=args, train_dataset=train_data, eval_dataset=eval_data,
                                    processing_class=tokenizer, peft_config=peft_config, callbacks=watch.callbacks,
                                    data_collator=proxy_collator(pad, data.top_k))  # fmt: skip
        trainable = count_parameters(p for p in trainer.model.parameters() if p.requires_grad)
        started = time.time()
        result = train_watched(trainer, last, watch, cfg.name, main)
        if result is None:
            return None
        trainer.save_model(str(pub.dir / CHECKPOINT_DIR if main else work / "unused"))
        if not main:
            return None
        (pub.dir / CHECKPOINT_DIR / "training_args.bin").unlink(missing_ok=True)
        tokenizer.save_pretrained(pub.dir / CHECKPOINT_DIR)
        shutil.copy(metrics, pub.dir / "metrics.jsonl")
        records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
        logged = [r for r in records if "loss" in r] or [{"loss": None}]
        evaluated = [r["eval_loss"] for r in records if "eval_loss" in r]
        stats = {
            "method": "proxy", "peft": cfg.peft.method, "steps": result.global_step, "train_rows": len(train_data),
            "black_box_teachers": teachers, "rows_with_logprobs": data.rows_with_logprobs,
            "rows_without_logprobs": without, "plain_sft_rows": without if cfg.logprobs_weight else len(train_data),
            "top_k": data.top_k,
            "logprob_positions": {"api": data.api_positions, "used": data.used,
                                  "skipped": {reason: data.skipped.get(reason, 0) for reason in SKIPS}},
            "tokens_seen": int(logged[-1].get("num_tokens", 0)), "first_loss": logged[0]["loss"],
            "final_loss": logged[-1]["loss"], "train_loss": result.training_loss,
            "components": {k: logged[-1][k] for k in ("proxy_ce", "proxy_topk_kl") if k in logged[-1]},
            "eval_loss": evaluated[-1] if evaluated else None, "wall_s": round(time.time() - started, 2),
            "trainable_parameters": trainable, "guard_triggers": watch.monitor.triggers,
            "processes": trainer.accelerator.num_processes, "distributed": trainer.accelerator.distributed_type.value,
        }  # fmt: skip
        manifest = pub.publish(stats=stats)
    shutil.rmtree(work, ignore_errors=True)
    return manifest


def _padded(example: dict[str, Any], k: int, to: int) -> dict[str, Any]:
    """A held-out example's targets widened from ``k`` to the training run's ``to`` per position (or cut)."""
    rows = len(example["topk_ids"]) // k
    ids = [example["topk_ids"][r * k : r * k + k][:to] + [-1] * max(0, to - k) for r in range(rows)]
    values = [example["topk_logprobs"][r * k : r * k + k][:to] + [0.0] * max(0, to - k) for r in range(rows)]
    return {"topk_ids": [i for row in ids for i in row], "topk_logprobs": [v for row in values for v in row]}


def run_recipe(data: dict[str, Any], store: Store, source: str) -> Manifest | None:
    return train_proxy(parse_config(ProxyRecipe, data, source), store)
