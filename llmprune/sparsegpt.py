"""``python -m llmprune.sparsegpt --model M ...``: prune with sparsegpt (see ``llmprune.cli.oneshot``)."""

import sys

from llmprune.cli.oneshot import main

if __name__ == "__main__":
    sys.exit(main("sparsegpt"))
