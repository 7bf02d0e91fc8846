"""What the layer loop reports: one :class:`LayerReport` per decoder layer, one
:class:`MatrixReport` per pruned matrix; both round-trip through JSON (``llmprune.json``,
the work folder's ``progress.json``)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class MatrixReport:
    layer: int
    name: str
    shape: tuple[int, int]
    sparsity: float
    solve_seconds: float
    loss: float | None
    quant_loss: float | None = None  # with --wbits: the quantization's own loss (GPTQ's), else None

    def to_dict(self) -> dict:
        return {**self.__dict__, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: dict) -> MatrixReport:
        return cls(**{**data, "shape": tuple(data["shape"])})


@dataclass
class LayerReport:
    index: int
    matrices: list[MatrixReport] = field(default_factory=list)
    groups: list[list[str]] = field(default_factory=list)
    output_rel_error: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    forward_passes: int = 0
    left_dense: list[str] = field(default_factory=list)  # matrices that received no input (unrouted experts)
    target_sparsity: float | None = None  # --layer-ratios owl: OWL's s_l for this layer, else None
    # --permute-channels: {consumer name: {"kind", "kept_score_identity", "kept_score"}}
    permutations: dict[str, dict] = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over this layer's pruned matrices (weighted by size)."""
        total = sum(m.shape[0] * m.shape[1] for m in self.matrices)
        return sum(m.sparsity * m.shape[0] * m.shape[1] for m in self.matrices) / total if total else 0.0

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "groups": self.groups,
            "left_dense": self.left_dense,
            "output_rel_error": self.output_rel_error,
            "seconds": self.seconds,
            "forward_passes": self.forward_passes,
            **({} if self.target_sparsity is None else {"target_sparsity": self.target_sparsity,
                                                        "sparsity": self.sparsity}),
            **({"permutations": self.permutations} if self.permutations else {}),
            "matrices": [m.to_dict() for m in self.matrices],
        }

    @classmethod
    def from_dict(cls, data: dict) -> LayerReport:
        """Read back :meth:`to_dict` (a resumed run's earlier layers)."""
        return cls(
            index=data["index"],
            matrices=[MatrixReport.from_dict(m) for m in data["matrices"]],
            groups=data["groups"],
            output_rel_error=data["output_rel_error"],
            seconds=data["seconds"],
            forward_passes=data["forward_passes"],
            left_dense=data.get("left_dense", []),
            target_sparsity=data.get("target_sparsity"),
            permutations=data.get("permutations", {}),
        )
