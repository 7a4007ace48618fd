"""``train`` (method ``dpo``): direct preference optimisation from preference datasets.

    stage: train
    method: dpo
    name: demo-dpo-run
    model: demo-sft-run                 # the policy starts here, and is the reference
    datasets: [{ref: demo-prefs}]       # prompt / chosen / rejected (``synth preferences``)
    loss: [sigmoid]                     # or several: [sigmoid, sft] with loss_weights: [1.0, 0.2]
    beta: 0.1
    peft: {method: lora, r: 8}
    eval_split: test

The loss variants are those TRL's DPOTrainer offers (``train/preference_losses.py``: sigmoid, IPO,
hinge, robust, EXO, NCA, BCO, SPPO, AOT, APO, DiscoPOP, length-normalised sigmoid, SFT), weighted
together, with β, label smoothing and the f-divergence of f-DPO.

What makes it fast is what is never computed: the LM head is applied only at the answers' positions, a
chunk at a time (as SFT's ``labelled_positions`` loss), so the prompts and the padding are never projected
onto the vocabulary, and the reference is not run during training (below). ``padding_free: true`` lays
every pair's prompt + chosen and prompt + rejected end to end in one row instead (TRL's DPOTrainer has
its padding-free mode switched off), position ids restarting at 0 at every sequence, so attention never
crosses from one sequence into another (the block-diagonal mask transformers derives from position ids;
``tests/test_train_preferences.py`` checks each pair's log-probs against the pair alone) -- worth it with a
variable-length attention kernel, not with CPU attention, which then attends over the whole row.

The reference's log-probs are computed once, before training, from the model as loaded (``reference:
precomputed``, the default): no second model in memory, no reference forward per step; they are kept
in the work folder (a resumed run reuses them) and published with the run as
``reference_logps.parquet`` (``id``, ``chosen``, ``rejected``). ``reference: online`` scores each
batch with the reference instead -- the base with the adapter disabled under PEFT, or a frozen copy
-- and ``reference_model:`` names another run as the reference (it must share the tokenizer).

Logged per step, and on the held-out split (``eval_split``) at the end, in ``metrics.jsonl`` and the
manifest: the implicit rewards of chosen and rejected (β · log-ratio), their margin and the reward
accuracy (the share of pairs whose chosen answer gets the higher reward).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, field_validator, model_validator

from manifests.chat_labels import IGNORED
from manifests.errors import DistilleryError
from manifests.model_runs import require_causal_lm
from manifests.models import CHECKPOINT_DIR, checkpoint_path, load_causal_lm, load_tokenizer
from manifests.publish import Publisher
from manifests.recipes import parse_config
from manifests.schema import Manifest
from manifests.store import Store
from train.checkpoint import trainer_work_folder
from train.data import load_mixture, pinned, resolve_datasets
from train.launch import as_a_job_of_one
from train.peft_config import build_peft_config, check_target_modules, model_load_kwargs
from train.preference_data import PAIR_COLUMNS, tokenized_pairs
from train.preference_losses import (
    FDivergence,
    PairLogps,
    PreferenceLoss,
    check_options,
    preference_losses,
    reward_metrics,
)
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

REFERENCE_FILE = "reference_logps.parquet"
PAIR_FIELDS = ("chosen", "rejected", "ref_chosen", "ref_rejected", "chosen_tokens", "rejected_tokens")


class DPORecipe(SFTRecipe):
    """Direct preference optimisation of a causal LM on chosen/rejected pairs."""

    method: Literal["dpo"] = "dpo"  # type: ignore[assignment]
    loss: list[PreferenceLoss] = Field(default_factory=lambda: ["sigmoid"], min_length=1)  # type: ignore[assignment]
    """The preference losses, summed by ``loss_weights`` (TRL's ``loss_type`` names)."""
    loss_weights: list[float] | None = None
    """One weight per loss (default 1 each)."""
    beta: float = Field(default=0.1, gt=0)
    """How far the policy may move from the reference (IPO: the regularisation τ)."""
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    """``robust``: the probability that a pair's preference is flipped, in [0, 0.5); ``exo_pair``: ε."""
    f_divergence: FDivergence = "reverse_kl"
    """The divergence regularising the policy toward the reference (f-DPO); ``reverse_kl`` is DPO's."""
    f_alpha: float = Field(default=0.5, gt=0)
    """``alpha_divergence``: its α."""
    discopop_tau: float = Field(default=0.05, gt=0)
    reference: Literal["precomputed", "online"] = "precomputed"
    """``precomputed``: the reference's log-probs once before training, from the model as loaded (or from
    ``reference_model``); ``online``: each batch scored by the reference as it trains."""
    reference_model: str | None = None
    """Another run as the reference (the same tokenizer); by default the model the policy starts from."""
    padding_free: bool = False
    """Every batch in one row without padding (attention kept within each sequence). Worth it with a
    variable-length attention kernel (flash-attention on GPUs); on CPU the block-diagonal mask over the whole
    row made a step 2.2x slower than padded rows (``benchmarks/train/dpo.py``), so the default pads."""
    max_length: int = Field(default=1024, ge=8)
    """Tokens of prompt + answer; an answer is cut to fit after its prompt."""

    @field_validator("loss", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> DPORecipe:
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss):
            raise ValueError(f"loss_weights: {len(self.loss_weights)} weights for {len(self.loss)} losses")
        try:  # every option of every loss, before any model loads
            check_options(
                self.loss, self.beta, self.label_smoothing, self.f_divergence, self.f_alpha, self.discopop_tau
            )
        except ValueError as e:
            raise ValueError(str(e)) from None
        if self.packing:
            raise ValueError(
                "packing: DPO lays pairs in one row with padding_free: true, not packing; drop packing"
            )
        if self.padding_free and self.peft.is_prompt_learning:
            raise ValueError(
                f"padding_free: the virtual tokens of peft.method {self.peft.method} would precede only the first "
                "sequence of a row; set padding_free: false"
            )
        return self


def pair_collator(pad_token_id: int, padding_free: bool):
    """Batches of tokenized pairs: every chosen sequence, then every rejected one (prompt + answer).

    ``target_ids`` holds at each position the next token where that token is an answer's (-100
    elsewhere) and ``target_seq`` the sequence it belongs to (chosen i is i, rejected i is n + i), so
    the log-prob sums of every sequence come from one pass over the labelled positions. Padding-free,
    the sequences are one row with ``position_ids`` restarting at 0; otherwise rows padded on the right.
    """
    import torch

    def collate(pairs: list[dict[str, Any]]) -> dict[str, Any]:
        n = len(pairs)
        sequences = [(p["prompt_ids"], p[side]) for side in ("chosen_ids", "rejected_ids") for p in pairs]
        ids, targets, owners = [], [], []
        for index, (prompt, answer) in enumerate(sequences):
            tokens = list(prompt) + list(answer)
            target = [IGNORED] * len(tokens)
            target[len(prompt) - 1 : len(tokens) - 1] = answer  # position t predicts token t + 1
            ids.append(tokens)
            targets.append(target)
            owners.append([index if t != IGNORED else -1 for t in target])
        batch: dict[str, Any] = {}
        if padding_free:
            batch["input_ids"] = torch.tensor([[t for s in ids for t in s]])
            batch["position_ids"] = torch.tensor([[i for s in ids for i in range(len(s))]])
            batch["target_ids"] = torch.tensor([[t for s in targets for t in s]])
            batch["target_seq"] = torch.tensor([[o for s in owners for o in s]])
        else:
            width = max(len(s) for s in ids)
            batch["input_ids"] = torch.tensor([s + [pad_token_id] * (width - len(s)) for s in ids])
            batch["attention_mask"] = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in ids])
            batch["target_ids"] = torch.tensor([s + [IGNORED] * (width - len(s)) for s in targets])
            batch["target_seq"] = torch.tensor([s + [-1] * (width - len(s)) for s in owners])
        batch["answer_tokens"] = torch.tensor(
            [len(p["chosen_ids"]) for p in pairs] + [len(p["rejected_ids"]) for p in pairs]
        )
        batch["pairs"] = torch.tensor(n)
        for key in ("ref_chosen", "ref_rejected", "margin"):
            if key in pairs[0]:
                batch[key] = torch.tensor([float(p[key]) for p in pairs], dtype=torch.float32)
        return batch

    return collate


def _chunk_logps(lm_head, hidden, targets):
    import torch.nn.functional as F

    return -F.cross_entropy(lm_head(hidden).float(), targets, reduction="none")


def sequence_logps(model, batch: dict[str, Any], lm_head, vocab_size: int):
    """The summed log-probs of every sequence's answer tokens ``[2n]`` (chosen first): the model runs
    without logits, the LM head only at the answers' positions, a checkpointed chunk at a time."""
    import torch
    from torch.utils.checkpoint import checkpoint

    forward = {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask") if k in batch}
    none_kept = torch.empty(0, dtype=torch.long, device=batch["input_ids"].device)
    outputs = model(**forward, use_cache=False, output_hidden_states=True, logits_to_keep=none_kept)
    hidden = outputs.hidden_states[-1][:, -batch["target_ids"].size(1) :]  # (prompt-learning: real positions)
    owners = batch["target_seq"]
    mask = owners >= 0
    hidden, targets, owners = hidden[mask], batch["target_ids"][mask], owners[mask]
    rows = max(1, LOGITS_PER_CHUNK // vocab_size)
    per_token = torch.cat([
        checkpoint(_chunk_logps, lm_head, hidden[i : i + rows], targets[i : i + rows], use_reentrant=False)
        for i in range(0, max(1, len(targets)), rows)
    ])[: len(targets)]  # fmt: skip
    sequences = 2 * int(batch["pairs"])
    return torch.zeros(sequences, device=per_token.device, dtype=per_token.dtype).index_add(
        0, owners, per_token
    )


def policy_accuracy(pairs: PairLogps) -> float:
    """The share of pairs whose chosen answer the policy itself finds likelier per token (length-normalised,
    so a shorter answer does not win for its length): meaningful before training too, when every implicit
    reward is still 0."""
    chosen, rejected = pairs.chosen / pairs.chosen_tokens, pairs.rejected / pairs.rejected_tokens
    return float((chosen > rejected).float().mean())


def _pair_logps(logps, ref_logps, batch) -> PairLogps:
    n = int(batch["pairs"])
    tokens = batch["answer_tokens"].to(logps.device).float()
    return PairLogps(chosen=logps[:n], rejected=logps[n:], ref_chosen=ref_logps[:n], ref_rejected=ref_logps[n:],
                     chosen_tokens=tokens[:n], rejected_tokens=tokens[n:])  # fmt: skip


def dpo_trainer(cfg: DPORecipe, reference, **kwargs):
    """TRL's SFTTrainer machinery (PEFT, launch, checkpoints) with the DPO loss over batches of pairs.

    ``reference`` is None (precomputed log-probs in the batch), ``"adapter"`` (the policy with its adapter
    disabled) or a frozen model."""
    import torch
    from trl import SFTTrainer

    options = {"beta": cfg.beta, "label_smoothing": cfg.label_smoothing, "divergence": cfg.f_divergence,
               "alpha": cfg.f_alpha, "discopop_tau": cfg.discopop_tau}  # fmt: skip

    class DPOTrainer(SFTTrainer):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.tokens_seen = 0
            self.logged: dict[str, dict[str, list[float]]] = {"train": {}, "eval": {}}
            self.vocab_size = self.model.config.get_text_config().vocab_size
            problem = lm_head_problem(self.model.config)
            if problem:
                raise DistilleryError(f"DPO applies the model's LM head itself, but {problem}")

        def reference_logps(self, model, batch):
            if reference is None:
                return torch.cat([batch["ref_chosen"], batch["ref_rejected"]]).to(batch["input_ids"].device)
            with torch.no_grad():
                if reference == "adapter":
                    with self.accelerator.unwrap_model(model).disable_adapter():
                        return sequence_logps(
                            model, batch, self.model.get_output_embeddings(), self.vocab_size
                        )
                reference.to(batch["input_ids"].device)
                return sequence_logps(reference, batch, reference.get_output_embeddings(), self.vocab_size)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if model.training else "eval"
            logps = sequence_logps(model, inputs, self.model.get_output_embeddings(), self.vocab_size)
            pairs = _pair_logps(logps, self.reference_logps(model, inputs), inputs)
            per_pair = preference_losses(cfg.loss, cfg.loss_weights, pairs, **options)
            loss = per_pair.mean()
            everyone = self.all_pairs(pairs)
            measured = reward_metrics(everyone, cfg.beta) | {"policy_accuracy": policy_accuracy(everyone)}
            for key, value in measured.items():
                self.logged[mode].setdefault(key, []).append(value)
            if mode == "train":
                local = (
                    inputs["input_ids"].numel()
                    if "attention_mask" not in inputs
                    else inputs["attention_mask"].sum()
                )
                self.tokens_seen += int(
                    self.accelerator.gather(torch.as_tensor(local, device=loss.device).reshape(1)).sum()
                )
            return (loss, None) if return_outputs else loss

        def all_pairs(self, pairs: PairLogps) -> PairLogps:
            """The pairs of every process (for the metrics; a last batch may be shorter on some)."""
            local = torch.stack([getattr(pairs, k).detach() for k in PAIR_FIELDS], dim=1)  # [n, 6]
            rows = self.accelerator.gather(self.accelerator.pad_across_processes(local, dim=0))
            rows = rows[rows[:, PAIR_FIELDS.index("chosen_tokens")] > 0]  # (padding rows have no tokens)
            return PairLogps(*rows.T)

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            device = self.args.device
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            with torch.no_grad():
                loss = self.compute_loss(model, inputs)
            return loss.detach(), None, None

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
            prefix = "eval_" if mode == "eval" else ""
            logs |= {f"{prefix}{k}": sum(v) / len(v) for k, v in self.logged[mode].items() if v}
            self.logged[mode] = {}
            if mode == "train" and "loss" in logs:
                logs["num_tokens"] = float(self.tokens_seen)
            super().log(logs, start_time)

    return DPOTrainer(**kwargs)


def reference_table(pairs: list[dict[str, Any]], model, collate, batch_size: int):
    """``(id, chosen, rejected)`` log-prob sums of every pair under ``model`` (frozen, evaluation mode)."""
    import torch

    head, vocab = model.get_output_embeddings(), model.config.get_text_config().vocab_size
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            part = pairs[start : start + batch_size]
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in collate(part).items()}
            logps = sequence_logps(model, batch, head, vocab).float().cpu()
            chosen += logps[: len(part)].tolist()
            rejected += logps[len(part) :].tolist()
    model.train(was_training)
    return pa.table({"id": [p["id"] for p in pairs], "chosen": chosen, "rejected": rejected})


def attach_reference(pairs: list[dict[str, Any]], table: pa.Table, what: str) -> None:
    by_id = dict(zip(table["id"].to_pylist(), zip(table["chosen"].to_pylist(), table["rejected"].to_pylist(),
                                                  strict=True), strict=True))  # fmt: skip
    for pair in pairs:
        if pair["id"] not in by_id:
            raise DistilleryError(
                f"{what}: the stored reference log-probs lack pair {pair['id']}; start the run again"
            )
        pair["ref_chosen"], pair["ref_rejected"] = by_id[pair["id"]]


def _policy_preference(pairs: list[dict[str, Any]], table: pa.Table) -> float:
    """The share of pairs whose chosen answer has the higher mean log-prob per token under ``table``'s model."""
    wins = sum(
        c / len(p["chosen_ids"]) > r / len(p["rejected_ids"])
        for p, c, r in zip(pairs, table["chosen"].to_pylist(), table["rejected"].to_pylist(), strict=True)
    )
    return wins / len(pairs)


def _check_tokenizers(policy_tok, reference_tok, reference: Manifest, policy_ref: str) -> None:
    from manifests.models import tokenizer_fingerprint

    if tokenizer_fingerprint(policy_tok) != tokenizer_fingerprint(reference_tok):
        raise DistilleryError(
            f"reference_model {reference.ref} and model {policy_ref} have different tokenizers; the log-ratios "
            "compare the same tokens -- give a reference of the policy's tokenizer"
        )


def _pairs_of(cfg: DPORecipe, store: Store, split: str | None, tokenizer, purpose: str):
    inputs = (
        [d.model_copy(update={"split": split, "weight": None}) for d in cfg.datasets]
        if split
        else cfg.datasets
    )
    curriculum = None if split else cfg.curriculum  # (held-out pairs are scored, not trained on in order)
    manifests = resolve_datasets(inputs, store, PAIR_COLUMNS, purpose, curriculum)
    mixture = load_mixture(inputs, manifests, PAIR_COLUMNS, cfg.seed, curriculum=curriculum)
    pairs, dropped = tokenized_pairs(mixture, tokenizer, cfg.max_length, margin=False)
    return manifests, pairs, dropped


def train_dpo(cfg: DPORecipe, store: Store) -> Manifest | None:
    import torch

    check_trainer_recipe(cfg)
    if cfg.guard.action == "rollback":
        raise DistilleryError("guard.action rollback needs method pretrain; for DPO use skip or stop")
    base = require_causal_lm(store.resolve(cfg.model, kind="run"), store)
    reference_run = (
        require_causal_lm(store.resolve(cfg.reference_model, kind="run"), store)
        if cfg.reference_model
        else None
    )
    if reference_run is not None and reference_run.id == base.id:
        reference_run = None  # (the default, named)
    tokenizer = load_tokenizer(base)
    if cfg.chat_template:
        tokenizer.chat_template = chat_template_text(cfg.chat_template)
    if reference_run is not None:
        _check_tokenizers(tokenizer, load_tokenizer(reference_run), reference_run, base.ref)
    if cfg.peft.target_modules:
        check_target_modules(cfg.peft.target_modules, architecture(base, store), base.ref)
    problem = lm_head_problem(architecture(base, store).config)
    if problem:
        raise DistilleryError(f"DPO applies the model's LM head itself, but {problem}")
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    cfg.check_launch(processes, torch.cuda.is_available())
    datasets, pairs, dropped = _pairs_of(cfg, store, None, tokenizer, "DPO")
    eval_pairs = (
        _pairs_of(cfg, store, cfg.eval_split, tokenizer, "DPO evaluation")[1] if cfg.eval_split else []
    )

    recipe = {k: v for k, v in cfg.resolved().items() if k != "resume"}
    recipe |= {"model": base.id, "datasets": pinned(cfg.datasets, datasets),
               "reference_model": reference_run.id if reference_run else None}  # fmt: skip
    plan = {k: v for k, v in recipe.items() if k not in REPORTING_FIELDS}
    main = int(os.environ.get("RANK", "0")) == 0
    work, last, metrics = trainer_work_folder(store, cfg.name, plan, cfg.resume, main)
    parents = [*datasets, base, *([reference_run] if reference_run else [])]
    roles = {base.id: "base_model"} | ({reference_run.id: "reference"} if reference_run else {})
    publisher = Publisher(store, kind="run", name=cfg.name, stage="train.dpo", recipe=recipe, parents=parents,
                          parent_roles=roles, seed=cfg.seed, execution={"resume": cfg.resume})  # fmt: skip
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = pair_collator(pad, cfg.padding_free)
    alone = as_a_job_of_one(zero_stage(cfg.strategy) is not None)
    with publisher if main else contextlib.nullcontext() as pub, alone:
        torch.manual_seed(cfg.seed)
        model, _ = load_causal_lm(base, store, **model_load_kwargs(cfg.peft))
        accuracy_before = None
        reference: Any = None
        if cfg.reference == "precomputed":
            scorer = load_causal_lm(reference_run, store)[0] if reference_run else model
            stored = work / REFERENCE_FILE
            if stored.is_file():  # (a resumed run: the reference of the first start, not the trained weights)
                table = pq.read_table(stored)
            else:
                table = reference_table(pairs, scorer, collate, cfg.per_device_batch_size)
                if main:
                    pq.write_table(table, stored.with_suffix(".tmp"))
                    os.replace(stored.with_suffix(".tmp"), stored)
            attach_reference(pairs, table, cfg.name)
            if eval_pairs:
                held_out = reference_table(eval_pairs, scorer, collate, cfg.per_device_batch_size)
                attach_reference(eval_pairs, held_out, cfg.name)
                accuracy_before = _policy_preference(eval_pairs, held_out) if scorer is model else None
            del scorer
        elif cfg.peft.method != "none" and reference_run is None:
            reference = "adapter"
        else:
            reference = load_causal_lm(reference_run or base, store)[0].eval().requires_grad_(False)
        from datasets import Dataset

        train_data, eval_data = (
            Dataset.from_list(pairs),
            Dataset.from_list(eval_pairs) if eval_pairs else None,
        )
        peft_config = build_peft_config(cfg.peft, model, str(checkpoint_path(base)))
        args = sft_arguments(cfg, work, model, processes)
        args.remove_unused_columns = False  # the pairs' token lists are the batch, not model inputs
        args.dataset_kwargs = {"skip_prepare_dataset": True}
        watch = trainer_watch(cfg, model, metrics, processes)
        with deepspeed_contradictions():
            trainer = dpo_trainer(cfg, reference, model=model, args=args, train_dataset=train_data,
                                  eval_dataset=eval_data, processing_class=tokenizer, peft_config=peft_config,
                                  callbacks=watch.callbacks, data_collator=collate)  # fmt: skip
        trainable = count_parameters(p for p in trainer.model.parameters() if p.requires_grad)
        started = time.time()
        result = train_watched(trainer, last, watch, cfg.name, main)
        if result is None:
            return None
        held_out = trainer.evaluate() if eval_data is not None else {}
        trainer.save_model(str(pub.dir / CHECKPOINT_DIR if main else work / "unused"))
        if not main:
            return None
        (pub.dir / CHECKPOINT_DIR / "training_args.bin").unlink(missing_ok=True)
        tokenizer.save_pretrained(pub.dir / CHECKPOINT_DIR)
        if cfg.reference == "precomputed":
            shutil.copy(work / REFERENCE_FILE, pub.dir / REFERENCE_FILE)
        shutil.copy(metrics, pub.dir / "metrics.jsonl")
        records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
        logged = [r for r in records if "loss" in r] or [{"loss": None}]
        stats = {
            "method": "dpo", "peft": cfg.peft.method, "loss": cfg.loss, "beta": cfg.beta, "reference": cfg.reference,
            "padding_free": cfg.padding_free, "steps": result.global_step, "train_pairs": len(pairs),
            "dropped_pairs": dropped, "tokens_seen": int(logged[-1].get("num_tokens", 0)),
            "first_loss": logged[0]["loss"], "final_loss": logged[-1]["loss"], "train_loss": result.training_loss,
            "wall_s": round(time.time() - started, 2), "trainable_parameters": trainable,
            "guard_triggers": watch.monitor.triggers, "processes": trainer.accelerator.num_processes,
            "distributed": trainer.accelerator.distributed_type.value,
            "eval": {k.removeprefix("eval_"): v for k, v in held_out.items() if not k.endswith(("_runtime", "per_second"))},
            "eval_policy_accuracy_before": accuracy_before,
        }  # fmt: skip
        manifest = pub.publish(stats=stats)
    shutil.rmtree(work, ignore_errors=True)
    return manifest


def run_recipe(data: dict[str, Any], store: Store, source: str) -> Manifest | None:
    return train_dpo(parse_config(DPORecipe, data, source), store)
