"""``python -m llmprune --method sparsegpt|wanda|magnitude --model M ...``."""

import sys

from llmprune.cli.oneshot import main

if __name__ == "__main__":
    sys.exit(main(None))
