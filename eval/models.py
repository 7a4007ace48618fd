"""The models an eval asks: store runs (full checkpoints or adapters) and OpenAI-compatible endpoints.

    models:
      - student-base                      # a run in the store
      - demo-sft-run                      # an adapter run: loaded on its base and merged
      - {name: gpt, base_url: https://api.openai.com/v1, model: gpt-4o-mini, api_key_env: OPENAI_API_KEY}

A run generates here, in batches (greedy rows share one forward pass; sampled ones run under their
own seed, so an answer never depends on its batch); an endpoint is asked through the teacher engine
of ``synth`` — cached, retried and budgeted like any synth request, so a rerun pays for nothing twice.
Only a run can score perplexity or teacher agreement (an endpoint returns no log-probabilities of
given text).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from eval.perplexity import sample_nll
from eval.tasks import Generation
from manifests.errors import DistilleryError
from manifests.models import load_causal_lm
from manifests.schema import Manifest
from manifests.store import Store
from synth.teacher import cut_at_stop
from synth.teacher_requests import RunStopped, TeacherConfig


def ask_through_engine(engine_factory, requests, who: str) -> list[Any]:
    """The answers to ``requests(engine)`` from a fresh engine, all of them: a spent budget or a failed
    request is one error line naming ``who`` (what was answered stays cached for the rerun)."""

    async def ask() -> list[Any]:
        async with engine_factory() as engine:
            return await engine.ask(requests(engine))

    try:
        answers = asyncio.run(ask())
    except RunStopped as e:
        raise DistilleryError(
            f"{who}: the eval's budget is spent ({e}); raise 'budget:' and rerun (answers so far are cached)"
        ) from None
    failed = [a for a in answers if not a.ok]
    if failed:
        raise DistilleryError(
            f"{who}: {len(failed)} of {len(answers)} requests failed ({failed[0].error}); check its endpoint "
            "and rerun (answers so far are cached); nothing was published"
        )
    return answers


def chat_text(chat: list[dict[str, str]]) -> str:
    """A chat as plain text for ``chat_template: false``: the turns' contents, a blank line apart."""
    return "\n\n".join(m["content"] for m in chat) + (
        "\n\n" if chat and chat[-1]["role"] == "assistant" else ""
    )


def _prompt_ids(tokenizer, inputs: list) -> list[list[int]]:
    """Token ids of each prompt as generation will see it (chat template applied to a chat)."""
    texts = [x if isinstance(x, str) else tokenizer.apply_chat_template(x, tokenize=False, add_generation_prompt=True)
             for x in inputs]  # fmt: skip
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


@dataclass
class RunModel:
    """A causal LM run of the store, loaded once on first use."""

    label: str
    manifest: Manifest
    store: Store
    _loaded: tuple[Any, Any] | None = field(default=None, repr=False)
    _tokenizer: Any = field(default=None, repr=False)

    @property
    def run_id(self) -> str | None:
        return self.manifest.id

    def loaded(self):
        if self._loaded is None:
            model, tokenizer = load_causal_lm(self.manifest, self.store)
            model.eval()
            tokenizer.padding_side = "left"  # batched generation continues every row from its own last token
            self._loaded = model, tokenizer
        return self._loaded

    def tokenizer(self):
        """The run's tokenizer, read once (without loading the model: for the checks before any work)."""
        if self._tokenizer is None:
            from manifests.models import load_tokenizer

            self._tokenizer = self._loaded[1] if self._loaded else load_tokenizer(self.manifest)
        return self._tokenizer

    def require_chat_template(self, task: str, scoring: bool = False) -> None:
        if not self.tokenizer().chat_template:
            fix = (
                "give the run one (perplexity and teacher agreement score chat turns)"
                if scoring
                else "give the run one, or set 'chat_template: false' on the task to continue plain text"
            )
            raise DistilleryError(f"task {task}: model {self.label}'s tokenizer has no chat template; {fix}")

    def generate(self, prompts: list[list[dict[str, str]]], gen: Generation, chat_template: bool,
                 advance) -> list[list[str]]:  # fmt: skip
        """``gen.n`` answers per prompt, in prompt order."""
        from synth.teacher import generate_answers

        model, tokenizer = self.loaded()
        inputs = [p if chat_template else chat_text(p) for p in prompts]
        out: list[list[str]] = [[] for _ in prompts]
        if gen.temperature == 0:
            # Longest first (in tokens), in batches of similar length: less padding, an early OOM shows at once.
            lengths = [len(x) for x in _prompt_ids(tokenizer, inputs)]
            order = sorted(range(len(inputs)), key=lambda i: -lengths[i])
            for start in range(0, len(order), gen.batch_size):
                rows = order[start : start + gen.batch_size]
                answers = generate_answers(model, tokenizer, [inputs[i] for i in rows], gen.max_new_tokens,
                                           0.0, gen.top_p, [gen.seed] * len(rows), gen.stop)  # fmt: skip
                for i, a in zip(rows, answers, strict=True):
                    out[i] = [a.text]
                advance(len(rows))
            return out
        for i, prompt in enumerate(inputs):
            seeds = [gen.seed + k for k in range(gen.n)]
            answers = generate_answers(model, tokenizer, [prompt] * gen.n, gen.max_new_tokens, gen.temperature,
                                       gen.top_p, seeds, gen.stop)  # fmt: skip
            out[i] = [a.text for a in answers]
            advance(1)
        return out

    def nll(self, conversations, max_length: int, batch_size: int, row_ids: list[str], advance):
        model, tokenizer = self.loaded()
        return sample_nll(model, tokenizer, conversations, max_length, batch_size, row_ids, advance)

    def close(self) -> None:
        self._loaded = None


@dataclass
class EndpointModel:
    """An OpenAI-compatible endpoint, asked through the teacher engine (cache, retries, budget)."""

    label: str
    teacher: TeacherConfig
    store: Store
    engine_factory: Any
    """``() -> TeacherEngine`` (async context manager) for this model's requests."""

    run_id = None
    manifest = None

    def require_chat_template(self, task: str, scoring: bool = False) -> None:
        return None  # the endpoint applies its own

    def generate(self, prompts: list[list[dict[str, str]]], gen: Generation, chat_template: bool,
                 advance) -> list[list[str]]:  # fmt: skip
        from synth.teacher_requests import SamplingConfig

        if not chat_template:
            prompts = [[{"role": "user", "content": chat_text(p)}] for p in prompts]
        sampling = SamplingConfig(max_tokens=gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p,
                                  seed=gen.seed)  # fmt: skip

        def requests(engine) -> list[Any]:
            return [engine.request(self.label, p, sampling, k) for p in prompts for k in range(gen.n)]

        answers = ask_through_engine(self.engine_factory, requests, f"model {self.label}")
        advance(len(prompts))
        texts = [cut_at_stop(a.content or "", gen.stop)[0].strip() for a in answers]
        return [texts[i * gen.n : (i + 1) * gen.n] for i in range(len(prompts))]

    def nll(self, *args, **kwargs):
        raise DistilleryError(
            f"model {self.label} is an endpoint: it cannot score perplexity or teacher agreement (no "
            "log-probabilities of given text); use a store run, or drop those metrics for it with the task's 'models:'"
        )

    def close(self) -> None:
        return None
