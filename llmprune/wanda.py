"""``python -m llmprune.wanda --model M ...``: prune with wanda (see ``llmprune.cli.oneshot``)."""

import sys

from llmprune.cli.oneshot import main

if __name__ == "__main__":
    sys.exit(main("wanda"))
