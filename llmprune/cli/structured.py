"""Command line: ``python -m llmprune.structured``.

Flags are generated from :class:`llmprune.structured.config.StructuredConfig`, so every flag is
also a keyword of :func:`llmprune.structured.prune`. Bad input prints one line to stderr and
exits 2, with nothing written.
"""

from __future__ import annotations

import argparse
import dataclasses

from llmprune.cli.common import add_field_flag, add_log_level, aligned, format_task_rows, run_reporting_errors, setup_logging
from llmprune.structured.config import StructuredConfig


def build_parser() -> argparse.ArgumentParser:
    """One flag per ``StructuredConfig`` field, plus ``--log-level``."""
    parser = argparse.ArgumentParser(
        prog="python -m llmprune.structured",
        description="Structured pruning: remove FFN channels, attention heads and whole layers; "
                    "writes a smaller plain transformers model.")
    for f in dataclasses.fields(StructuredConfig):
        if f.metadata.get("cli", True):
            add_field_flag(parser, f)
    add_log_level(parser)
    return parser


def format_table(result) -> str:
    """The final table: perplexities, parameters before and after, timings."""
    rows = [("", "perplexity", "tokens", "seqlen")]
    for label, measured in (("dense", result.dense_ppl), ("pruned", result.pruned_ppl)):
        for name, res in measured.items():
            rows.append((f"{label} {name}", f"{res.ppl:.3f}", str(res.n_tokens), str(res.seqlen)))
    lines = aligned(rows) if len(rows) > 1 else []
    lines += format_task_rows([("dense", result.dense_zeroshot), ("pruned", result.pruned_zeroshot)])
    p = result.params
    lines.append(f"parameters {p['total_before']:,} -> {p['total_after']:,} (decoder {p['decoder_before']:,} -> "
                 f"{p['decoder_after']:,}, {1 - p['decoder_after'] / p['decoder_before']:.1%} removed)")
    lines.append(f"dropped layers {list(result.plan.drop)}; per layer: {result.counts.head_groups} KV groups, "
                 f"{result.counts.ffn_channels} FFN channels removed")
    lines.append("time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse flags, run :func:`llmprune.structured.prune`, print the table; return the exit code."""
    from llmprune.structured.run import default_results_path, prune

    args = vars(build_parser().parse_args(argv))
    setup_logging(args.pop("log_level"))
    model = args.pop("model")
    if args["results"] is None:
        args["results"] = default_results_path(model)

    def run() -> int:
        result = prune(model, **args)
        print(format_table(result))
        if result.config.save:
            print(f"checkpoint: {result.config.save}")
        print(f"results: {result.results_path}")
        return 0

    return run_reporting_errors(run, interrupted="nothing was saved")
