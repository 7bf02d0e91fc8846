"""The work folder of a pruning run: per-layer state that makes it resumable.

Layout (``--work-dir DIR``)::

    DIR/progress.json             what is done: fingerprint, completed layers, their reports
    DIR/layer-00000.safetensors   decoder layer 0 after pruning (full state-dict names)
    DIR/layer-00001.safetensors   ...
    DIR/quant-00000.safetensors   with --wbits: the quantization grids of layer 0's matrices

Every file is written to a temporary name and renamed into place, and ``progress.json``
is rewritten only after the layer file it counts is complete, so a run killed at any
instant leaves a folder whose ``progress.json`` describes only whole layers. A stray
temporary file from the killed write is ignored and overwritten.

On ``--resume`` the run checks that ``progress.json`` was written by the same recipe (model,
method, pattern, calibration tokens, ...; :func:`fingerprint`), then continues with the
first layer not yet done. The inputs of that layer are not stored: they are recomputed by
running the calibration windows through the already pruned layers read back from this
folder, which costs one forward pass per done layer and gives bitwise the same tensors as
the interrupted run had (same inputs, same operations).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from llmprune.checkpoints import safetensors_io as st
from llmprune.checkpoints.files import replace_atomically
from llmprune.errors import UsageError

logger = logging.getLogger(__name__)

PROGRESS_FILE = "progress.json"
WORK_FORMAT = "llmprune-work"
WORK_VERSION = 1

# Config fields that change the pruned weights; a resumed run must match them all.
RECIPE_FIELDS = ("model", "revision", "method", "sparsity", "pattern", "dataset", "nsamples", "seqlen", "seed",
                 "dtype", "true_sequential", "exclude", "wbits", "groupsize", "sym", "update", "refine", "score",
                 "exact_iters", "exact_rho", "exact_cg_iters", "exact_damp", "dsnot_cycles", "dsnot_threshold",
                 "dsnot_var_power", "dsnot_same_sign", "ria_alpha", "ria_per_row", "permute_channels",
                 "layer_ratios", "owl_m", "owl_lambda")


def fingerprint(config, calibration_sha256: str | None, num_layers: int) -> dict:
    """What must be equal for a run to continue another: the recipe fields, the calibration
    token ids' sha256 and the number of decoder layers."""
    values = {name: getattr(config, name) for name in RECIPE_FIELDS}
    values["method_config"] = dataclasses.asdict(config.method_config)  # the method's options (SparseGPT's percdamp, ...)
    values["calibration_sha256"] = calibration_sha256
    values["num_layers"] = num_layers
    return values


class WorkDir:
    """A run's work folder. ``temporary`` ones are removed by :meth:`cleanup`."""

    def __init__(self, path: str | os.PathLike, *, temporary: bool = False):
        self.path = Path(path)
        self.temporary = temporary
        self.progress: dict = {}

    @classmethod
    def temporary_beside(cls, anchor: str | os.PathLike | None) -> WorkDir:
        """A fresh temporary work folder next to ``anchor`` (the --save folder), so the pruned
        layers land on the same disk as the checkpoint; in the current folder without one."""
        parent = Path(anchor).resolve().parent if anchor else Path.cwd()
        parent.mkdir(parents=True, exist_ok=True)
        return cls(tempfile.mkdtemp(prefix=".llmprune-work-", dir=parent), temporary=True)

    def layer_path(self, index: int) -> Path:
        return self.path / f"layer-{index:05d}.safetensors"

    # -- starting or resuming
    def start(self, expected: dict, *, resume: bool) -> int:
        """Open the folder for a run with ``expected`` fingerprint; return the number of layers
        already done (0 for a new run). Raises UsageError for a folder that holds another
        run, or an unfinished run when ``resume`` is off."""
        progress_file = self.path / PROGRESS_FILE
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"--work-dir {str(self.path)!r} exists and is not a folder")
        if not progress_file.is_file():
            if self.path.is_dir() and any(p.name != PROGRESS_FILE and not p.name.startswith(".")
                                          for p in self.path.iterdir()):
                raise UsageError(f"--work-dir {str(self.path)!r} is not empty and holds no {PROGRESS_FILE}; "
                                 "use an empty or new folder")
            if resume:
                logger.warning("--resume: %s holds no earlier run; starting from the first layer", self.path)
            self.path.mkdir(parents=True, exist_ok=True)
            self.progress = {"format": WORK_FORMAT, "format_version": WORK_VERSION, "fingerprint": expected,
                             "completed_layers": 0, "layers": [], "finished": False}
            self._write_progress()
            return 0
        try:
            progress = json.loads(progress_file.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise UsageError(f"{progress_file}: unreadable ({error}); remove the work folder to start over") from None
        if progress.get("format") != WORK_FORMAT or progress.get("format_version") != WORK_VERSION:
            raise UsageError(f"{progress_file}: not an llmprune work folder of version {WORK_VERSION}")
        done = int(progress.get("completed_layers", 0))
        if not resume:
            raise UsageError(
                f"--work-dir {str(self.path)!r} holds an earlier run ({done} of {expected['num_layers']} layers done); "
                "pass --resume to continue it, or remove the folder to start over"
            )
        stored = progress.get("fingerprint") or {}
        for key in [*expected, *(k for k in stored if k not in expected)]:  # recipe fields first
            if stored.get(key) != expected.get(key):
                raise UsageError(
                    f"--resume: the run in {str(self.path)!r} used {key}={stored.get(key)!r}, this one "
                    f"{key}={expected.get(key)!r}; resume with the same options or use another --work-dir"
                )
        for index in range(done):
            if not self.layer_path(index).is_file():
                raise UsageError(f"--resume: {self.layer_path(index)} is missing; remove the work folder to start over")
        self.progress = progress
        # What a killed run left half-written: temporary files and hidden-state files
        # (``--offload-activations disk``); neither is ever read back.
        for stale in [*self.path.glob(".*.partial-*"), *self.path.glob("hidden-*.bin")]:
            stale.unlink(missing_ok=True)
        logger.info("resuming from %s: %d layers already pruned", self.path, done)
        return done

    @property
    def completed(self) -> int:
        return int(self.progress.get("completed_layers", 0))

    @property
    def reports(self) -> list[dict]:
        return list(self.progress.get("layers", []))

    # -- per layer
    def write_layer(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        """Write one pruned layer's tensors atomically (temporary file, then rename)."""
        from safetensors.torch import save_file

        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        replace_atomically(self.layer_path(index), lambda tmp: save_file(cpu, str(tmp)), durable=True)

    def read_layer(self, index: int) -> dict[str, torch.Tensor]:
        """The tensors written by :meth:`write_layer` (read into memory, no mapping)."""
        header = st.read_header(self.layer_path(index))
        return dict(st.iter_tensors(header, list(header.tensors), str(header.path)))

    def quant_path(self, index: int) -> Path:
        return self.path / f"quant-{index:05d}.safetensors"

    def write_quant_grids(self, index: int, grids: dict) -> None:
        """Write layer ``index``'s quantization grids (``{(index, matrix name): QuantGrid}``)
        atomically, before :meth:`layer_done` counts the layer."""
        from safetensors.torch import save_file

        tensors, meta = {}, {}
        for (_, name), grid in grids.items():
            tensors[f"{name}.scale"] = grid.scale.detach().cpu().contiguous()
            tensors[f"{name}.zero"] = grid.zero.detach().cpu().contiguous()
            meta[name] = json.dumps({"bits": grid.bits, "groupsize": grid.groupsize, "sym": grid.sym})
        replace_atomically(self.quant_path(index), lambda tmp: save_file(tensors, str(tmp), metadata=meta),
                           durable=True)

    def read_quant_grids(self, index: int) -> dict:
        """The grids :meth:`write_quant_grids` wrote for layer ``index``."""
        from llmprune.solvers.quant import QuantGrid

        header = st.read_header(self.quant_path(index))
        tensors = dict(st.iter_tensors(header, list(header.tensors), str(header.path)))
        grids = {}
        for name, text in (header.metadata or {}).items():
            info = json.loads(text)
            grids[(index, name)] = QuantGrid(info["bits"], info["groupsize"], info["sym"], tensors[f"{name}.scale"],
                                             tensors[f"{name}.zero"])
        return grids

    def layer_done(self, index: int, report: dict) -> None:
        """Record that layer ``index`` (already written) is done, with its report."""
        if index != self.completed:
            raise RuntimeError(f"work folder {self.path}: layer {index} finished, expected {self.completed}")
        self.progress["layers"] = self.reports + [report]
        self.progress["completed_layers"] = index + 1
        self._write_progress()

    def finish(self, **extra) -> None:
        self.progress.update(extra, finished=True)
        self._write_progress()

    def cleanup(self) -> None:
        """Remove the folder if it is temporary (a user's --work-dir is kept)."""
        if self.temporary:
            shutil.rmtree(self.path, ignore_errors=True)

    def _write_progress(self) -> None:
        text = json.dumps(self.progress, indent=1) + "\n"
        replace_atomically(self.path / PROGRESS_FILE, lambda tmp: tmp.write_text(text), durable=True)
