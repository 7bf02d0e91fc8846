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
