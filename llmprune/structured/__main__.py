"""``python -m llmprune.structured --model M --ffn-ratio R ...`` (see ``llmprune.cli.structured``)."""

import sys

from llmprune.cli.structured import main

if __name__ == "__main__":
    sys.exit(main())
