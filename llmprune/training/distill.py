"""Distillation losses (pure tensor maths): temperature-scaled KL on logits, hidden-state MSE,
and their mix with the language-modelling loss.

Positions: logits ``[B, L, V]`` at positions ``0 .. L-2`` predict the next token, as the LM
loss does; the last position predicts nothing and is left out of every term here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def kl_divergence(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, *,
                  reduction: str = "mean") -> Tensor:
    """``T^2 * KL(p_teacher || p_student)`` per token, ``p = softmax(logits / T)``, summed over the
    vocabulary; then the mean (``reduction="mean"``) or the sum (``"sum"``) over tokens.

    ``student_logits``, ``teacher_logits``: ``[..., V]`` of any float dtype, same shape (the
    teacher's are treated as constants: no gradient flows into them). Computed in fp32.
    The ``T^2`` factor (Hinton et al. 2015) keeps gradient sizes comparable across temperatures.
    Returns a 0-dim fp32 tensor.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape (different vocabularies?)")
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (..., V)
    log_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)  # (..., V)
    per_token = (log_t.exp() * (log_t - log_s)).sum(-1)  # (...,)
    total = per_token.sum() if reduction == "sum" else per_token.mean()
    return total * (temperature * temperature)


def hidden_state_loss(student_hidden: tuple[Tensor, ...], teacher_hidden: tuple[Tensor, ...], *,
                      reduction: str = "mean") -> Tensor:
    """Mean over layers of the per-token mean squared error between hidden states.

    Each element ``[B, L, H]`` (the model's ``hidden_states``: embeddings, then each layer's
    output); position ``L-1`` is left out. Per token the MSE is the mean over ``H``; then the
    mean (or ``"sum"``) over tokens, averaged over layers. Returns a 0-dim fp32 tensor.
    """
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(f"student has {len(student_hidden)} hidden states, teacher {len(teacher_hidden)}")
    terms = []
    for s, t in zip(student_hidden, teacher_hidden, strict=True):
        per_token = (s[:, :-1].float() - t[:, :-1].detach().float().to(s.device)).pow(2).mean(-1)  # (B, L-1)
        terms.append(per_token.sum() if reduction == "sum" else per_token.mean())
    return torch.stack(terms).mean()


def mixed_loss(lm_loss: Tensor, kl: Tensor | None, distill_weight: float, hidden: Tensor | None = None,
               hidden_weight: float = 0.0) -> Tensor:
    """``(1 - a) * lm_loss + a * kl + b * hidden`` with ``a = distill_weight`` in [0, 1] and
    ``b = hidden_weight``; a term whose weight is 0 is not added (it may be None)."""
    loss = (1.0 - distill_weight) * lm_loss
    if distill_weight > 0.0:
        loss = loss + distill_weight * kl
    if hidden_weight > 0.0:
        loss = loss + hidden_weight * hidden
    return loss
