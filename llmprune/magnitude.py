"""``python -m llmprune.magnitude --model M ...``: prune with magnitude (see ``llmprune.cli.oneshot``)."""

import sys

from llmprune.cli.oneshot import main

if __name__ == "__main__":
    sys.exit(main("magnitude"))
