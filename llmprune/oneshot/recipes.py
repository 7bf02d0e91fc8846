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
    """``options`` apply to runs of ``method`` with an N:M pattern (``nm=True``) or an
    unstructured one at a sparsity of at least ``min_sparsity``."""

    method: str
    nm: bool
    options: dict = field(default_factory=dict)
    min_sparsity: float = 0.0
    evidence: str = ""

    def matches(self, method: str, nm: bool, sparsity: float | None) -> bool:
        return (self.method == method and self.nm == nm
                and (nm or sparsity is None or sparsity >= self.min_sparsity))


# From evals/results/options_smollm2-2026-12-02.json (see each rule's evidence; N:M rules not measured yet).
RECIPES: dict[str, list[Rule]] = {"none": [], "best": [
    Rule("sparsegpt", False, {"refine": "dsnot", "update": "exact"}, min_sparsity=0.6, evidence=(
        "evals/results/options_smollm2-2026-12-02.json, 70 %: PTB 306.30 -> 243.38 (0.795x; exact alone 0.813x), wiki-summaries 0.867x, "
        "2.11x SparseGPT's pruning CPU time")),
    Rule("sparsegpt", False, {"update": "exact"}, evidence=(
        "evals/results/options_smollm2-2026-12-02.json, 50 %: PTB 118.24 -> 109.30 (0.924x), wiki-summaries 0.958x, 1.60x the time; "
        "DSnoT alone made 50 % worse (1.292x)")),
    Rule("wanda", False, {"update": "exact"}, evidence=(
        "evals/results/options_smollm2-2026-12-02.json: 50 % PTB 147.68 -> 109.35 (0.925x SparseGPT), 70 % 1458.55 -> 274.34 (0.896x), "
        "1.5-1.6x SparseGPT's time; beats owl+ria+dsnot+exact at both (0.940x, 0.956x)")),
    Rule("sparsegpt", True, {"update": "exact", "permute_channels": True}, evidence=(
        "not measured at N:M on the table yet: the exact update's unstructured gains above, and "
        "--permute-channels on Wanda 2:4 (PTB 398.4 -> 345.2, 4,096 tokens)")),
    Rule("wanda", True, {"update": "exact", "permute_channels": True}, evidence=(
        "not measured at N:M on the table yet: the exact update's unstructured gains above, and "
        "--permute-channels on Wanda 2:4 (PTB 398.4 -> 345.2, 4,096 tokens)")),
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
    nm = pattern.strip().lower() != "unstructured"
    for rule in RECIPES[name]:
        if rule.matches(method, nm, sparsity):
            return dict(rule.options)
    methods = recipe_methods(name)
    if method not in methods:
        raise UsageError(f"--recipe {name} is defined for {', '.join(methods) or 'no method yet'} "
                         f"(measured on their benchmark), not {method!r}; use --recipe none")
    return {}
