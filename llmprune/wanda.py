"""``python -m llmprune.wanda --model M ...``: prune with wanda (see ``llmprune.cli``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main("wanda"))
