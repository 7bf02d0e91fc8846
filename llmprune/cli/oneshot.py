"""Command line: ``python -m llmprune.sparsegpt | llmprune.wanda | llmprune.magnitude``.

Flags are generated from :class:`llmprune.config.PruneConfig`, so every flag is also a
keyword of :func:`llmprune.prune`. Bad input prints one line to stderr and exits 2.
"""

from __future__ import annotations

import argparse
import dataclasses

from llmprune.cli.common import add_field_flag, add_log_level, aligned, format_task_rows, run_reporting_errors, setup_logging
from llmprune.config import PruneConfig
from llmprune.oneshot.methods import METHODS, option_fields, owners


def build_parser(method: str | None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per ``PruneConfig`` field and per method option
    (``--method`` only when ``method`` is None). Every method's options are accepted by every
    entry point, as before the options were typed; those of another method are ignored with
    a warning (``Method.make_config``)."""
    prog = f"python -m llmprune.{method}" if method else "python -m llmprune"
    parser = argparse.ArgumentParser(prog=prog, description=f"One-shot pruning with {method or 'SparseGPT, Wanda or magnitude'}.")
    for f in dataclasses.fields(PruneConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"]
        if f.name == "method":
            if method is None:
                parser.add_argument(flag, choices=list(METHODS), default=f.default, help=help_text)
            continue
        if f.metadata.get("cli", True):
            add_field_flag(parser, f, help_text)
    for f in option_fields():
        add_field_flag(parser, f, f"{f.metadata['help']} ({', '.join(owners(f.name))} only)")
    add_log_level(parser)
    return parser


def _format_table(result) -> str:
    rows = [("", "perplexity", "tokens", "seqlen")]
    for name, res in result.dense_ppl.items():
        rows.append((f"dense {name}", f"{res.ppl:.3f}", str(res.n_tokens), str(res.seqlen)))
    for name, res in result.pruned_ppl.items():
        rows.append((f"pruned {name}", f"{res.ppl:.3f}", str(res.n_tokens), str(res.seqlen)))
    lines = aligned(rows)
    lines += format_task_rows([("dense", result.dense_zeroshot), ("pruned", result.pruned_zeroshot)])
    quant = result.config.quant
    grid = "" if quant is None else (f", int{quant.wbits} " + ("per channel" if quant.groupsize == -1 else f"g{quant.groupsize}")
                                     + (" sym" if quant.sym else " asym"))
    ref = result.config.refinements
    extra = "".join(f", {flag} {value}" for flag, value, default in (
        ("score", ref.score, "default"), ("refine", ref.refine, "none"), ("update", ref.update, "none")) if value != default)
    extra += ", permuted channels" if result.config.permute_channels else ""
    lines.append(f"method {result.config.method}{extra}, pattern {result.pattern}{grid}, "
                 f"measured sparsity {result.sparsity:.4f}")
    lines.append("time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items()))
    return "\n".join(lines)


def main(method: str | None = None, argv: list[str] | None = None) -> int:
    """Parse flags, run :func:`llmprune.prune`, print the final table; return the exit code."""
    from llmprune.pipeline import default_results_path, prune

    args = vars(build_parser(method).parse_args(argv))
    setup_logging(args.pop("log_level"))
    if method is not None:
        args["method"] = method
    model = args.pop("model")
    if args["results"] is None:
        args["results"] = default_results_path(model, args["method"], args["pattern"], args["sparsity"])

    def run() -> int:
        result = prune(model, **args)
        if not result.is_main:
            return 0  # another rank of a torchrun job: rank 0 prints
        print(_format_table(result))
        if result.config.save:
            print(f"checkpoint: {result.config.save}")
        print(f"results: {result.results_path}")
        return 0

    return run_reporting_errors(run, interrupted="nothing was saved")
