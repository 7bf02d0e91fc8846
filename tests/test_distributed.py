"""Multi-process calibration: ``llmprune.runtime.distributed`` under a real ``torchrun`` (2 gloo processes
on the CPU) against the single-process computation over all samples.

Tolerances. A statistic summed over ranks differs from the single-process one only in float32
summation order: one process keeps a running mean over its 7 updates, the ranks each keep one
over their shard, convert it to a sum, add the two sums and divide once. Each path rounds a few
times per entry, each rounding <= 2**-24 relative, so entries agree within a few ulps of the
largest entry: we allow 1e-6 * max|value| (~8 ulps; 1.8e-7 measured). DSnoT's token variance
(row 2 of ``ColumnMomentsStat.value()``, and ``HessianMomentsStat.split``) is not summed but
computed from the summed means as E[x^2] - E[x]^2: the subtraction adds no absolute error
beyond a few ulps of E[x^2] = row 1 / (tokens per sample) <= max|value|, so the same bound
holds (2e-8 * max|value| measured).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from llmprune.runtime.distributed import ProcessGroup, destroy, init_process_group
from llmprune.calibration.statistics import ColumnMomentsStat, ColumnNormStat, HessianMomentsStat, HessianStat

import distributed_worker as worker  # tests/ is on sys.path (pytest's rootdir-less "prepend" import)

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

STAT_RTOL = 1e-6  # relative to max|value|: float32 summation order (module docstring)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python *args`` from the repository root, one thread, Hub offline; fail with its stderr."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # a test run under torchrun itself must not leak its group into the child
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    if proc.returncode != 0:
        print(proc.stdout[-5000:])
        print(proc.stderr[-20000:], file=sys.stderr)
    assert proc.returncode == 0, f"{' '.join(args[:6])} ... exited {proc.returncode}:\n{proc.stderr[-5000:]}"
    return proc


def _torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    return _run(["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
                 "--master_port", str(_free_port()), *args])


# ------------------------------------------------------------------ single process (no torchrun)


def test_single_process_group_is_a_no_op(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    group, device = init_process_group("cpu")
    assert group == ProcessGroup(0, 1) and group.is_main and not group.active and device == "cpu"
    assert not torch.distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_process_group("auto") == (ProcessGroup(), "auto")
    stats = {"a": HessianStat(3)}
    stats["a"].update(torch.ones(1, 2, 3))
    before = stats["a"].value().clone()
    assert group.reduce_statistics(stats, lambda key: pytest.fail("factory called")) is stats
    assert torch.equal(stats["a"].value(), before)
    x = torch.arange(4.0)
    group.broadcast_(x)
    assert torch.equal(x, torch.arange(4.0))
    assert group.sum_floats([1.5, -2.0]) == [1.5, -2.0]
    group.barrier()
    destroy()  # safe without a process group


def test_shard_is_strided_covers_every_sample_once_and_refuses_idle_ranks():
    assert ProcessGroup().shard(3) == [0, 1, 2]
    shards = [ProcessGroup(rank, 3).shard(8) for rank in range(3)]
    assert shards == [[0, 3, 6], [1, 4, 7], [2, 5]]
    assert ProcessGroup(1, 2).is_main is False and ProcessGroup(1, 2).active
    with pytest.raises(ValueError, match="3 calibration samples cannot be shared among 4 processes"):
        ProcessGroup(0, 4).shard(3)


# ------------------------------------------------------------------------- torchrun, 2 x gloo


def test_torchrun_reduce_statistics_matches_single_process(tmp_path):
    _torchrun(str(TESTS / "distributed_worker.py"), str(tmp_path))
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    metadata = []
    for r in range(2):
        with safe_open(tmp_path / f"rank{r}.safetensors", "pt") as f:
            metadata.append(f.metadata())
    assert [m["shard"] for m in metadata] == ["0,2,4,6", "1,3,5"]
    # Union of keys, sorted, on both ranks: each expert key existed on one rank only.
    assert metadata[0]["keys"] == metadata[1]["keys"] == ",".join(sorted(worker.KEYS))

    reference = worker.build_stats(range(worker.N_SAMPLES))  # one process, all samples
    for key, stat in reference.items():
        got = ranks[0][f"{key}/value"]
        # Both ranks hold bit-identical results: x + y == y + x in IEEE arithmetic.
        assert torch.equal(got, ranks[1][f"{key}/value"]), key
        assert ranks[0][f"{key}/counts"].tolist() == [stat.n_samples, stat.n_tokens], key
        want = stat.value()
        assert got.dtype == torch.float32 and got.shape == want.shape, key
        scale = want.abs().max().item()
        assert (got - want).abs().max().item() <= STAT_RTOL * scale, key
    # The reference itself is right: float64 computed from the definitions.
    for key, (cls, width, reached) in worker.KEYS.items():
        X = torch.cat([worker.activations(key, i).double().reshape(-1, width) for i in reached])
        exact = _definition(cls, X, len(reached))
        got = ranks[0][f"{key}/value"].double()
        assert (got - exact).abs().max().item() <= STAT_RTOL * exact.abs().max().item(), key
        if cls is HessianMomentsStat:  # what DSnoT and the exact update read from the bordered Hessian
            hessian, moments = HessianMomentsStat.split(ranks[0][f"{key}/value"])
            for part, want in ((hessian, _definition(HessianStat, X, len(reached))),
                               (moments, _definition(ColumnMomentsStat, X, len(reached)))):
                assert (part.double() - want).abs().max().item() <= STAT_RTOL * want.abs().max().item(), key

    for r in range(2):
        assert torch.equal(ranks[r]["broadcast_bf16"], torch.full((3, 5), 2.0, dtype=torch.bfloat16))
        assert torch.equal(ranks[r]["broadcast_strided"], torch.arange(12.0).reshape(3, 4).T)
        assert ranks[r]["sum_floats"].tolist() == [1.5, 2.0, -2.0]


def _definition(cls: type, X: torch.Tensor, n_samples: int) -> torch.Tensor:
    """The value of a ``cls`` statistic over the tokens X [tokens, in] of ``n_samples`` samples,
    from its definition (float64 in, float64 out; the variance in two passes)."""
    if cls is HessianStat:
        return 2.0 / n_samples * X.T @ X
    if cls is HessianMomentsStat:
        bordered = torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype)], dim=1)
        return 2.0 / n_samples * bordered.T @ bordered
    if cls is ColumnNormStat:
        return X.square().sum(0) / n_samples
    assert cls is ColumnMomentsStat, cls
    return torch.stack([X.sum(0) / n_samples, X.square().sum(0) / n_samples, X.var(0, correction=0)])


# --------------------------------------------------------------- end to end: the pruning CLI


def _pruned_weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    assert tensors, f"no safetensors in {folder}"
    return tensors


# SparseGPT's solve goes through the Cholesky factor of the inverse damped Hessian, so the
# Hessian's ~1e-7 relative summation-order differences reach the updated weights amplified by
# its condition number (and, through each pruned layer's outputs, the next layer's Hessian).
# Measured: at most 3.6e-5 * max|W| (o_proj, whose 160-token Hessian is the worst conditioned),
# median nonzero difference 1e-7 absolute. Wanda never changes a kept weight: exact match.
# Both solvers are invariant to scaling the statistic, so test (a) is what checks the 1/n scaling.
SPARSEGPT_WEIGHT_RTOL = 2e-4  # relative to max|W| of each matrix
# --update exact solves with the Jacobi-scaled Hessian plus ``--exact-damp`` times I. Its
# eigenvalues lie in [damp, in + damp] (unit diagonal: trace = in), so the summation-order
# differences are amplified at most (in + damp) / damp: with --exact-damp 0.1 and in <= 128,
# 1281 * 1e-7 = 1.3e-4 * max|W| < 2e-4 in layer 0, whose inputs are the same on both runs. Later
# layers' Hessians also carry the earlier layers' weight differences, as with SparseGPT; measured
# over all layers: at most 1.5e-5 * max|W| (layer 1's o_proj). At the default damp 0.01 the bound
# is 10x larger (measured 4.5e-3 in layer 0's o_proj) and the next layers' inputs differ enough
# for DSnoT to pick other swaps in layers 1 and 2's k_proj: the masks could not be compared.
EXACT_DAMP = "0.1"
EXACT_WEIGHT_RTOL = 2e-4  # relative to max|W| of each matrix

# name -> (method, its options, --offload disk on the torchrun run, weight tolerance or None: exact)
END_TO_END = {
    "wanda": ("wanda", ["--sparsity", "0.5"], True, None),
    "sparsegpt-2:4": ("sparsegpt", ["--pattern", "2:4"], False, SPARSEGPT_WEIGHT_RTOL),
    # OWL's dense pass sums the column norms over ranks, as the pruning pass does (here with
    # the layers and the dense copy of the hidden states streamed from disk).
    "wanda-owl": ("wanda", ["--sparsity", "0.5", "--layer-ratios", "owl", "--owl-lambda", "0.2"], True, None),
    # one HessianMomentsStat per input: Wanda's norms, DSnoT's moments and the exact update's Hessian
    "wanda-dsnot-exact": ("wanda", ["--sparsity", "0.5", "--refine", "dsnot", "--update", "exact",
                                    "--exact-damp", EXACT_DAMP], False, EXACT_WEIGHT_RTOL),
}


@pytest.mark.slow  # ~40 s each: 2 CLI runs of a tiny Llama, one of them under torchrun
@pytest.mark.parametrize("case", sorted(END_TO_END))
def test_torchrun_pruning_matches_single_process(case, tiny_llama_dir, ptb_train_text, tmp_path):
    method, options, offload, weight_rtol = END_TO_END[case]
    calibration = tmp_path / "calibration.txt"
    calibration.write_text(ptb_train_text[:100_000], encoding="utf-8")
    common = ["-m", f"llmprune.{method}", "--model", str(tiny_llama_dir), *options, "--dataset", str(calibration),
              "--nsamples", "5", "--seqlen", "32", "--eval", "none", "--device", "cpu", "--no-progress"]
    single, multi = tmp_path / "single", tmp_path / "torchrun"
    _run([*common, "--save", str(single), "--results", str(tmp_path / "single.json")])
    # 5 samples: the shards are uneven (3 and 2 samples). With offload, the torchrun run also
    # streams layers and hidden states from disk on both ranks (rank 0 alone writes the work folder).
    streamed = ["--offload", "disk", "--offload-activations", "disk"] if offload else []
    proc = _torchrun(*common, *streamed, "--save", str(multi), "--results", str(tmp_path / "torchrun.json"),
                     "--log-level", "DEBUG")
    # Proof that the ranks split the samples and summed their statistics: two ranks each
    # running all 5 samples would also reproduce the single-process checkpoint.
    assert re.search(r"summed \d+ statistics over 2 ranks; samples per statistic: \[5\]", proc.stderr), (
        proc.stderr[-5000:]
    )

    want, got = _pruned_weights(single), _pruned_weights(multi)
    assert got.keys() == want.keys()
    pruned = [name for name in want if ".layers." in name and name.endswith("proj.weight")]
    assert len(pruned) == 3 * 7, pruned
    for name in want:
        if name not in pruned:
            assert torch.equal(got[name], want[name]), name  # never touched by pruning
            continue
        assert torch.equal(got[name] != 0, want[name] != 0), f"{case}: mask of {name} differs"
        if weight_rtol is None:
            assert torch.equal(got[name], want[name]), name
        else:
            scale = want[name].abs().max().item()
            diff = (got[name] - want[name]).abs().max().item()
            assert diff <= weight_rtol * scale, (name, diff, scale)
    # Every rank calibrated with the same windows: the recipe hashes all 5, not a shard.
    recipes = [json.loads((folder / "llmprune.json").read_text())["recipe"] for folder in (single, multi)]
    hashes = [recipe["calibration"]["token_ids_sha256"] for recipe in recipes]
    assert hashes[0] == hashes[1], hashes
    assert recipes[1]["refinements"] == recipes[0]["refinements"]
    assert (recipes[0]["refinements"] is not None) == ("exact" in case)  # the options were taken
    if "owl" in case:
        # The outlier ratios are counts of scores above M x their layer's mean: equal, as the
        # masks are, unless a score ties the threshold to within the norms' rounding.
        results = [json.loads((tmp_path / f"{run}.json").read_text()) for run in ("single", "torchrun")]
        for key in ("outlier_ratios", "layer_sparsity"):
            assert recipes[1][key] == recipes[0][key], key
        assert len(set(recipes[0]["layer_sparsity"])) == 3  # not the uniform run
        targets = [[layer["target_sparsity"] for layer in result["layers"]] for result in results]
        assert targets[0] == targets[1]
