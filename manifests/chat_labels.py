"""The one way a chat is labelled: token ids, and labels on every assistant turn only.

SFT trains on these labels and ``eval`` perplexity scores them, so "what the model must learn to
say" is the same tokens in both. For a ChatML chat

    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."},
     {"role": "user", "content": "And 3 + 3?"}, {"role": "assistant", "content": "It is 6."}]

the labelled tokens decode to ``4.<|im_end|>\\n`` and ``It is 6.<|im_end|>\\n``; every other
label is -100 (system and user turns, role headers). A turn's tokens are those between the
conversation rendered up to it (with the generation prompt) and rendered through it: its answer
and end-of-turn. This needs no ``{% generation %}`` markers in the template (SmolLM2's ChatML has
none), but it needs a template that renders a conversation's prefixes as prefixes of the whole;
one that does not is an error naming the row. For one turn this is exactly TRL's
prompt-completion masking (``tests/test_train_sft.py`` checks it).

A leaf module: ``train`` and ``eval`` both import it, and it imports no stage package.
"""

from __future__ import annotations

from typing import Any

from manifests.errors import DistilleryError

IGNORED = -100
"""The label of a token that carries no loss (PyTorch's and transformers' ``ignore_index``)."""


def render_chat(tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of ``messages`` through the tokenizer's chat template."""
    # Tokenized as TRL tokenizes chats (``apply_chat_template(tokenize=True)``), so both routes give the same ids.
    encoded = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt
    )
    return list(encoded["input_ids"])


def labelled_conversation(
    messages: list[dict[str, Any]], tokenizer, row_id: str = "?"
) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` of one chat: labels are -100 except on the assistant turns."""
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    ids = render_chat(tokenizer, messages)
    labels = [IGNORED] * len(ids)
    turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if not turns:
        raise DistilleryError(f"row {row_id} has no assistant message: nothing to learn or score")
    for i in turns:
        start = render_chat(tokenizer, messages[:i], add_generation_prompt=True) if i else []
        through = render_chat(tokenizer, messages[: i + 1])
        if ids[: len(start)] != start or ids[: len(through)] != through or len(through) < len(start):
            raise DistilleryError(
                f"row {row_id}: the chat template does not render the conversation up to turn {i} as the start "
                "of the whole conversation, so the assistant's tokens cannot be found; use a chat template that "
                "renders earlier turns the same way (SFT: chat_template: in the recipe)"
            )
        labels[len(start) : len(through)] = ids[len(start) : len(through)]
    return {"input_ids": ids, "labels": labels}
