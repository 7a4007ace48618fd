"""Teacher agreement, for distillation: how closely a student's next-token distribution follows its
teacher's on held-out answers.

Per answer token (the positions SFT and perplexity label, ``manifests.chat_labels``): whether the
two argmax tokens agree, and KL(teacher ‖ student) = Σ_v p_t(v) (log p_t(v) − log p_s(v)) — the
forward KL that logit distillation minimises. A sample's values are its token means; the task's are
pooled over all answer tokens. Both models must share a tokenizer (the same ids for the same text);
a mismatch is one error line naming both.
"""

from __future__ import annotations

from collections.abc import Callable

from eval.perplexity import labelled_batches, next_token_logits
from manifests.chat_labels import IGNORED
from manifests.errors import DistilleryError


def require_same_tokenizer(student_label: str, student_tok, teacher_label: str, teacher_tok) -> None:
    if student_tok.get_vocab() != teacher_tok.get_vocab():
        raise DistilleryError(
            f"teacher agreement compares token distributions, but {student_label} ({len(student_tok)} tokens) and "
            f"teacher {teacher_label} ({len(teacher_tok)} tokens) have different tokenizers; use a teacher of the "
            "student's tokenizer"
        )


def agreement(
    student,
    teacher,
    tokenizer,
    conversations: list[list[dict]],
    max_length: int,
    batch_size: int,
    row_ids: list[str],
    advance: Callable[[int], None] | None = None,
) -> list[tuple[int, float, int]]:
    """Per chat: (argmax agreements, summed KL(teacher ‖ student), answer tokens)."""
    import torch

    out: list[tuple[int, float, int]] = []
    for input_ids, mask, labels in labelled_batches(
        tokenizer, conversations, max_length, batch_size, row_ids
    ):
        s_logits = next_token_logits(student, input_ids, mask)
        t_logits = next_token_logits(teacher, input_ids, mask)
        if s_logits.size(-1) != t_logits.size(-1):  # padded embedding tables: compare the shared ids
            width = min(s_logits.size(-1), t_logits.size(-1))
            s_logits, t_logits = s_logits[..., :width], t_logits[..., :width]
        scored = labels[:, 1:] != IGNORED
        s_log = torch.log_softmax(s_logits, dim=-1)
        t_log = torch.log_softmax(t_logits, dim=-1)
        kl = (t_log.exp() * (t_log - s_log)).sum(dim=-1)
        agree = s_logits.argmax(dim=-1) == t_logits.argmax(dim=-1)
        for row in range(len(input_ids)):
            where = scored[row]
            out.append((int(agree[row][where].sum()), float(kl[row][where].sum()), int(where.sum())))
        if advance:
            advance(len(input_ids))
    return out
