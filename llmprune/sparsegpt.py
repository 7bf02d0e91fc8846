"""``python -m llmprune.sparsegpt --model M ...``: prune with sparsegpt (see ``llmprune.cli``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main("sparsegpt"))
