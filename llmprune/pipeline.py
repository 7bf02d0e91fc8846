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

from . import data, devices, engine, hub, perplexity
from .arch import check_pattern_fits, find_decoder_layers
from .checkpoint import check_output_dir, check_save_format, library_versions, save_checkpoint, write_json_atomic
from .config import METHOD_NAMES, PruneConfig
from .errors import UsageError
from .solvers import METHODS
from .spec import Pattern, parse_pattern, pattern_to_dict

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
    """
    from .models import load_model, model_max_length

    config = PruneConfig(model=model, **options)
    pattern = _validate(config)
    device = devices.resolve_device(config.device)
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    if loaded_model is None:
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

    _, layers = find_decoder_layers(model_obj)
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

    result = PruneResult(config, pattern, model_obj, tokenizer, [], seqlen=seqlen)
    if calibration is not None:
        result.calibration_sha256 = hashlib.sha256(calibration.numpy().tobytes()).hexdigest()

    def evaluate(label: str) -> dict[str, perplexity.PerplexityResult]:
        # The whole model moves to the compute device for evaluation and back afterwards.
        start = time.perf_counter()
        with devices.explain_out_of_memory(f"evaluating the {label} model"):
            model_obj.to(device)
            results = _evaluate(model_obj, tokenizer, config.eval_sources, eval_tokens, eval_seqlen, config, device, add_bos)
            model_obj.to("cpu")
        seconds[f"eval_{label}"] = time.perf_counter() - start
        return results

    if config.dense_eval and eval_tokens:
        result.dense_ppl = evaluate("dense")

    options_for_solver = {"percdamp": config.percdamp, "blocksize": config.blocksize} if config.method == "sparsegpt" else {}
    if needs_data:
        start = time.perf_counter()
        devices.move_all_but_layers(model_obj, layers, device)
        with devices.explain_out_of_memory("capturing the inputs of the decoder layers"):
            captured = engine.capture_layer_calls(model_obj, layers, calibration, device, show_progress=config.progress)
        seconds["capture"] = time.perf_counter() - start
        result.layers = engine.prune_layers(
            layers,
            captured,
            method,
            pattern,
            device,
            exclude=config.exclude_patterns,
            true_sequential=config.true_sequential,
            options=options_for_solver,
            show_progress=config.progress,
        )
        del captured
        devices.move_all_but_layers(model_obj, layers, torch.device("cpu"))
    else:
        result.layers = engine.prune_without_data(
            layers, method, pattern, device, exclude=config.exclude_patterns, show_progress=config.progress
        )
    for phase in ("statistics", "solve", "propagate"):
        seconds[phase] = sum(layer.seconds.get(phase, 0.0) for layer in result.layers)

    if eval_tokens:
        result.pruned_ppl = evaluate("pruned")
    result.seconds = seconds
    result.peak_memory = devices.peak_memory_bytes(device)

    if config.save is not None:
        start = time.perf_counter()
        from .modelcard import base_model_info

        save_checkpoint(model_obj, tokenizer, config.save, result.to_dict(), save_format=config.save_format,
                        base_model=base_model_info(config.model, config.revision), repo_id=config.push_to_hub,
                        overwrite=config.overwrite)
        seconds["save"] = time.perf_counter() - start
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
