"""Command line: ``python -m llmprune.finetune``.

Flags are generated from :class:`llmprune.training.config.FinetuneConfig`, so every flag is
also a keyword of :func:`llmprune.finetune`. Bad input prints one line to stderr and exits 2.
"""

from __future__ import annotations

import argparse
import dataclasses

from llmprune.cli.common import add_field_flag, add_log_level, aligned, format_task_rows, run_reporting_errors, setup_logging
from llmprune.training.config import FinetuneConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llmprune.finetune",
                                     description="Recovery fine-tuning with distillation, keeping or growing sparsity.")
    for f in dataclasses.fields(FinetuneConfig):
        add_field_flag(parser, f)
    add_log_level(parser)
    return parser


def format_table(result) -> str:
    rows = [("", "perplexity", "tokens", "seqlen")]
    for label, results in (("before", result.before_ppl), ("after", result.after_ppl)):
        for name, r in results.items():
            rows.append((f"{label} {name}", f"{r.ppl:.3f}", str(r.n_tokens), str(r.seqlen)))
    lines = aligned(rows)
    if result.rounds:  # --method imp
        sources = sorted({name for entry in result.rounds for name in entry["ppl"]})
        table = [("imp round", "sparsity", *(f"ppl {name}" for name in sources), "checkpoint")]
        for entry in result.rounds:
            table.append((str(entry["round"]), f"{entry['sparsity']:.4f}",
                          *(f"{entry['ppl'][n]['ppl']:.3f}" if n in entry["ppl"] else "-" for n in sources),
                          entry["checkpoint"] or "-"))
        for entry in result.controls:  # --imp-control
            table.append((f"control {entry['control']}", f"{entry['sparsity']:.4f}",
                          *(f"{entry['ppl'][n]['ppl']:.3f}" if n in entry["ppl"] else "-" for n in sources),
                          entry["checkpoint"] or "-"))
        lines += ["", *aligned(table)]
    lines += format_task_rows([("before", result.before_zeroshot), ("after", result.after_zeroshot)])
    loss = result.loss_summary()
    if loss:
        lines.append(f"loss: first {loss['first']:.4f}, last {loss['last']:.4f}, min {loss['min']:.4f}")
    lines.append(f"steps {result.config.steps}, tokens seen {result.tokens_seen}, sparsity {result.sparsity:.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse flags, run :func:`llmprune.training.run.finetune`, print the table; return the exit code."""
    from llmprune.training.run import finetune

    args = vars(build_parser().parse_args(argv))
    setup_logging(args.pop("log_level"))
    model = args.pop("model")

    def run() -> int:
        result = finetune(model, **args)
        print(format_table(result))
        if result.config.save:
            print(f"checkpoint: {result.config.save}")
        if result.results_path:
            print(f"results: {result.results_path}")
        return 0

    return run_reporting_errors(run, interrupted="the fine-tuned model was not saved (a --work-dir run can --resume)")
