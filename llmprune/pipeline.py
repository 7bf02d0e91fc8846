"""``prune(...)``: the whole run, as named stages - load, calibrate, prune the layers, evaluate, save.

This is the typed function behind ``python -m llmprune.sparsegpt | wanda | magnitude``; its
keyword arguments are the fields of :class:`llmprune.config.PruneConfig` plus every method's
options (``llmprune.oneshot.methods``). Where the model lives is chosen once
(:class:`InMemory` or :class:`OnDisk`, by ``--offload``); the stages never branch on it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmprune.calibration import data
from llmprune.calibration.capture import capture_layer_calls, replay_final_states
from llmprune.checkpoints import hub
from llmprune.checkpoints.files import check_output_dir, write_json_atomic
from llmprune.checkpoints.save import check_save_format, library_versions, save_checkpoint
from llmprune.config import PruneConfig
from llmprune.errors import UsageError, check_int
from llmprune.evaluation import perplexity, zeroshot
from llmprune.models.architecture import check_pattern_fits, check_quantizable, find_decoder_layers
from llmprune.oneshot.loop import LayerLoop, Stream
from llmprune.oneshot import refine
from llmprune.oneshot.methods import Method, get_method, option_fields
from llmprune.oneshot.permute import ChannelPermutation
from llmprune.oneshot.reports import LayerReport
from llmprune.patterns import NM, Pattern, Unstructured, parse_pattern, pattern_to_dict
from llmprune.runtime import devices, distributed
from llmprune.runtime.activations import OFFLOAD_ACTIVATIONS, HiddenStates
from llmprune.runtime.layers import OFFLOAD_WEIGHTS, DiskLayers, MemoryLayers
from llmprune.runtime.workdir import WorkDir, fingerprint
from llmprune.solvers.owl import allocate, comparison_groups, owl_sparsities

logger = logging.getLogger(__name__)


@dataclass
class PruneResult:
    """What a run produced. ``model`` is pruned in place (on the CPU unless evaluated elsewhere)."""

    config: PruneConfig
    pattern: Pattern
    model: object
    tokenizer: object
    layers: list[LayerReport]
    dense_ppl: dict[str, perplexity.PerplexityResult] = field(default_factory=dict)
    pruned_ppl: dict[str, perplexity.PerplexityResult] = field(default_factory=dict)
    # --eval-tasks: llmprune.evaluation.zeroshot.evaluate_tasks' dicts ({} when not measured)
    dense_zeroshot: dict = field(default_factory=dict)
    pruned_zeroshot: dict = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    seqlen: int = 0
    calibration_sha256: str | None = None
    peak_memory: dict[str, int] = field(default_factory=dict)
    results_path: Path | None = None
    is_main: bool = True  # False on the other ranks of a torchrun job (they save and print nothing)
    # with --wbits: {parameter name: llmprune.solvers.quant.QuantGrid} of every quantized matrix (rank 0);
    # save_checkpoint(..., quant_grids=result.quant_grids) stores them packed
    quant_grids: dict = field(default_factory=dict)
    # --layer-ratios owl: each decoder layer's outlier ratio D_l on the dense model (None when
    # not measured: uniform, or a resumed run whose layers were all done)
    outlier_ratios: list[float] | None = None
    # --permute-channels: the llmprune.oneshot.permute.ChannelPermutation the layers were permuted with
    permutation: object | None = None

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over all pruned matrices (weighted by size)."""
        total = sum(m.shape[0] * m.shape[1] for layer in self.layers for m in layer.matrices)
        zeros = sum(m.sparsity * m.shape[0] * m.shape[1] for layer in self.layers for m in layer.matrices)
        return zeros / total if total else 0.0

    def to_dict(self) -> dict:
        def ppl(results):
            return {name: r.__dict__ for name, r in results.items()}

        return {
            "recipe": {
                "method": self.config.method,
                "pattern": pattern_to_dict(self.pattern),
                "calibration": {
                    "source": self.config.dataset,
                    "nsamples": self.config.nsamples,
                    "seqlen": self.seqlen,
                    "seed": self.config.seed,
                    "token_ids_sha256": self.calibration_sha256,
                },
                "config": self.config.to_dict(),
                "quant": None if self.config.quant is None else self.config.quant.describe(),
                "refinements": refine.describe(self.config.refinements),
                "channel_permutation": None if self.permutation is None else self.permutation.describe(),
                "layer_ratios": dataclasses.asdict(self.config.owl),
                # realised fraction of zeros per decoder layer (--layer-ratios owl), else None
                "layer_sparsity": ([layer.sparsity for layer in self.layers] if self.config.owl.active else None),
                "outlier_ratios": self.outlier_ratios,
                # --recipe: its name and the values it proposes (explicit flags override them)
                "named_recipe": ({"name": self.config.recipe, "options": self.config.recipe_options}
                                 if self.config.recipe != "none" else None),
            },
            "results": {
                "sparsity": self.sparsity,
                "dense_ppl": ppl(self.dense_ppl),
                "pruned_ppl": ppl(self.pruned_ppl),
                "dense_zeroshot": self.dense_zeroshot,
                "pruned_zeroshot": self.pruned_zeroshot,
                "seconds": self.seconds,
                "peak_memory": self.peak_memory,
            },
            "layers": [layer.to_dict() for layer in self.layers],
            "versions": library_versions(),
        }


def prune(
    model: str | None = None,
    *,
    method: str = "sparsegpt",
    sparsity: float | None = None,
    pattern: str = "unstructured",
    dataset: str = "c4",
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    eval: str = "wikitext2",
    eval_seqlen: int | None = None,
    max_eval_tokens: int | None = None,
    dense_eval: bool = True,
    eval_tasks: str | None = None,
    eval_tasks_limit: int | None = None,
    eval_batch_size: int = 1,
    num_fewshot: int = 0,
    save: str | None = None,
    overwrite: bool = False,
    save_format: str = "dense",
    push_to_hub: str | None = None,
    private: bool = False,
    hub_revision: str | None = None,
    commit_message: str | None = None,
    results: str | None = None,
    device: str = "auto",
    offload: str = "cpu",
    offload_activations: str = "device",
    calib_batch_size: int = 1,
    work_dir: str | None = None,
    resume: bool = False,
    dtype: str = "auto",
    true_sequential: bool = False,
    output_errors: bool = False,
    exclude: str = "",
    wbits: int | None = None,
    groupsize: int = -1,
    sym: bool = False,
    update: str = "none",
    refine: str = "none",
    score: str = "default",
    exact_iters: int = 20,
    exact_rho: float = 1.0,
    exact_cg_iters: int = 20,
    exact_damp: float = 0.01,
    dsnot_cycles: int = 50,
    dsnot_threshold: float = 0.1,
    dsnot_var_power: float = 1.0,
    dsnot_same_sign: bool = False,
    ria_alpha: float = 0.5,
    ria_per_row: bool = False,
    permute_channels: bool = False,
    layer_ratios: str = "uniform",
    owl_m: float = 5.0,
    owl_lambda: float = 0.08,
    recipe: str = "none",
    trust_remote_code: bool = False,
    revision: str | None = None,
    progress: bool = True,
    percdamp: float = 0.01,
    blocksize: int = 128,
    tokenizer=None,
    loaded_model=None,
) -> PruneResult:
    """Prune a causal LM in one shot; the keywords are the CLI flags (see the README's table).

    ``model`` is a Hub id, local folder, ``.gguf`` file or alias. To prune a model already
    in memory pass ``loaded_model=`` and ``tokenizer=`` (``model`` then only names it in the
    recipe). ``percdamp`` and ``blocksize`` are SparseGPT's options (``SparseGPTConfig``);
    set for another method they are ignored with a warning. Raises
    :class:`llmprune.errors.UsageError` for bad input, before any work.

    ``eval_tasks`` (e.g. ``"offline"`` or ``"boolq,arc_easy"``) scores the dense model (unless
    ``dense_eval=False``) and the pruned one with lm-evaluation-harness, in memory
    (:mod:`llmprune.evaluation.zeroshot`); the task names and their data are checked before
    the model is loaded.

    With ``offload="disk"`` the model is never whole in memory: layers are read from the
    shards while processed, perplexity is computed from hidden states propagated layer by
    layer next to the calibration data, and the checkpoint is assembled from the work folder.
    """
    options = dict(locals())
    del options["tokenizer"], options["loaded_model"]
    method_options = {f.name: options.pop(f.name) for f in option_fields()}
    chosen = get_method(method)
    config = PruneConfig(**options, method_config=chosen.make_config(method_options))
    pattern_value = _validate(config)
    if loaded_model is not None and config.offload == "disk":
        raise UsageError("--offload disk reads the model from its files; it cannot prune a model passed as loaded_model=")
    if loaded_model is not None and tokenizer is None:
        raise UsageError("prune(loaded_model=...) also needs tokenizer=")
    tasks = zeroshot.prepare_tasks(zeroshot.ZeroShotOptions.from_config(config))  # reads the tasks' data
    group, device_name = distributed.init_process_group(config.device)
    try:
        if group.active and config.nsamples < group.world_size:
            raise UsageError(f"--nsamples {config.nsamples} cannot be shared among {group.world_size} processes: "
                             f"use --nsamples >= {group.world_size}")
        placement = OnDisk() if config.offload == "disk" else InMemory(loaded_model, tokenizer)
        run = _Run(config, pattern_value, chosen, group, devices.resolve_device(device_name), placement,
                   tasks if group.is_main else None)  # rank 0 evaluates
        result = run.execute()
        group.barrier()  # rank 0 has saved before any rank returns
        return result
    finally:
        distributed.destroy()  # no barrier here: a rank that raised would leave the others waiting


def _validate(config: PruneConfig) -> Pattern:
    """Cheap checks on every option before anything is loaded; returns the parsed pattern."""
    try:
        pattern = parse_pattern(config.pattern, config.sparsity)
    except ValueError as error:
        raise UsageError(str(error)) from None
    config.quant  # noqa: B018 - raises UsageError for a bad --wbits / --groupsize
    config.refinements.check_method(config.method)  # UsageError for a bad --update / --refine / --score
    if config.permute_channels and not isinstance(pattern, NM):
        raise UsageError(f"--permute-channels needs an N:M --pattern (e.g. 2:4), got {pattern}: "
                         "the permutation only matters to N:M groups; drop --permute-channels")
    if config.owl.active and not isinstance(pattern, Unstructured):  # UsageError for bad --owl-* values first
        raise UsageError(f"--layer-ratios owl needs --pattern unstructured, got {pattern}: N:M fixes every "
                         "layer's sparsity; use --layer-ratios uniform")
    for name in ("nsamples", "seqlen", "calib_batch_size", "eval_seqlen", "max_eval_tokens"):
        check_int("--" + name.replace("_", "-"), getattr(config, name), optional=name.startswith(("eval", "max")))
    if config.save is not None:
        check_output_dir(config.save, config.overwrite)
    check_save_format(config.save_format, config.save)
    hub.check_push_options(config.push_to_hub, private=config.private, revision=config.hub_revision,
                           commit_message=config.commit_message, save=config.save)
    devices.resolve_device(config.device)
    if config.offload not in OFFLOAD_WEIGHTS:
        raise UsageError(f"--offload must be one of {', '.join(OFFLOAD_WEIGHTS)}, got {config.offload!r}")
    if config.offload_activations not in OFFLOAD_ACTIVATIONS:
        raise UsageError(f"--offload-activations must be one of {', '.join(OFFLOAD_ACTIVATIONS)}, "
                         f"got {config.offload_activations!r}")
    if config.eval_tasks is not None and config.offload == "disk":
        raise UsageError("--eval-tasks runs lm-eval on the whole model in memory, which --offload disk never holds: "
                         "use --offload cpu, or evaluate the saved checkpoint (llmprune.evaluation.zeroshot.evaluate_tasks)")
    zeroshot.check_options(zeroshot.ZeroShotOptions.from_config(config))
    if config.resume and config.work_dir is None:
        raise UsageError("--resume needs --work-dir: the folder of the run to continue")
    data.check_disjoint(config.dataset, config.eval_sources)
    return pattern


# ------------------------------------------------------------------------------ placement


class InMemory:
    """``--offload cpu``: the whole model in host memory; each layer visits the compute device,
    and the whole model moves there for each perplexity."""

    needs_work_dir = False

    def __init__(self, loaded_model=None, tokenizer=None):
        self.model, self.tokenizer = loaded_model, tokenizer

    def load(self, config: PruneConfig):
        if self.model is None:
            from llmprune.models.loader import load_model

            self.model, self.tokenizer = load_model(config.model, dtype=config.dtype,
                                                    trust_remote_code=config.trust_remote_code, revision=config.revision)
        return self.model, self.tokenizer

    def layer_store(self, run: _Run):
        return MemoryLayers(run.layers, run.prefix, run.work)

    def evaluate_dense(self, run: _Run) -> None:
        if run.config.dense_eval and run.eval_tokens:
            run.result.dense_ppl = run.evaluate_whole("dense")
        if run.config.dense_eval and run.tasks is not None:
            run.result.dense_zeroshot = run.evaluate_tasks("dense")

    def eval_streams(self, run: _Run) -> list[Stream]:
        return []

    def before_layers(self, run: _Run) -> None:
        """Nothing to drop: the whole model is in memory anyway."""

    def after_layers(self, run: _Run) -> None:
        """Nothing to read back."""

    def evaluate_pruned(self, run: _Run, streams: list[Stream]) -> None:
        if run.eval_tokens:
            run.result.pruned_ppl = run.evaluate_whole("pruned")
        if run.tasks is not None:
            run.result.pruned_zeroshot = run.evaluate_tasks("pruned")

    def layer_files(self, run: _Run):
        return None


class OnDisk:
    """``--offload disk``: a meta-device skeleton; layers are read from the shards while
    processed; perplexity is streamed through the layers next to the calibration data."""

    needs_work_dir = True

    def __init__(self):
        self.where: dict = {}

    def load(self, config: PruneConfig):
        from llmprune.models.loader import load_skeleton_model

        model, tokenizer, _, self.where = load_skeleton_model(
            config.model, dtype=config.dtype, trust_remote_code=config.trust_remote_code, revision=config.revision
        )
        return model, tokenizer

    def layer_store(self, run: _Run):
        return DiskLayers(run.model, run.layers, run.prefix, self.where, None, run.work)

    def evaluate_dense(self, run: _Run) -> None:
        """Measured from a dense stream instead (:meth:`eval_streams`)."""

    def eval_streams(self, run: _Run) -> list[Stream]:
        """The evaluation windows' hidden states, captured once, to run through the layers."""
        if not run.eval_tokens:
            return []
        config, streams = run.config, []
        start = time.perf_counter()
        for source in config.eval_sources:
            windows = perplexity.eval_windows(run.model, run.eval_tokens[source], seqlen=run.eval_seqlen, source=source,
                                              max_tokens=config.max_eval_tokens, add_bos=run.add_bos)
            with devices.explain_out_of_memory(f"capturing the {source} evaluation windows"):
                captured = capture_layer_calls(run.model, run.layers, windows, run.device, show_progress=False)
            if config.dense_eval:
                copies = [h.clone() for h in captured.hidden]
                streams.append(Stream(source, run.store(copies), captured.calls, dense=True))
            streams.append(Stream(source, run.store(captured.hidden), captured.calls, dense=False))
        run.seconds["capture_eval"] = time.perf_counter() - start
        return streams

    def before_layers(self, run: _Run) -> None:
        from llmprune.models.skeleton import release_outside_layers

        release_outside_layers(run.model, run.layers, self.where)  # idle until the evaluation: not held meanwhile

    def after_layers(self, run: _Run) -> None:
        from llmprune.models.skeleton import load_outside_layers

        load_outside_layers(run.model, run.layers, self.where)
        devices.move_all_but_layers(run.model, run.layers, run.device)

    def evaluate_pruned(self, run: _Run, streams: list[Stream]) -> None:
        if not streams:
            return
        start = time.perf_counter()
        for stream in streams:
            with replay_final_states(run.layers, stream.hidden):
                measured = run.perplexity(stream.name, show_progress=False)
            (run.result.dense_ppl if stream.dense else run.result.pruned_ppl)[stream.name] = measured
        run.seconds["eval_streamed"] = time.perf_counter() - start

    def layer_files(self, run: _Run):
        return run.prefix, run.work.read_layer


# ------------------------------------------------------------------------------ the run


class _Run:
    """One process's run (rank ``group.rank`` of a torchrun job): the stages of :func:`prune`."""

    def __init__(self, config: PruneConfig, pattern: Pattern, method: Method, group, device: torch.device, placement,
                 tasks: zeroshot.TaskSet | None = None):
        self.config, self.pattern, self.method, self.group, self.device = config, pattern, method, group, device
        self.placement, self.tasks = placement, tasks
        self.seconds: dict[str, float] = {}
        self.stores: list[HiddenStates] = []
        self.work: WorkDir | None = None
        self.targets: list[float] | None = None  # --layer-ratios owl: OWL's s_l per layer

    def execute(self) -> PruneResult:
        self.load()
        calibration = self.read_data()
        # Rank 0 owns the work folder; the other ranks only read pruned layers back from it.
        if self.config.work_dir is not None:
            self.work = WorkDir(self.config.work_dir)
        elif self.placement.needs_work_dir and self.group.is_main:
            self.work = WorkDir.temporary_beside(self.config.save)
        try:
            self.prune_layers(calibration)
            self.evaluate()
            self.result.seconds = self.seconds
            self.result.peak_memory = devices.peak_memory_bytes(self.device)
            if not self.group.is_main:
                return self.result  # rank 0 saves, writes the results and pushes
            self.save()
        finally:
            self.close_stores()
            if self.work is not None and self.group.is_main:
                self.work.cleanup()
        self.publish()
        return self.result

    # -- stages
    def load(self) -> None:
        """The model, its decoder layers, and the window lengths it allows."""
        from llmprune.models.sources import model_max_length

        start = time.perf_counter()
        self.model, self.tokenizer = self.placement.load(self.config)
        self.model.eval()
        self.seconds["load"] = time.perf_counter() - start
        self.prefix, self.layers = find_decoder_layers(self.model)
        check_pattern_fits(self.layers, self.pattern, self.config.exclude_patterns)
        if self.config.quant is not None:
            check_quantizable(self.layers, self.config.quant, self.config.exclude_patterns, self.config.save_format)
        self.seqlen = self.config.seqlen
        limit = model_max_length(self.model)
        if limit is not None and self.seqlen > limit:
            logger.warning("--seqlen %d exceeds the model's limit of %d positions; using %d", self.seqlen, limit, limit)
            self.seqlen = limit
        self.eval_seqlen = min(self.config.eval_seqlen or self.seqlen, limit or 1 << 62)
        self.add_bos = data.needs_bos(self.tokenizer)

    def loop_statistic(self) -> type | None:
        """The statistic the layer loop accumulates (None: a data-free run)."""
        refinements = self.config.refinements
        if refinements.active:
            return refinements.statistic_for(self.method, self.config.quant)
        return self.method.statistic_for(self.config.quant)

    def read_data(self) -> torch.Tensor | None:
        """Calibration windows (this rank's share) and evaluation token streams (rank 0)."""
        config = self.config
        start = time.perf_counter()
        calibration = None
        if self.loop_statistic() is not None or config.owl.active:  # OWL's outlier pass needs data, even for magnitude
            calibration = data.get_calibration(config.dataset, self.tokenizer, nsamples=config.nsamples,
                                               seqlen=self.seqlen, seed=config.seed, add_bos=self.add_bos)
        self.eval_tokens = {s: data.get_eval_tokens(s, self.tokenizer, seqlen=self.eval_seqlen)
                            for s in config.eval_sources}
        self.seconds["data"] = time.perf_counter() - start
        self.result = PruneResult(config, self.pattern, self.model, self.tokenizer, [], seqlen=self.seqlen,
                                  is_main=self.group.is_main)
        if calibration is not None:
            self.result.calibration_sha256 = hashlib.sha256(calibration.numpy().tobytes()).hexdigest()
            calibration = calibration[self.group.shard(len(calibration))]  # this rank's samples (all of them alone)
        if not self.group.is_main:
            self.eval_tokens = {}  # rank 0 evaluates, saves and reports
        return calibration

    def prune_layers(self, calibration: torch.Tensor | None) -> None:
        """Dense evaluation, then every decoder layer pruned (resuming where a run stopped)."""
        first_layer = self.first_layer()
        if self.config.permute_channels:
            self.result.permutation = ChannelPermutation.for_run(self.model.config, self.pattern, self.config.method,
                                                                 self.config.score, self.config.ria_alpha)
        self.placement.evaluate_dense(self)
        devices.move_all_but_layers(self.model, self.layers, self.device)
        self.streams = self.placement.eval_streams(self)
        loop = LayerLoop(
            self.layers, self.method, self.pattern, self.device, config=self.config.method_config,
            weights=self.placement.layer_store(self), exclude=self.config.exclude_patterns,
            true_sequential=self.config.true_sequential, output_errors=self.config.output_errors,
            streams=self.streams, start=first_layer,
            on_layer_done=self.layer_done, show_progress=self.config.progress and self.group.is_main, group=self.group,
            quant=self.config.quant, refinements=self.config.refinements, permute=self.result.permutation,
            calib_batch_size=self.config.calib_batch_size,
        )
        self.loop = loop
        if self.work is not None and self.group.is_main and self.config.quant is not None:
            for index in range(first_layer):  # grids of the layers an interrupted run finished
                loop.quant_grids.update(self.work.read_quant_grids(index))
        captured = hidden = None
        if calibration is not None and first_layer < len(self.layers):  # all done already: no calibration pass
            start = time.perf_counter()
            with devices.explain_out_of_memory("capturing the inputs of the decoder layers"):
                captured = capture_layer_calls(self.model, self.layers, calibration, self.device,
                                               show_progress=self.config.progress)
            self.seconds["capture"] = time.perf_counter() - start
            dense_copy = self.store([h.clone() for h in captured.hidden]) if self.config.owl.active else None
            hidden = self.store(captured.hidden)
        self.placement.before_layers(self)
        if captured is not None and self.config.owl.active:
            self.per_layer_patterns(loop, captured, dense_copy)
        if self.loop_statistic() is None and captured is not None:  # magnitude + owl: the data was for OWL only
            hidden.close()
            captured = hidden = None
        new_reports = loop.run(captured, hidden)
        if hidden is not None:
            hidden.close()  # the last layer's outputs: not needed
        del captured, hidden
        self.placement.after_layers(self)
        earlier = self.work.reports[:first_layer] if self.work is not None and self.group.is_main else []
        self.result.layers = [LayerReport.from_dict(r) for r in earlier] + new_reports
        self.result.quant_grids = self.quant_grids() if self.config.quant is not None and self.group.is_main else {}
        for phase in ("statistics", "solve", "propagate"):
            self.seconds[phase] = sum(layer.seconds.get(phase, 0.0) for layer in new_reports)
        for phase in ("load", "write"):  # moving or reading layers in, writing them out
            self.seconds[f"layers_{phase}"] = sum(layer.seconds.get(phase, 0.0) for layer in new_reports)

    def per_layer_patterns(self, loop: LayerLoop, captured, dense_copy: HiddenStates) -> None:
        """``--layer-ratios owl``: outlier ratios from a pass through the dense layers, OWL's s_l,
        then per-matrix sparsities whose total is exactly the uniform run's
        (``llmprune.solvers.owl.allocate``); the loop then prunes with them. On --resume the
        ratios are measured again rather than stored: the same windows through the same dense
        layers give the same ratios (one forward per layer, no solve)."""
        start = time.perf_counter()
        measured = loop.dense_outlier_ratios(captured, dense_copy, self.config.owl_m)
        dense_copy.close()
        self.seconds["owl_outliers"] = time.perf_counter() - start
        sparsity = float(self.pattern.sparsity)
        ratios = [ratio for ratio, _ in measured]
        targets = owl_sparsities(ratios, sparsity, self.config.owl_lambda)
        blocksize = getattr(self.config.method_config, "blocksize", 128)
        refinements = self.config.refinements
        per_row = refinements.ria.ria_per_row if refinements.score == "ria" else None
        groups = [[comparison_groups(self.method.name, m.out_features, m.in_features, blocksize=blocksize,
                                     per_row=per_row) for m in matrices] for _, matrices in measured]
        per_matrix = allocate(groups, targets, sparsity)
        table = {(index, m.name): Unstructured(s)
                 for index, (_, matrices) in enumerate(measured) for m, s in zip(matrices, per_matrix[index])}
        loop.pattern = lambda index, name: table.get((index, name), self.pattern)
        self.targets = targets  # the reports get them as each layer is done (layer_done)
        self.result.outlier_ratios = ratios
        logger.info("OWL per-layer sparsities: %s", ", ".join(f"{t:.3f}" for t in targets))

    def evaluate(self) -> None:
        """Perplexity and --eval-tasks of the pruned model (and the dense perplexity, where it was streamed)."""
        self.placement.evaluate_pruned(self, self.streams)
        devices.move_all_but_layers(self.model, self.layers, torch.device("cpu"))
        self.close_stores()

    def save(self) -> None:
        config = self.config
        if config.save is not None:
            from llmprune.checkpoints.modelcard import base_model_info

            start = time.perf_counter()
            save_checkpoint(self.model, self.tokenizer, config.save, self.result.to_dict(),
                            save_format=config.save_format, base_model=base_model_info(config.model, config.revision),
                            repo_id=config.push_to_hub, overwrite=config.overwrite,
                            layer_files=self.placement.layer_files(self),
                            **({"quant_grids": self.quant_grids()} if config.quant is not None else {}))
            self.seconds["save"] = time.perf_counter() - start
        if self.work is not None:
            self.work.finish()

    def publish(self) -> None:
        config = self.config
        if config.results is not None:
            self.result.results_path = write_json_atomic(config.results, self.result.to_dict())
        if config.push_to_hub is not None:
            hub.push_to_hub(config.save, config.push_to_hub, private=config.private, revision=config.hub_revision,
                            commit_message=config.commit_message)

    # -- helpers the placements use
    def first_layer(self) -> int:
        """The first layer to prune: 0, or after the layers a resumed run's work folder holds."""
        first = torch.zeros(1, dtype=torch.int64)
        if self.work is not None and self.group.is_main:
            expected = fingerprint(self.config, self.result.calibration_sha256, len(self.layers))
            first[0] = self.work.start(expected, resume=self.config.resume)
        self.group.broadcast_(first, src=0)
        return int(first.item())

    def layer_done(self, index: int, report: LayerReport) -> None:
        if self.targets is not None:  # before the work folder records the report
            report.target_sparsity = self.targets[index]
        if self.work is not None and self.group.is_main:
            if self.config.quant is not None:  # before the report: a finished layer always has its grids
                self.work.write_quant_grids(index, {k: g for k, g in self.loop.quant_grids.items() if k[0] == index})
            self.work.layer_done(index, report.to_dict())

    def quant_grids(self) -> dict:
        """``{parameter name: QuantGrid}`` of the quantized matrices, for the checkpoint writer."""
        from llmprune.models.architecture import prunable_matrices

        names = {}
        for index, layer in enumerate(self.layers):
            for matrix in prunable_matrices(layer):
                names[(index, matrix.name)] = f"{self.prefix}.{index}.{matrix.parameter_name}"
        return {names[key]: grid for key, grid in self.loop.quant_grids.items()}

    def store(self, tensors: list[torch.Tensor]) -> HiddenStates:
        folder = self.work.path if self.work is not None else None
        self.stores.append(HiddenStates.from_tensors(self.config.offload_activations, tensors, self.device, folder))
        return self.stores[-1]

    def close_stores(self) -> None:
        for hidden_states in self.stores:
            hidden_states.close()

    def perplexity(self, source: str, *, show_progress: bool) -> perplexity.PerplexityResult:
        result = perplexity.perplexity(
            self.model, self.eval_tokens[source], seqlen=self.eval_seqlen, source=source,
            max_tokens=self.config.max_eval_tokens, add_bos=self.add_bos, device=self.device,
            show_progress=show_progress,
        )
        logger.info("%s perplexity %.3f on %d tokens", source, result.ppl, result.n_tokens)
        return result

    def evaluate_whole(self, label: str) -> dict[str, perplexity.PerplexityResult]:
        """Every evaluation source on the whole model, moved to the compute device and back."""
        start = time.perf_counter()
        with devices.explain_out_of_memory(f"evaluating the {label} model"):
            self.model.to(self.device)
            results = {s: self.perplexity(s, show_progress=self.config.progress) for s in self.config.eval_sources}
            self.model.to("cpu")
        self.seconds[f"eval_{label}"] = time.perf_counter() - start
        return results

    def evaluate_tasks(self, label: str) -> dict:
        """--eval-tasks on the whole model, moved to the compute device and back."""
        start = time.perf_counter()
        with devices.explain_out_of_memory(f"running --eval-tasks on the {label} model"):
            self.model.to(self.device)
            summary = zeroshot.evaluate_tasks(self.model, self.tokenizer, self.tasks, add_bos=self.add_bos or None)
            self.model.to("cpu")
        self.seconds[f"eval_tasks_{label}"] = time.perf_counter() - start
        return summary


def default_results_path(model: str, method: str, pattern: str, sparsity: float | None) -> str:
    """``llmprune-results/<model>-<method>-<pattern>-<UTC time>.json`` (the CLI's default)."""
    name = Path(str(model).rstrip("/")).name.replace(".gguf", "")
    tag = pattern.replace(":", "of") if pattern != "unstructured" else f"unstructured{sparsity}"
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return str(Path("llmprune-results") / f"{name}-{method}-{tag}-{stamp}.json")
