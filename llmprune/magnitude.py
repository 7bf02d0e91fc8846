"""``python -m llmprune.magnitude --model M ...``: prune with magnitude (see ``llmprune.cli``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main("magnitude"))
