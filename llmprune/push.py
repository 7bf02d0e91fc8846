"""``python -m llmprune.push DIR REPO_ID``: upload a saved checkpoint folder (see ``llmprune.cli.push``)."""

import sys

from llmprune.cli.push import main

if __name__ == "__main__":
    sys.exit(main())
