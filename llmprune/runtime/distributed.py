"""Multi-process calibration under ``torchrun``: the one module that calls ``torch.distributed``.

Each rank runs the calibration forwards of its shard of the samples (:meth:`ProcessGroup.shard`);
the statistics of a layer are summed over ranks (:meth:`ProcessGroup.reduce_statistics`), the
solve runs once, on rank 0, and its weights are broadcast (:meth:`ProcessGroup.broadcast_`);
each rank then propagates its own samples' outputs to the next layer. Gloo on the CPU, NCCL
on CUDA (one GPU per rank, ``cuda:LOCAL_RANK``). Without torchrun (``WORLD_SIZE`` unset or 1)
every method is a no-op and ``torch.distributed`` is never touched.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from llmprune.runtime import devices
from llmprune.errors import UsageError

logger = logging.getLogger(__name__)


def _comm_device() -> torch.device:
    """Where the initialised backend wants its tensors: this rank's GPU for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _describe(stat: object) -> tuple[str, int]:
    return type(stat).__name__, stat.in_features


@dataclass
class ProcessGroup:
    """This process's place among the ``world_size`` processes started by torchrun (rank 0 = main).

    With ``world_size == 1`` (the default) every collective is a no-op, so the single-process
    pipeline calls the same methods and gets its values bit for bit unchanged.
    """

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """True on rank 0: the rank that solves, evaluates, logs and saves."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """True when there is more than one process."""
        return self.world_size > 1

    def shard(self, n: int) -> list[int]:
        """Indices of the calibration samples (of ``n``) this rank processes: ``rank, rank +
        world_size, ...`` (strided, so shards differ in size by at most one). Raises ValueError
        when ``n < world_size``, which would leave a rank without samples."""
        if n < self.world_size:
            raise ValueError(
                f"{n} calibration samples cannot be shared among {self.world_size} processes: "
                f"use --nsamples >= {self.world_size} or fewer processes (torchrun --nproc_per_node)"
            )
        return list(range(self.rank, n, self.world_size))

    def reduce_statistics(
        self, stats: dict[str, object], factory: Callable[[str], object]
    ) -> dict[str, object]:
        """Sum calibration statistics over all ranks; every rank gets the same result.

        ``stats`` maps a key that names the same matrices on every rank (a matrix name, not a
        call-order index) to a stat of ``llmprune.calibration.statistics`` (``HessianStat``,
        ``ColumnNormStat``, ``ColumnMomentsStat``, ``HessianMomentsStat``: whatever has
        ``to_sums`` / ``load_sums``) accumulated from this rank's samples. Returns a dict, keys sorted, over the union of
        the ranks' keys: a key this rank lacks (an MoE expert routed tokens only on another
        rank) gets ``factory(key)``, an empty stat, which adds nothing. Each returned stat
        equals the one accumulated over all ranks' samples, up to float summation order. The
        stats passed in are updated in place (their buffers are replaced). Raises RuntimeError
        when ranks disagree on a key's stat type or width. In a single process: returns
        ``stats`` itself, untouched.
        """
        if not self.active:
            return stats
        local = {key: _describe(stat) for key, stat in stats.items()}
        gathered: list[dict[str, tuple[str, int]] | None] = [None] * self.world_size
        dist.all_gather_object(gathered, local)
        keys = sorted(set().union(*gathered))
        merged = {key: stats[key] if key in stats else factory(key) for key in keys}
        for key in keys:
            kinds = {rank_keys[key] for rank_keys in gathered if key in rank_keys} | {_describe(merged[key])}
            if len(kinds) > 1:
                raise RuntimeError(f"ranks disagree on the statistic of {key!r}: {sorted(kinds)}")
        if not keys:
            return merged
        comm = _comm_device()
        # Counts first, one int64 all-reduce for all keys: (K, 2) = (n_samples, n_tokens).
        counts = torch.tensor([[merged[k].n_samples, merged[k].n_tokens] for k in keys], dtype=torch.int64, device=comm)
        dist.all_reduce(counts)
        counts = counts.tolist()
        logger.debug(
            "summed %d statistics over %d ranks; samples per statistic: %s",
            len(keys), self.world_size, sorted({n_samples for n_samples, _ in counts}),
        )
        for key, (n_samples, n_tokens) in zip(keys, counts):
            # One stat at a time: at most one extra [in, in] buffer (the sum) lives at once.
            total, _, _ = merged[key].to_sums()
            total = total.to(comm)
            dist.all_reduce(total)
            merged[key].load_sums(total, n_samples, n_tokens)
            del total
        return merged

    def broadcast_(self, tensor: Tensor, src: int = 0) -> None:
        """Overwrite ``tensor`` in place, on every rank, with rank ``src``'s values. Any shape,
        dtype and device: a tensor that is not on the backend's device (a CPU tensor under
        NCCL) or not contiguous travels through a temporary copy. No-op in a single process."""
        if not self.active:
            return
        comm = _comm_device()
        if tensor.device == comm and tensor.is_contiguous():
            dist.broadcast(tensor, src=src)
            return
        buffer = tensor.to(comm, copy=True).contiguous()
        dist.broadcast(buffer, src=src)
        tensor.copy_(buffer)

    def sum_floats(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over ranks (in float64); every rank gets the sums.
        All ranks must pass lists of the same length. Returns ``values`` in a single process."""
        if not self.active:
            return values
        buffer = torch.tensor(values, dtype=torch.float64, device=_comm_device())
        dist.all_reduce(buffer)
        return buffer.tolist()

    def barrier(self) -> None:
        """Wait until every rank got here. No-op in a single process."""
        if not self.active:
            return
        if dist.get_backend() == "nccl":
            # Without device_ids NCCL guesses the GPU from the rank and warns that it may hang.
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def init_process_group(device: str) -> tuple[ProcessGroup, str]:
    """Join the process group that torchrun set up, if any; return it and this rank's device.

    With the environment variable ``WORLD_SIZE`` > 1 (torchrun sets it, with ``RANK``,
    ``LOCAL_RANK`` and the rendezvous address): initialises ``torch.distributed`` with gloo
    when ``device`` resolves to the CPU, or NCCL when it resolves to CUDA, in which case this
    rank's device becomes ``cuda:LOCAL_RANK`` (an explicit ``cuda:N`` is overridden: one GPU
    per rank). Otherwise returns ``(ProcessGroup(), device)`` and touches nothing. Raises
    :class:`llmprune.errors.UsageError` for a device that has no backend (mps) or too few GPUs.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return ProcessGroup(), device
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    resolved = devices.resolve_device(device)
    if resolved.type == "cpu":
        backend, rank_device = "gloo", "cpu"
    elif resolved.type == "cuda":
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise UsageError(
                f"torchrun started local rank {local_rank} but this machine has {count} CUDA device(s): "
                "use --nproc_per_node <= the number of GPUs"
            )
        if resolved.index is not None and resolved.index != local_rank:
            logger.warning("--device %s ignored under torchrun: rank %d uses cuda:%d", device, rank, local_rank)
        backend, rank_device = "nccl", f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    else:
        raise UsageError(f"--device {device} cannot be used with torchrun: use cpu (gloo) or cuda (NCCL)")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    logger.info("rank %d of %d on %s (%s)", rank, world_size, rank_device, backend)
    return ProcessGroup(rank=rank, world_size=world_size), rank_device


def destroy() -> None:
    """Tear down the process group; safe to call when none was initialised."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
