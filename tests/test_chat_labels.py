"""One way to label a chat (``manifests.chat_labels``): the tokens SFT trains on are the tokens eval scores.

A 2-layer Llama with a word-level tokenizer (built from a config), so every expected token is
written out by hand.
"""

from __future__ import annotations

import pytest

from eval.perplexity import answer_nll
from manifests.chat_labels import IGNORED, labelled_conversation
from manifests.errors import DistilleryError

from .conftest import TINY_SPECIAL, TINY_TEMPLATE, WORDS, tiny_tokenizer

CHAT = [
    {"role": "system", "content": "alpha"},
    {"role": "user", "content": "beta gamma"},
    {"role": "assistant", "content": "delta"},
    {"role": "user", "content": "eta"},
    {"role": "assistant", "content": "theta iota kappa"},
]


def tiny_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(TINY_SPECIAL) + len(WORDS), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def test_every_assistant_turn_is_labelled_and_nothing_else():
    tokenizer = tiny_tokenizer()
    example = labelled_conversation(CHAT, tokenizer, "c")
    rendered = (
        "<|im_start|> system alpha <|im_end|> <|im_start|> user beta gamma <|im_end|> "
        "<|im_start|> assistant delta <|im_end|> <|im_start|> user eta <|im_end|> "
        "<|im_start|> assistant theta iota kappa <|im_end|>"
    )
    words = rendered.split(" ")
    assert tokenizer.convert_ids_to_tokens(example["input_ids"]) == words
    answers = {11, 12, 19, 20, 21, 22}  # "delta <|im_end|>", "theta iota kappa <|im_end|>"
    want = [token if i in answers else IGNORED for i, token in enumerate(example["input_ids"])]
    assert example["labels"] == want


def test_the_helpers_labels_give_the_models_own_loss_and_eval_scores_them_all():
    """A multi-turn chat: the loss on the helper's labels, by hand, equals ``model(labels=...).loss``,
    and perplexity's negative log-likelihood (every assistant turn, in a padded batch) is the same."""
    import torch

    model, tokenizer = tiny_model(), tiny_tokenizer()
    example = labelled_conversation(CHAT, tokenizer, "c")
    ids, labels = torch.tensor([example["input_ids"]]), torch.tensor([example["labels"]])
    with torch.no_grad():
        reference = model(input_ids=ids, labels=labels).loss
        log_probs = model(input_ids=ids).logits[0].log_softmax(-1)
    # By hand: token t is predicted at position t - 1, for the six answer tokens only.
    answer_positions = [11, 12, 19, 20, 21, 22]
    by_hand = -sum(float(log_probs[t - 1, example["input_ids"][t]]) for t in answer_positions) / 6
    assert float(reference) == pytest.approx(by_hand, rel=1e-6)
    # Eval: the same chat beside a shorter one (so it is padded), both turns scored.
    shorter = CHAT[:3]
    nll, tokens = answer_nll(model, tokenizer, [shorter, CHAT], max_length=64, batch_size=2)
    alone, alone_tokens = answer_nll(model, tokenizer, [CHAT], max_length=64, batch_size=1)
    assert (tokens, alone_tokens) == (2 + 6, 6)
    assert alone / alone_tokens == pytest.approx(float(reference), rel=1e-5)
    first, _ = answer_nll(model, tokenizer, [shorter], max_length=64, batch_size=1)
    assert nll == pytest.approx(first + alone, rel=1e-5)


def test_a_template_that_does_not_preserve_prefixes_is_one_clear_error_in_eval_too():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = "{% if messages|length > 3 %}system {% endif %}" + TINY_TEMPLATE
    with pytest.raises(
        DistilleryError, match="row r7: the chat template does not render the conversation up to turn 2"
    ):
        answer_nll(tiny_model(), tokenizer, [CHAT], max_length=64, batch_size=1, row_ids=["r7"])
    with pytest.raises(DistilleryError, match="row r8 has no assistant message"):
        answer_nll(tiny_model(), tiny_tokenizer(), [CHAT[:2]], max_length=64, batch_size=1, row_ids=["r8"])
