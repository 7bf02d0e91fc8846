"""``prune(...)``: the whole run - load, calibrate, prune layer by layer, evaluate, save.

This is the typed function behind ``python -m llmprune.sparsegpt | wanda | magnitude``;
its keyword arguments are exactly the fields of :class:`llmprune.config.PruneConfig`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmprune.calibration import data
from llmprune.runtime import devices
from llmprune.runtime import distributed
from llmprune.oneshot import engine
from llmprune.checkpoints import hub
from llmprune.runtime import offload
from llmprune.evaluation import perplexity
from llmprune.models.architecture import check_pattern_fits, find_decoder_layers
from llmprune.checkpoints.save import check_output_dir, check_save_format, library_versions, save_checkpoint, write_json_atomic
from llmprune.config import METHOD_NAMES, PruneConfig
from llmprune.errors import UsageError
from llmprune.solvers import METHODS
from llmprune.patterns import Pattern, parse_pattern, pattern_to_dict
from llmprune.runtime.workdir import WorkDir, fingerprint

logger = logging.getLogger(__name__)


@dataclass
class PruneResult:
    """What a run produced. ``model`` is pruned in place (on the CPU unless evaluated elsewhere)."""

    config: PruneConfig
    pattern: Pattern
    model: object
    tokenizer: object
    layers: list[engine.LayerReport]
    dense_ppl: dict[str, perplexity.PerplexityResult] = field(default_factory=dict)
    pruned_ppl: dict[str, perplexity.PerplexityResult] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    seqlen: int = 0
    calibration_sha256: str | None = None
    peak_memory: dict[str, int] = field(default_factory=dict)
    results_path: Path | None = None
    is_main: bool = True  # False on the other ranks of a torchrun job (they save and print nothing)

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
            },
            "results": {
                "sparsity": self.sparsity,
                "dense_ppl": ppl(self.dense_ppl),
                "pruned_ppl": ppl(self.pruned_ppl),
                "seconds": self.seconds,
                "peak_memory": self.peak_memory,
            },
            "layers": [layer.to_dict() for layer in self.layers],
            "versions": library_versions(),
        }


def _validate(config: PruneConfig) -> Pattern:
    """Cheap checks on every option before anything is loaded; returns the parsed pattern."""
    if config.method not in METHOD_NAMES:
        raise UsageError(f"unknown method {config.method!r}: expected one of {', '.join(METHOD_NAMES)}")
    try:
        pattern = parse_pattern(config.pattern, config.sparsity)
    except ValueError as error:
        raise UsageError(str(error)) from None
    for name in ("nsamples", "seqlen", "blocksize"):
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise UsageError(f"--{name} must be a positive integer, got {value!r}")
    for name in ("eval_seqlen", "max_eval_tokens"):
        value = getattr(config, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    if not 0 <= config.percdamp < 1e3:
        raise UsageError(f"--percdamp must be a non-negative number, got {config.percdamp!r}")
    if config.save is not None:
        check_output_dir(config.save, config.overwrite)
    check_save_format(config.save_format, config.save)
    hub.check_push_options(config.push_to_hub, private=config.private, revision=config.hub_revision,
                           commit_message=config.commit_message, save=config.save)
    devices.resolve_device(config.device)
    if config.offload not in offload.OFFLOAD_WEIGHTS:
        raise UsageError(f"--offload must be one of {', '.join(offload.OFFLOAD_WEIGHTS)}, got {config.offload!r}")
    if config.offload_activations not in offload.OFFLOAD_ACTIVATIONS:
        raise UsageError(f"--offload-activations must be one of {', '.join(offload.OFFLOAD_ACTIVATIONS)}, "
                         f"got {config.offload_activations!r}")
    if config.resume and config.work_dir is None:
        raise UsageError("--resume needs --work-dir: the folder of the run to continue")
    data.check_disjoint(config.dataset, config.eval_sources)
    return pattern


def _evaluate(model, tokenizer, sources, eval_tokens, seqlen, config, device, add_bos) -> dict:
    results = {}
    for source in sources:
        results[source] = perplexity.perplexity(
            model,
            eval_tokens[source],
            seqlen=seqlen,
            source=source,
            max_tokens=config.max_eval_tokens,
            add_bos=add_bos,
            device=device,
            show_progress=config.progress,
        )
        logger.info("%s perplexity %.3f on %d tokens", source, results[source].ppl, results[source].n_tokens)
    return results


def prune(model: str | None = None, *, tokenizer=None, loaded_model=None, **options) -> PruneResult:
    """Prune a causal LM in one shot; keyword arguments are the fields of ``PruneConfig``.

    ``model`` is a Hub id, local folder, ``.gguf`` file or alias. To prune a model already
    in memory pass ``loaded_model=`` and ``tokenizer=`` (``model`` then only names it in the
    recipe). Raises :class:`llmprune.errors.UsageError` for bad input, before any work.

    With ``offload="disk"`` the model is never whole in memory: layers are read from the
    shards while processed, perplexity is computed from hidden states propagated layer by
    layer next to the calibration data, and the checkpoint is assembled from the work folder.
    """
    config = PruneConfig(model=model, **options)
    pattern = _validate(config)
    if loaded_model is not None and config.offload == "disk":
        raise UsageError("--offload disk reads the model from its files; it cannot prune a model passed as loaded_model=")
    group, device_name = distributed.init_process_group(config.device)
    try:
        if group.active and config.nsamples < group.world_size:
            raise UsageError(f"--nsamples {config.nsamples} cannot be shared among {group.world_size} processes: "
                             f"use --nsamples >= {group.world_size}")
        result = _prune(config, pattern, group, devices.resolve_device(device_name), tokenizer, loaded_model)
        group.barrier()  # rank 0 has saved before any rank returns
        return result
    finally:
        distributed.destroy()  # no barrier here: a rank that raised would leave the others waiting


def _prune(config: PruneConfig, pattern: Pattern, group, device: torch.device, tokenizer, loaded_model) -> PruneResult:
    """The body of :func:`prune` for one process (rank ``group.rank`` of a torchrun job)."""
    from llmprune.models.sources import load_model, model_max_length

    offload_disk = config.offload == "disk"
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    where = None
    if offload_disk:
        loaded_model, tokenizer, _, where = offload.load_offloaded(
            config.model, dtype=config.dtype, trust_remote_code=config.trust_remote_code, revision=config.revision
        )
    elif loaded_model is None:
        loaded_model, tokenizer = load_model(
            config.model,
            dtype=config.dtype,
            trust_remote_code=config.trust_remote_code,
            revision=config.revision,
        )
    elif tokenizer is None:
        raise UsageError("prune(loaded_model=...) also needs tokenizer=")
    model_obj = loaded_model
    model_obj.eval()
    seconds["load"] = time.perf_counter() - start

    prefix, layers = find_decoder_layers(model_obj)
    check_pattern_fits(layers, pattern, config.exclude_patterns)
    seqlen = config.seqlen
    limit = model_max_length(model_obj)
    if limit is not None and seqlen > limit:
        logger.warning("--seqlen %d exceeds the model's limit of %d positions; using %d", seqlen, limit, limit)
        seqlen = limit
    eval_seqlen = min(config.eval_seqlen or seqlen, limit or 1 << 62)
    add_bos = data.needs_bos(tokenizer)
    method = METHODS[config.method]
    needs_data = method.stat_cls is not None

    start = time.perf_counter()
    calibration = None
    if needs_data:
        calibration = data.get_calibration(
            config.dataset, tokenizer, nsamples=config.nsamples, seqlen=seqlen, seed=config.seed, add_bos=add_bos
        )
    eval_tokens = {s: data.get_eval_tokens(s, tokenizer, seqlen=eval_seqlen) for s in config.eval_sources}
    seconds["data"] = time.perf_counter() - start

    result = PruneResult(config, pattern, model_obj, tokenizer, [], seqlen=seqlen, is_main=group.is_main)
    if calibration is not None:
        result.calibration_sha256 = hashlib.sha256(calibration.numpy().tobytes()).hexdigest()
        calibration = calibration[group.shard(len(calibration))]  # this rank's samples (all of them alone)
    if not group.is_main:
        eval_tokens = {}  # rank 0 evaluates, saves and reports

    # Rank 0 owns the work folder; the other ranks only read pruned layers back from it.
    if config.work_dir is not None:
        work = WorkDir(config.work_dir)
    elif offload_disk and group.is_main:
        work = WorkDir.temporary_beside(config.save)
    else:
        work = None
    stores: list[offload.HiddenStates] = []
    try:
        first_layer = torch.zeros(1, dtype=torch.int64)
        if work is not None and group.is_main:
            first_layer[0] = work.start(fingerprint(config, result.calibration_sha256, len(layers)), resume=config.resume)
        group.broadcast_(first_layer, src=0)
        first_layer = int(first_layer.item())
        if offload_disk:
            weights = offload.DiskLayers(model_obj, layers, prefix, where, None, work)
        else:
            weights = offload.MemoryLayers(layers, prefix, work)

        def store(tensors: list[torch.Tensor]) -> offload.HiddenStates:
            folder = work.path if work is not None else None
            stores.append(offload.HiddenStates.from_tensors(config.offload_activations, tensors, device, folder))
            return stores[-1]

        def evaluate(label: str) -> dict[str, perplexity.PerplexityResult]:
            # The whole model moves to the compute device for evaluation and back afterwards.
            start = time.perf_counter()
            with devices.explain_out_of_memory(f"evaluating the {label} model"):
                model_obj.to(device)
                results = _evaluate(model_obj, tokenizer, config.eval_sources, eval_tokens, eval_seqlen, config, device, add_bos)
                model_obj.to("cpu")
            seconds[f"eval_{label}"] = time.perf_counter() - start
            return results

        if config.dense_eval and eval_tokens and not offload_disk:
            result.dense_ppl = evaluate("dense")

        devices.move_all_but_layers(model_obj, layers, device)
        streams: list[engine.Stream] = []
        if offload_disk and eval_tokens:
            start = time.perf_counter()
            for source in config.eval_sources:
                windows = perplexity.eval_windows(model_obj, eval_tokens[source], seqlen=eval_seqlen, source=source,
                                                  max_tokens=config.max_eval_tokens, add_bos=add_bos)
                with devices.explain_out_of_memory(f"capturing the {source} evaluation windows"):
                    captured = engine.capture_layer_calls(model_obj, layers, windows, device, show_progress=False)
                if config.dense_eval:
                    copies = [h.clone() for h in captured.hidden]
                    streams.append(engine.Stream(source, store(copies), captured.calls, dense=True))
                streams.append(engine.Stream(source, store(captured.hidden), captured.calls, dense=False))
            seconds["capture_eval"] = time.perf_counter() - start

        def layer_done(index: int, report: engine.LayerReport) -> None:
            if work is not None and group.is_main:
                work.layer_done(index, report.to_dict())

        loop = dict(weights=weights, streams=streams, start=first_layer, on_layer_done=layer_done,
                    exclude=config.exclude_patterns, show_progress=config.progress and group.is_main, group=group)
        options_for_solver = {"percdamp": config.percdamp, "blocksize": config.blocksize} if config.method == "sparsegpt" else {}
        captured = hidden = None
        # A resumed run whose layers are all done only reads them back: no calibration pass.
        calibrate = needs_data and first_layer < len(layers)
        if calibrate:
            start = time.perf_counter()
            with devices.explain_out_of_memory("capturing the inputs of the decoder layers"):
                captured = engine.capture_layer_calls(model_obj, layers, calibration, device, show_progress=config.progress)
            seconds["capture"] = time.perf_counter() - start
            hidden = store(captured.hidden)
        if offload_disk:  # embeddings and lm_head are idle until the evaluation: not held meanwhile
            offload.release_outside_layers(model_obj, layers, where)
        if calibrate:
            new_reports = engine.prune_layers(
                layers, captured, method, pattern, device, hidden=hidden,
                true_sequential=config.true_sequential, options=options_for_solver, **loop,
            )
        else:
            new_reports = engine.prune_without_data(layers, method, pattern, device, **loop)
        if hidden is not None:
            hidden.close()  # the last layer's outputs: not needed
        del captured, hidden
        if offload_disk:
            offload.load_outside_layers(model_obj, layers, where)
            devices.move_all_but_layers(model_obj, layers, device)
        earlier = [engine.LayerReport.from_dict(r) for r in work.reports[:first_layer]] if work and group.is_main else []
        result.layers = earlier + new_reports
        for phase in ("statistics", "solve", "propagate"):
            seconds[phase] = sum(layer.seconds.get(phase, 0.0) for layer in new_reports)
        for phase in ("load", "write"):  # moving or reading layers in, writing them out
            seconds[f"layers_{phase}"] = sum(layer.seconds.get(phase, 0.0) for layer in new_reports)

        if offload_disk and streams:
            start = time.perf_counter()
            for stream in streams:
                with engine.replay_final_states(layers, stream.hidden):
                    measured = perplexity.perplexity(
                        model_obj, eval_tokens[stream.name], seqlen=eval_seqlen, source=stream.name,
                        max_tokens=config.max_eval_tokens, add_bos=add_bos, device=device, show_progress=False,
                    )
                (result.dense_ppl if stream.dense else result.pruned_ppl)[stream.name] = measured
            seconds["eval_streamed"] = time.perf_counter() - start
        devices.move_all_but_layers(model_obj, layers, torch.device("cpu"))
        for hidden_states in stores:
            hidden_states.close()
        if eval_tokens and not offload_disk:
            result.pruned_ppl = evaluate("pruned")
        result.seconds = seconds
        result.peak_memory = devices.peak_memory_bytes(device)

        if not group.is_main:
            return result  # rank 0 saves, writes the results and pushes
        if config.save is not None:
            start = time.perf_counter()
            from llmprune.checkpoints.modelcard import base_model_info

            save_checkpoint(model_obj, tokenizer, config.save, result.to_dict(), save_format=config.save_format,
                            base_model=base_model_info(config.model, config.revision), repo_id=config.push_to_hub,
                            overwrite=config.overwrite,
                            layer_files=(prefix, work.read_layer) if offload_disk else None)
            seconds["save"] = time.perf_counter() - start
        if work is not None:
            work.finish()
    finally:
        for hidden_states in stores:
            hidden_states.close()
        if work is not None and group.is_main:
            work.cleanup()
    if config.results is not None:
        result.results_path = write_json_atomic(config.results, result.to_dict())
    if config.push_to_hub is not None:
        hub.push_to_hub(config.save, config.push_to_hub, private=config.private, revision=config.hub_revision,
                        commit_message=config.commit_message)
    return result


def default_results_path(model: str, method: str, pattern: str, sparsity: float | None) -> str:
    """``llmprune-results/<model>-<method>-<pattern>-<UTC time>.json`` (the CLI's default)."""
    name = Path(str(model).rstrip("/")).name.replace(".gguf", "")
    tag = pattern.replace(":", "of") if pattern != "unstructured" else f"unstructured{sparsity}"
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return str(Path("llmprune-results") / f"{name}-{method}-{tag}-{stamp}.json")
