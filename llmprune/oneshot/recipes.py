"""Named recipes: one flag (``--recipe best``) for a combination of the one-shot options.

A recipe is a list of :class:`Rule` s; the first rule matching the run's method, pattern kind
and sparsity gives option values (``PruneConfig`` field names). They fill the fields left at
their defaults; a field set to another value keeps it (``--recipe best --exact-iters 10``). A
value equal to the default cannot be told from "not set": to leave out one of the recipe's
options, spell the combination out with ``--recipe none``. The recipe's values are recorded in
the results and the checkpoint's ``llmprune.json`` (``recipe.named_recipe``).

``best``: for each method and pattern, the combination the committed benchmark measured as the
best within 3x plain SparseGPT's pruning time (``evals/options_table.py``; table and commands
in the README section "Better than the papers"). The measurements behind each rule are in its
``evidence``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmprune.errors import UsageError

RECIPE_NAMES = ("none", "best")


@dataclass(frozen=True)
class Rule:
    """``options`` apply to runs of ``method`` with an N:M pattern (``nm=True``; only the
    pattern ``only_pattern``, e.g. ``"2:4"``, when set) or an unstructured one at a sparsity of
    at least ``min_sparsity``."""

    method: str
    nm: bool
    options: dict = field(default_factory=dict)
    min_sparsity: float = 0.0
    evidence: str = ""
    only_pattern: str | None = None

    def matches(self, method: str, pattern: str, sparsity: float | None) -> bool:
        nm = pattern.strip().lower() != "unstructured"
        if self.method != method or self.nm != nm:
            return False
        if nm:
            return self.only_pattern is None or pattern.strip() == self.only_pattern
        return sparsity is None or sparsity >= self.min_sparsity


_TABLE = "evals/results/options_smollm2-2026-12-02.json"
# From the committed options table (SmolLM2-135M, PTB test; ratios against plain SparseGPT run on
# the same CPU at the same code; CPU seconds at one thread). Each rule's evidence says which rows.
RECIPES: dict[str, list[Rule]] = {"none": [], "best": [
    Rule("sparsegpt", False, {"layer_ratios": "owl", "refine": "dsnot", "update": "exact"}, min_sparsity=0.6, evidence=(
        f"{_TABLE}, 70 %: PTB 332.79 -> 236.49 (0.711x), wiki-summaries 0.797x, 2.46x SparseGPT's pruning CPU time; "
        "without OWL 0.732x, exact alone 0.755x (70 % perplexities move by about 10 % with fp32 summation order)")),
    Rule("sparsegpt", False, {"update": "exact"}, evidence=(
        f"{_TABLE}, 50 %: PTB 118.35 -> 108.78 (0.919x), wiki-summaries 0.931x, 1.86x the time; "
        "DSnoT alone made 50 % worse")),
    Rule("wanda", False, {"update": "exact"}, evidence=(
        f"{_TABLE}: 50 % PTB 149.05 -> 109.33 (0.924x SparseGPT), 1.81x SparseGPT's time; "
        "OWL, RIA and DSnoT alone do not help Wanda on this model")),
    Rule("sparsegpt", True, {"update": "exact"}, evidence=(
        f"{_TABLE}: 2:4 PTB 164.77 -> 138.50 (0.841x), 4:8 136.57 -> 116.50 (0.853x), 2.0-2.1x the time; "
        "adding --permute-channels gives 0.842x / 0.873x for 0.2-0.8x more time")),
    Rule("wanda", True, {"update": "exact", "permute_channels": True}, only_pattern="2:4", evidence=(
        f"{_TABLE}, 2:4: PTB 398.45 -> 146.66 (0.890x SparseGPT; exact alone 0.910x), 2.16x SparseGPT's time")),
    Rule("wanda", True, {"update": "exact"}, evidence=(
        f"{_TABLE}, 4:8: PTB 237.92 -> 125.77 (0.921x SparseGPT), 1.91x its time; with --permute-channels "
        "0.922x at 2.84x")),
]}


def recipe_methods(name: str) -> list[str]:
    """The methods recipe ``name`` has rules for."""
    return sorted({rule.method for rule in RECIPES[name]})


def recipe_options(name: str, method: str, pattern: str, sparsity: float | None) -> dict:
    """The option values recipe ``name`` sets for a run of ``method`` with ``pattern``
    ('unstructured' or 'N:M') at ``sparsity``; ``{}`` for ``none``. UsageError for an unknown
    recipe or a method the recipe has no rule for."""
    if name not in RECIPES:
        raise UsageError(f"--recipe must be one of {', '.join(RECIPE_NAMES)}, got {name!r}")
    if name == "none":
        return {}
    for rule in RECIPES[name]:
        if rule.matches(method, pattern, sparsity):
            return dict(rule.options)
    methods = recipe_methods(name)
    if method not in methods:
        raise UsageError(f"--recipe {name} is defined for {', '.join(methods) or 'no method yet'} "
                         f"(measured on their benchmark), not {method!r}; use --recipe none")
    return {}
