"""Worker for tests/test_distributed.py, run as ``python -m torch.distributed.run --nproc_per_node 2
tests/distributed_worker.py OUT_DIR`` (gloo, CPU).

Each rank accumulates statistics from its shard of fixed activations, sums them with
``ProcessGroup.reduce_statistics``, exercises ``broadcast_`` and ``sum_floats``, and writes what
it got to ``OUT_DIR/rank<r>.safetensors``. The test imports :func:`build_stats` to compute the
same statistics in one process over all samples.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from llmprune.runtime.distributed import ProcessGroup, destroy, init_process_group
from llmprune.calibration.statistics import ColumnMomentsStat, ColumnNormStat, HessianMomentsStat, HessianStat

N_SAMPLES = 7
IN = 24
# key -> (stat class, input width, samples whose forward reaches it). With 2 ranks the
# strided shards are [0, 2, 4, 6] and [1, 3, 5]: the experts each see one rank only.
KEYS = {
    "layer.mlp.down_proj": (HessianStat, 2 * IN, range(N_SAMPLES)),
    "layer.self_attn.q_proj": (ColumnNormStat, IN, range(N_SAMPLES)),
    "layer.experts.0.down_proj": (HessianStat, IN, (0, 4)),  # rank 0 only
    "layer.experts.1.down_proj": (ColumnNormStat, IN, (3,)),  # rank 1 only
    # --refine dsnot's statistics (alone, and bordered with --update exact / a Hessian method)
    "layer.mlp.gate_proj": (ColumnMomentsStat, IN, range(N_SAMPLES)),
    "layer.self_attn.o_proj": (HessianMomentsStat, IN, range(N_SAMPLES)),
    "layer.experts.2.down_proj": (HessianMomentsStat, IN, (2,)),  # rank 0 only
    "layer.experts.3.down_proj": (ColumnMomentsStat, IN, (1, 5)),  # rank 1 only
}


def activations(key: str, sample: int) -> torch.Tensor:
    """Fixed input of ``key`` for calibration sample ``sample``: fp32 [1, T, width], T in 3..8,
    an offset so the Hessian is not near zero-mean, and per-sample scale so samples differ."""
    index = list(KEYS).index(key)
    gen = torch.Generator().manual_seed(1000 * sample + index)
    _, width, _ = KEYS[key]
    tokens = 3 + sample % 6
    return (torch.randn(1, tokens, width, generator=gen) + 0.5) * (1 + 0.3 * sample)


def factory(key: str):
    """An empty stat for ``key``, as the pipeline would create for a matrix this rank never saw."""
    cls, width, _ = KEYS[key]
    return cls(width)


def build_stats(samples) -> dict[str, object]:
    """Stats over ``samples``, one ``update`` per sample; a key reached by none of them is absent."""
    stats: dict[str, object] = {}
    for sample in samples:
        for key, (_, _, reached) in KEYS.items():
            if sample in reached:
                if key not in stats:
                    stats[key] = factory(key)
                stats[key].update(activations(key, sample))
    return stats


def main(out: Path) -> None:
    from safetensors.torch import save_file

    group, device = init_process_group("cpu")
    assert group.active and device == "cpu", (group, device)
    shard = group.shard(N_SAMPLES)
    merged = group.reduce_statistics(build_stats(shard), factory)

    tensors = {}
    for key, stat in merged.items():
        tensors[f"{key}/value"] = stat.value().contiguous()
        tensors[f"{key}/counts"] = torch.tensor([stat.n_samples, stat.n_tokens])
    bf16 = torch.full((3, 5), float(group.rank + 1), dtype=torch.bfloat16)
    group.broadcast_(bf16, src=1)
    strided = (torch.arange(12.0).reshape(3, 4) * (group.rank + 1)).T  # (4, 3), not contiguous
    group.broadcast_(strided, src=0)
    tensors["broadcast_bf16"] = bf16
    tensors["broadcast_strided"] = strided.contiguous()
    sums = group.sum_floats([group.rank + 0.25, 1.0, -2.0 * group.rank])
    tensors["sum_floats"] = torch.tensor(sums, dtype=torch.float64)
    group.barrier()
    metadata = {"keys": ",".join(merged), "shard": ",".join(map(str, shard)), "world_size": str(group.world_size)}
    save_file(tensors, out / f"rank{group.rank}.safetensors", metadata=metadata)
    destroy()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
