"""Typed sparsity patterns: parsed once from "unstructured"/"2:4", then passed around as values.

Mask convention everywhere in llmprune: ``True`` means *keep* the weight.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Unstructured:
    """Remove a fraction ``sparsity`` in [0, 1) of the weights of each comparison group.

    The comparison group depends on the method (whole layer for magnitude, output row
    for Wanda, column block for SparseGPT); each group loses exactly
    ``int(group_size * sparsity)`` weights.
    """

    sparsity: float

    def __post_init__(self) -> None:
        if not isinstance(self.sparsity, (int, float)) or not 0.0 <= float(self.sparsity) < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity!r}")

    @property
    def target_sparsity(self) -> float:
        return float(self.sparsity)

    def __str__(self) -> str:
        return f"unstructured({self.sparsity:g})"


@dataclass(frozen=True)
class NM:
    """At most ``n`` nonzeros in every ``m`` consecutive weights along the input dimension."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and isinstance(self.m, int)) or not 0 < self.n < self.m:
            raise ValueError(f"N:M pattern needs 0 < N < M, got {self.n}:{self.m}")

    @property
    def target_sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


Pattern = Unstructured | NM


def parse_pattern(pattern: str | Pattern, sparsity: float | None = None) -> Pattern:
    """Turn ``"unstructured"`` (with ``sparsity``) or ``"N:M"`` into a :data:`Pattern`.

    Raises ``ValueError`` with a one-line message naming the bad value.
    """
    if isinstance(pattern, (Unstructured, NM)):
        return pattern
    text = str(pattern).strip().lower()
    if text == "unstructured":
        if sparsity is None:
            raise ValueError("unstructured pattern needs --sparsity (a fraction in [0, 1))")
        return Unstructured(float(sparsity))
    match = _NM_RE.match(text)
    if match is None:
        raise ValueError(f"unknown pattern {pattern!r}: expected 'unstructured' or 'N:M' such as '2:4'")
    nm = NM(int(match.group(1)), int(match.group(2)))
    if sparsity is not None and abs(float(sparsity) - nm.target_sparsity) > 1e-9:
        raise ValueError(
            f"--sparsity {sparsity} contradicts pattern {nm} (which removes {nm.target_sparsity:g}); "
            "drop --sparsity for N:M patterns"
        )
    return nm


def pattern_to_dict(pattern: Pattern) -> dict:
    """JSON form of a pattern, e.g. ``{"kind": "nm", "n": 2, "m": 4}``."""
    if isinstance(pattern, NM):
        return {"kind": "nm", "n": pattern.n, "m": pattern.m}
    return {"kind": "unstructured", "sparsity": pattern.sparsity}


def pattern_from_dict(data: dict) -> Pattern:
    """Inverse of :func:`pattern_to_dict`; rejects unknown keys and kinds."""
    data = dict(data)
    kind = data.pop("kind", None)
    allowed = {"nm": {"n", "m"}, "unstructured": {"sparsity"}}.get(kind)
    if allowed is None:
        raise ValueError(f"unknown pattern kind {kind!r}: expected 'nm' or 'unstructured'")
    if set(data) != allowed:
        raise ValueError(f"pattern of kind {kind!r} needs keys {sorted(allowed)}, got {sorted(data)}")
    return NM(**data) if kind == "nm" else Unstructured(**data)
