"""What every ``python -m llmprune.*`` entry point shares: logging setup and turning errors
into one line on stderr and an exit code (2 for bad input, 130 for Ctrl-C)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable


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
