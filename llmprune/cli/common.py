"""What every ``python -m llmprune.*`` entry point shares: flags generated from dataclass
fields, logging setup, and turning errors into one line on stderr and an exit code (2 for bad
input, 130 for Ctrl-C)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Callable


def flag_type(annotation: str) -> type:
    """The argparse type of a dataclass field annotated ``int``, ``float``, ``str`` or ``bool``
    (optionally ``| None``)."""
    base = str(annotation).replace(" | None", "")
    return {"int": int, "float": float, "str": str, "bool": bool}[base]


def add_field_flag(parser: argparse.ArgumentParser, f: dataclasses.Field, help_text: str | None = None) -> None:
    """One flag for dataclass field ``f``: ``--field-name``, typed from its annotation, its
    default and ``required`` from the field (metadata ``required``); booleans get
    ``--x / --no-x``. ``help_text`` defaults to the field's metadata ``help``."""
    flag = "--" + f.name.replace("_", "-")
    help_text = f.metadata.get("help", "") if help_text is None else help_text
    kind = flag_type(f.type)
    if kind is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
    else:
        parser.add_argument(
            flag, type=kind, default=f.default, required=f.metadata.get("required", False),
            help=f"{help_text} (default: {f.default})" if f.default is not None else help_text,
        )


def aligned(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows of cells as left-aligned text columns (trailing spaces stripped)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def format_task_rows(summaries: list[tuple[str, dict]]) -> list[str]:
    """The --eval-tasks lines of a final table: accuracy and normalised accuracy (each +-
    stderr) per task, for each ``(label, llmprune.evaluation.zeroshot summary)``; no lines when
    every summary is empty (not measured)."""
    from llmprune.evaluation.zeroshot import accuracy_rows

    def cell(row, key):
        value, stderr = row[key], row[f"{key}_stderr"]
        return "-" if value is None else f"{value:.4f}" + (f" +- {stderr:.4f}" if stderr is not None else "")

    rows = [("", "acc", "acc_norm", "documents")]
    for label, summary in summaries:
        for row in accuracy_rows(summary):
            rows.append((f"{label} {row['task']}", cell(row, "acc"), cell(row, "acc_norm"),
                         "-" if row["n"] is None else str(row["n"])))
    if len(rows) == 1:
        return []
    summary = next(s for _, s in reversed(summaries) if s)
    return ["", *aligned(rows), f"lm-eval {summary['lm_eval_version']}, {summary['num_fewshot']}-shot"
            + (f", at most {summary['limit']} documents per task" if summary["limit"] else "")]


def add_log_level(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="WARNING", help="logging level (default: WARNING)")


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(levelname)s %(name)s: %(message)s")


def run_reporting_errors(work: Callable[[], int], *, interrupted: str) -> int:
    """``work()``'s exit code; a UsageError prints ``error: <message>`` and gives 2, Ctrl-C
    prints ``interrupted: <interrupted>`` and gives 130."""
    from llmprune.errors import UsageError

    try:
        return work()
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {interrupted}", file=sys.stderr)
        return 130
