"""What a training run reports about its model: perplexity on the evaluation sources,
``--eval-tasks`` through lm-eval, and a summary of a loss curve. Shared by the fine-tuning run
(``llmprune.training.run``) and the IMP rounds (``llmprune.training.imp``)."""

from __future__ import annotations

import torch

from llmprune.training.config import FinetuneConfig


def summarize_loss(curve: list[dict]) -> dict:
    """First, last, min and mean-of-the-last-10 % of the ``loss`` rows of a loss curve ({} if none)."""
    losses = [row["loss"] for row in curve]
    if not losses:
        return {}
    tail = losses[-max(1, len(losses) // 10):]
    return {"first": losses[0], "last": losses[-1], "min": min(losses), "mean_last_10pct": sum(tail) / len(tail),
            "steps_logged": len(losses)}


def evaluate(model, tokenizer, config: FinetuneConfig, device: torch.device, tokens: dict) -> dict:
    """Perplexity on every evaluation source (``tokens``: source -> ``[1, T]`` test stream),
    the model moved to ``device`` and back to where it was."""
    from llmprune.calibration import data
    from llmprune.evaluation.perplexity import perplexity

    if not tokens:
        return {}
    where = next(model.parameters()).device
    model.to(device)
    seqlen = config.eval_seqlen or config.seqlen
    results = {source: perplexity(model, stream, seqlen=seqlen, source=source, max_tokens=config.max_eval_tokens,
                                  add_bos=data.needs_bos(tokenizer), device=device, show_progress=config.progress)
               for source, stream in tokens.items()}
    model.to(where)
    return results


def evaluate_tasks(model, tokenizer, tasks, device: torch.device) -> dict:
    """``--eval-tasks`` (a prepared ``zeroshot.TaskSet``, or None: ``{}``) on ``model``, moved
    to ``device`` and back to where it was."""
    from llmprune.calibration import data
    from llmprune.evaluation import zeroshot

    if tasks is None:
        return {}
    where = next(model.parameters()).device
    model.to(device)
    try:
        return zeroshot.evaluate_tasks(model, tokenizer, tasks, add_bos=data.needs_bos(tokenizer) or None)
    finally:
        model.to(where)
