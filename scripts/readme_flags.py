"""Print the README's flag table from ``PruneConfig`` and the methods' typed configs (the
single sources of the CLI flags)."""

import dataclasses

from llmprune.config import PruneConfig
from llmprune.oneshot.methods import option_fields, owners


def main() -> None:
    print("| flag | default | meaning |")
    print("|---|---|---|")
    fields = [(f, f.metadata["help"]) for f in dataclasses.fields(PruneConfig) if f.metadata.get("cli", True)]
    fields += [(f, f"{f.metadata['help']} ({', '.join(owners(f.name))} only)") for f in option_fields()]
    for f, help_text in fields:
        flag = "--" + f.name.replace("_", "-")
        if "bool" in str(f.type):
            flag = f"{flag} / --no-{f.name.replace('_', '-')}"
        default = "required" if f.metadata.get("required") else f"`{f.default}`"
        print(f"| `{flag}` | {default} | {help_text} |")


if __name__ == "__main__":
    main()
