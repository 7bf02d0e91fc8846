"""``python -m llmprune.push DIR REPO_ID``: upload a checkpoint folder saved earlier to the Hub.

Same options and checks as ``--push-to-hub`` on the pruning CLI (:func:`llmprune.checkpoints.hub.push_to_hub`).
Bad input prints one line to stderr and exits 2. The token comes from ``HF_TOKEN`` or the
``hf auth login`` cache and is never printed.
"""

from __future__ import annotations

import argparse

from llmprune.cli.common import add_log_level, run_reporting_errors, setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llmprune.push", description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a checkpoint folder written by llmprune (--save)")
    parser.add_argument("repo_id", help="Hub model repo, 'owner/name' (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its visibility)")
    parser.add_argument("--revision", default=None, help="branch to commit to (created if missing; default: main)")
    parser.add_argument("--commit-message", default=None, help="commit message")
    add_log_level(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    from llmprune.checkpoints.hub import push_to_hub

    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)

    def run() -> int:
        url = push_to_hub(args.folder, args.repo_id, private=args.private, revision=args.revision,
                          commit_message=args.commit_message)
        print(f"pushed {args.folder} to {url}")
        return 0

    return run_reporting_errors(run, interrupted="nothing was committed (the Hub commit is made last); run it again")
