"""Statistics accumulated from a Linear's inputs during calibration, always in fp32.

One ``update(x)`` per calibration forward pass. As in the reference code (IST-DASLab/sparsegpt
``SparseGPT.add_batch``, locuslab/wanda ``WrappedGPT.add_batch``) a "sample" is one entry of
the batch dimension: ``x`` of shape [batch, seq, in] adds ``batch`` samples, a 2-D [tokens, in]
(or 1-D) ``x`` adds one. The running means are kept in the references' form so the values
match theirs; ``to_sums()`` / ``load_sums()`` convert to and from plain sums, which add across
processes (``llmprune.runtime.distributed`` all-reduces them). ``value()`` returns the live buffer (no
copy: the Hessian of a 14336-wide MLP is 820 MB); drop the stat object once its layer is
pruned to free it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmprune.errors import all_finite


class _InputStat:
    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"in_features must be a positive integer, got {in_features!r}")
        self.in_features = in_features
        self.device = torch.device(device)
        self.n_samples = 0
        self.n_tokens = 0

    def _tokens(self, x: Tensor) -> tuple[Tensor, int]:
        """Validate ``x`` [..., in] and return it as fp32 [tokens, in] on our device, with its
        sample count."""
        if not x.is_floating_point() or x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__}: expected float activations [..., {self.in_features}], "
                f"got shape {tuple(x.shape)} dtype {x.dtype}"
            )
        if not all_finite(x):
            raise ValueError(
                f"{type(self).__name__}: non-finite activations (NaN or Inf) in an input of shape "
                f"{tuple(x.shape)} dtype {x.dtype}; the model overflows on the calibration data "
                "(try float32 or bfloat16)"
            )
        samples = x.shape[0] if x.dim() >= 3 else 1
        tokens = x.detach().reshape(-1, self.in_features).to(device=self.device, dtype=torch.float32)
        return tokens, samples

    def update(self, x: Tensor) -> None:
        """Add one calibration forward's inputs. x: [..., in], any float dtype and device; not modified.
        Raises ValueError on a shape mismatch or NaN/Inf.

        The running mean is kept as the references keep it: rescaled by ``n / (n + samples)``
        (``kept``), then the new tokens' contribution divided by the new ``n`` is added
        (``_add(tokens, kept)`` does both)."""
        tokens, samples = self._tokens(x)  # (T, in) fp32
        if tokens.shape[0] == 0:
            return
        kept = self.n_samples / (self.n_samples + samples)
        self.n_samples += samples
        self.n_tokens += tokens.shape[0]
        self._add(tokens, kept)

    def _check_ready(self) -> None:
        if self.n_samples == 0:
            raise ValueError(f"{type(self).__name__}: no activations were accumulated (update never called)")

    def _check_sums(self, total: Tensor, shape: tuple[int, ...], n_samples: int, n_tokens: int) -> None:
        if tuple(total.shape) != shape or total.dtype != torch.float32:
            raise ValueError(
                f"{type(self).__name__}: expected a float32 sum of shape {shape}, "
                f"got shape {tuple(total.shape)} dtype {total.dtype}"
            )
        if n_samples < 0 or n_tokens < 0 or (n_samples == 0) != (n_tokens == 0):
            raise ValueError(
                f"{type(self).__name__}: inconsistent counts n_samples={n_samples}, n_tokens={n_tokens}"
            )


# Row strips of the Hessian's upper block triangle computed per update (HessianStat._add):
# (k + 1) / (2k) of the full product's flops. Measured on CPU (1 thread, 512-token windows):
# in = 576 3.7 -> 2.4 ms, in = 1536 27.6 -> 17.3 ms per window at k = 4; k = 3 and 6 slower.
_STRIPS = 4


class HessianStat(_InputStat):
    """SparseGPT's Hessian ``H = (2 / n_samples) * sum X^T X`` over all input tokens X [tokens, in].

    Each update adds only the upper block triangle of ``X^T X`` (``_STRIPS`` row strips, each
    from its diagonal block to the last column); the blocks below the diagonal blocks are
    copied from their mirror images once, when the value is read (:meth:`value`,
    :meth:`to_sums`). The diagonal blocks are computed whole, so the entries equal the full
    product's up to fp32 summation order.
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        super().__init__(in_features, device)
        self._mean = torch.zeros(in_features, in_features, dtype=torch.float32, device=self.device)
        self._mirrored = True  # the blocks below the diagonal blocks are up to date

    def _strips(self) -> list[tuple[int, int]]:
        width = self._mean.shape[0]
        edges = [width * s // _STRIPS for s in range(_STRIPS + 1)]
        return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]

    def _add(self, tokens: Tensor, kept: float) -> None:
        # The rescaling rides on the strips' products (beta); the blocks below the diagonal
        # blocks are left stale until _mirror. No scaled copy of the tokens: alpha scales.
        alpha = 2 / self.n_samples
        for a, b in self._strips():
            self._mean[a:b, a:].addmm_(tokens[:, a:b].T, tokens[:, a:], beta=kept, alpha=alpha)
        self._mirrored = False

    def _mirror(self) -> None:
        """Fill the blocks below the diagonal blocks from the ones above (after updates)."""
        if not self._mirrored:
            for a, b in self._strips():
                self._mean[b:, a:b].copy_(self._mean[a:b, b:].T)
            self._mirrored = True

    def value(self) -> Tensor:
        """[in, in] fp32 on ``device``, symmetric. The live buffer: do not modify it."""
        self._check_ready()
        self._mirror()
        return self._mean

    def to_sums(self) -> tuple[Tensor, int, int]:
        """The statistic as quantities that add over disjoint sets of samples (one per rank):
        ``(sum X^T X [in, in] fp32 on device, n_samples, n_tokens)``. The tensor is a new one
        (``value() * n_samples / 2``); all zeros when nothing was accumulated."""
        self._mirror()
        return self._mean * (self.n_samples / 2), self.n_samples, self.n_tokens

    def load_sums(self, total: Tensor, n_samples: int, n_tokens: int) -> None:
        """Become the statistic whose :meth:`to_sums` is ``(total, n_samples, n_tokens)``: the
        sums over every rank's samples after an all-reduce. ``total`` [in, in] fp32 is taken
        over as the new buffer, moved to ``device`` and scaled in place by ``2 / n_samples``;
        with ``n_samples == 0`` the stat is left empty (``value()`` raises)."""
        self._check_sums(total, (self.in_features, self.in_features), n_samples, n_tokens)
        self._mean = total.to(self.device)
        if n_samples:
            self._mean.mul_(2 / n_samples)
        else:
            self._mean.zero_()
        self.n_samples, self.n_tokens = n_samples, n_tokens
        self._mirrored = True


class ColumnNormStat(_InputStat):
    """Wanda's ``scaler_row``: squared L2 norm of each input feature over all tokens, / n_samples."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        super().__init__(in_features, device)
        self._mean = torch.zeros(in_features, dtype=torch.float32, device=self.device)

    def _add(self, tokens: Tensor, kept: float) -> None:
        self._mean *= kept
        self._mean += tokens.square().sum(dim=0) / self.n_samples

    def value(self) -> Tensor:
        """[in] fp32 on ``device``, >= 0. The live buffer: do not modify it."""
        self._check_ready()
        return self._mean

    def to_sums(self) -> tuple[Tensor, int, int]:
        """The statistic as quantities that add over disjoint sets of samples (one per rank):
        ``(sum over tokens of x_j^2 [in] fp32 on device, n_samples, n_tokens)``. The tensor is a
        new one (``value() * n_samples``); all zeros when nothing was accumulated."""
        return self._mean * self.n_samples, self.n_samples, self.n_tokens

    def load_sums(self, total: Tensor, n_samples: int, n_tokens: int) -> None:
        """Become the statistic whose :meth:`to_sums` is ``(total, n_samples, n_tokens)``: the
        sums over every rank's samples after an all-reduce. ``total`` [in] fp32 is taken over as
        the new buffer, moved to ``device`` and divided in place by ``n_samples``; with
        ``n_samples == 0`` the stat is left empty (``value()`` raises)."""
        self._check_sums(total, (self.in_features,), n_samples, n_tokens)
        self._mean = total.to(self.device)
        if n_samples:
            self._mean.div_(n_samples)
        else:
            self._mean.zero_()
        self.n_samples, self.n_tokens = n_samples, n_tokens


class ColumnMomentsStat(_InputStat):
    """DSnoT's statistics (zyxxmu/DSnoT ``WrappedGPT``): per input feature, the sum over tokens
    and the sum of squares, each / n_samples (``sum_metric_row`` and Wanda's ``scaler_row``),
    and from them the variance over tokens.

    Kept as two running means in the references' form, [2, in] fp32; the token variance is
    ``E[x^2] - E[x]^2`` from those sums (clamped at 0), not the reference's running merge of
    per-batch variances: the same value up to fp32 rounding, and sums add across processes.
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        super().__init__(in_features, device)
        self._mean = torch.zeros(2, in_features, dtype=torch.float32, device=self.device)

    def _add(self, tokens: Tensor, kept: float) -> None:
        self._mean *= kept
        self._mean[0] += tokens.sum(dim=0) / self.n_samples
        self._mean[1] += tokens.square().sum(dim=0) / self.n_samples

    def value(self) -> Tensor:
        """[3, in] fp32 on ``device``, a new tensor: row 0 ``sum_tokens x_j / n_samples``, row 1
        ``sum_tokens x_j^2 / n_samples`` (``ColumnNormStat``'s value), row 2 the variance of
        ``x_j`` over all tokens (population, >= 0)."""
        self._check_ready()
        per_token = self._mean * (self.n_samples / self.n_tokens)  # (2, in): E[x], E[x^2]
        var = (per_token[1] - per_token[0].square()).clamp_min_(0)
        return torch.cat([self._mean, var.unsqueeze(0)])

    def to_sums(self) -> tuple[Tensor, int, int]:
        """The statistic as quantities that add over disjoint sets of samples (one per rank):
        ``([sum x_j, sum x_j^2] [2, in] fp32 on device, n_samples, n_tokens)``. The tensor is a
        new one (the running means * n_samples); all zeros when nothing was accumulated."""
        return self._mean * self.n_samples, self.n_samples, self.n_tokens

    def load_sums(self, total: Tensor, n_samples: int, n_tokens: int) -> None:
        """Become the statistic whose :meth:`to_sums` is ``(total, n_samples, n_tokens)``: the
        sums over every rank's samples after an all-reduce. ``total`` [2, in] fp32 is taken over
        as the new buffer, moved to ``device`` and divided in place by ``n_samples``; with
        ``n_samples == 0`` the stat is left empty (``value()`` raises)."""
        self._check_sums(total, (2, self.in_features), n_samples, n_tokens)
        self._mean = total.to(self.device)
        if n_samples:
            self._mean.div_(n_samples)
        else:
            self._mean.zero_()
        self.n_samples, self.n_tokens = n_samples, n_tokens


class HessianMomentsStat(HessianStat):
    """The Hessian of the inputs bordered by a constant 1 feature, ``(2 / n_samples) sum
    [x, 1]^T [x, 1]`` [in + 1, in + 1]: SparseGPT's Hessian in the first ``in`` rows and
    columns, ``2 sum x_j / n_samples`` in the last row, ``2 n_tokens / n_samples`` in the corner.
    One buffer (one all-reduce) for a run that needs both the Hessian and DSnoT's column sums
    and variances (:meth:`split`); 2 * in + 1 more floats than the Hessian.
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        super().__init__(in_features, device)
        self._mean = torch.zeros(in_features + 1, in_features + 1, dtype=torch.float32, device=self.device)

    def _add(self, tokens: Tensor, kept: float) -> None:
        ones = torch.ones(tokens.shape[0], 1, dtype=tokens.dtype, device=tokens.device)
        super()._add(torch.cat([tokens, ones], dim=1), kept)  # (T, in + 1)

    def value(self) -> Tensor:
        """[in + 1, in + 1] fp32 on ``device``, symmetric (see the class). The live buffer: do
        not modify it; :meth:`split` reads it."""
        self._check_ready()
        self._mirror()
        return self._mean

    def load_sums(self, total: Tensor, n_samples: int, n_tokens: int) -> None:
        """As :meth:`HessianStat.load_sums`, for the [in + 1, in + 1] bordered sums."""
        self._check_sums(total, (self.in_features + 1, self.in_features + 1), n_samples, n_tokens)
        self._mean = total.to(self.device)
        if n_samples:
            self._mean.mul_(2 / n_samples)
        else:
            self._mean.zero_()
        self.n_samples, self.n_tokens = n_samples, n_tokens
        self._mirrored = True

    @staticmethod
    def split(value: Tensor) -> tuple[Tensor, Tensor]:
        """``(hessian [in, in], moments [3, in])`` from :meth:`value`: the Hessian as a view (not
        a copy), and ``ColumnMomentsStat.value()``'s rows (``sum x / n_samples``, ``sum x^2 /
        n_samples``, token variance) as a new tensor."""
        n = value.shape[0] - 1
        hessian = value[:n, :n]
        col_sum = value[n, :n] / 2
        col_sq = hessian.diagonal() / 2
        per_sample_tokens = float(value[n, n]) / 2  # n_tokens / n_samples
        var = (col_sq / per_sample_tokens - (col_sum / per_sample_tokens).square()).clamp_min(0)
        return hessian, torch.stack([col_sum, col_sq, var])
