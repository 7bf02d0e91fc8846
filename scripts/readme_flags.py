"""Print the README's flag table from ``PruneConfig`` (the single source of the CLI flags)."""

import dataclasses

from llmprune.config import PruneConfig


def main() -> None:
    print("| flag | default | meaning |")
    print("|---|---|---|")
    for f in dataclasses.fields(PruneConfig):
        if not f.metadata.get("cli", True):
            continue
        flag = "--" + f.name.replace("_", "-")
        if "bool" in str(f.type):
            flag = f"{flag} / --no-{f.name.replace('_', '-')}"
        default = "required" if f.metadata.get("required") else f"`{f.default}`"
        print(f"| `{flag}` | {default} | {f.metadata['help']} |")


if __name__ == "__main__":
    main()
