"""Perplexity with the SparseGPT/Wanda papers' protocol, so numbers compare with theirs.

The test split is one token stream cut into non-overlapping windows of ``seqlen``; the tail
that does not fill a window is dropped; ppl = exp(mean token NLL), computed in fp32. The
reference (locuslab/wanda ``lib/eval.py`` ``eval_ppl_wikitext``) averages per-window mean
losses; every window predicts the same number of tokens, so that equals the token mean here.

With ``add_bos`` each window is ``[bos] + seqlen - 1`` stream tokens (windows step by
``seqlen - 1``) and all of those stream tokens are predicted, the first from BOS (Gemma needs
BOS and gives badly wrong perplexity without it). Without BOS the first token of each window
has no context and is not predicted. Either way a window contributes ``seqlen - 1`` tokens.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from llmprune.errors import UsageError, check_int

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PerplexityResult:
    """One measurement. ``n_tokens`` is the number of predicted tokens in the mean."""

    source: str
    ppl: float
    nll: float
    seqlen: int
    n_tokens: int
    n_windows: int


def perplexity(
    model,
    tokens: torch.LongTensor,
    *,
    seqlen: int,
    source: str = "",
    max_tokens: int | None = None,
    add_bos: bool = False,
    batch_size: int = 1,
    device=None,
    show_progress: bool = True,
) -> PerplexityResult:
    """exp(mean NLL) of a causal LM over non-overlapping windows of a token stream.

    ``tokens``: int ``[1, T]`` (or ``[T]``) on any device. ``max_tokens`` caps the stream
    tokens used; only whole windows count. With ``add_bos`` the BOS id is
    ``model.config.bos_token_id``. ``model`` is a HF causal LM already on its device
    (``device`` defaults to that of its first parameter); it is run in eval mode under
    ``torch.inference_mode`` with ``use_cache=False`` and restored to its previous mode.
    Logits are upcast to fp32 batch by batch; no ``[T, vocab]`` tensor is built.
    """
    batch_size = check_int("batch_size", batch_size, minimum=1)
    windows = eval_windows(model, tokens, seqlen=seqlen, source=source, max_tokens=max_tokens, add_bos=add_bos)
    n_windows = windows.shape[0]
    if device is None:
        device = next(model.parameters()).device

    total_nll = 0.0  # python float (fp64): exact enough over ~10^6 tokens
    n_tokens = 0
    was_training = model.training
    model.eval()
    progress = tqdm(total=n_windows, desc=f"ppl {source}".strip(), unit="window", disable=not show_progress)
    try:
        with torch.inference_mode():
            for start in range(0, n_windows, batch_size):
                batch = windows[start : start + batch_size].to(device)  # (B, seqlen)
                logits = model(input_ids=batch, use_cache=False).logits  # (B, seqlen, V)
                # Position p predicts token p + 1; with BOS at 0 that covers every stream token.
                # Upcast one window at a time: only one (seqlen - 1, V) fp32 copy exists at once.
                for row in range(batch.shape[0]):
                    row_logits = logits[row, :-1, :].float()  # (seqlen - 1, V), fp32
                    targets = batch[row, 1:]  # (seqlen - 1,)
                    total_nll += float(F.cross_entropy(row_logits, targets, reduction="sum"))
                    n_tokens += targets.numel()
                del logits
                progress.update(batch.shape[0])
    finally:
        progress.close()
        model.train(was_training)

    mean_nll = total_nll / n_tokens
    result = PerplexityResult(
        source=source,
        ppl=math.exp(mean_nll),
        nll=mean_nll,
        seqlen=seqlen,
        n_tokens=n_tokens,
        n_windows=n_windows,
    )
    logger.info(
        "perplexity %s: %.4f (nll %.5f, seqlen %d, %d windows, %d tokens)",
        source or "(tokens)", result.ppl, result.nll, seqlen, n_windows, n_tokens,
    )
    return result


def eval_windows(model, tokens: torch.LongTensor, *, seqlen: int, source: str = "", max_tokens: int | None = None,
                 add_bos: bool = False) -> torch.LongTensor:
    """The ``[n_windows, seqlen]`` model inputs :func:`perplexity` evaluates, in order (BOS
    first in each window with ``add_bos``; the id from ``model.config``). Raises UsageError
    for bad arguments or too few tokens for one window."""
    seqlen = check_int("seqlen", seqlen, minimum=2 if add_bos else 1)
    if max_tokens is not None:
        max_tokens = check_int("max_tokens", max_tokens, minimum=1)
    if tokens.dim() == 2 and tokens.shape[0] == 1:
        stream = tokens[0]
    elif tokens.dim() == 1:
        stream = tokens
    else:
        raise UsageError(f"tokens of shape {list(tokens.shape)} are not valid: pass one stream, [1, T] or [T]")
    if max_tokens is not None:
        stream = stream[:max_tokens]
    bos_id = _model_bos_id(model) if add_bos else None
    stride = seqlen - 1 if add_bos else seqlen  # stream tokens per window
    n_windows = stream.numel() // stride
    if n_windows == 0:
        raise UsageError(
            f"{source or 'tokens'}: {stream.numel()} tokens do not fill one window of {stride} stream tokens "
            f"(seqlen={seqlen}{', with BOS' if add_bos else ''}): use a smaller seqlen or more tokens"
        )
    windows = stream[: n_windows * stride].reshape(n_windows, stride).to(device="cpu", dtype=torch.long)
    if bos_id is not None:
        windows = torch.cat([torch.full((n_windows, 1), bos_id, dtype=torch.long), windows], dim=1)
    return windows


def _model_bos_id(model) -> int:
    bos = getattr(getattr(model, "config", None), "bos_token_id", None)
    if isinstance(bos, (list, tuple)):
        bos = bos[0] if bos else None
    if bos is None:
        raise UsageError(
            "add_bos is set but model.config.bos_token_id is None: use add_bos=False or set the config's BOS id"
        )
    return int(bos)

