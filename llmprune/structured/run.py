"""``prune(...)``: structured pruning as named stages - check, load, calibrate, plan, rebuild,
evaluate, save.

The keywords are the fields of :class:`llmprune.structured.config.StructuredConfig` (the CLI
flags). Everything the user passed is checked before any calibration work and before anything
is written; the checkpoint folder is written atomically (``llmprune.checkpoints.save``).
The stages are also public pieces (:func:`measure`, :func:`make_plan`, :func:`rebuild`,
:func:`evaluate`) so that a benchmark can measure once and rebuild for many ratios.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmprune.calibration import data
from llmprune.checkpoints.files import check_output_dir, write_json_atomic
from llmprune.errors import UsageError, check_int
from llmprune.evaluation import perplexity
from llmprune.runtime import devices
from llmprune.structured import importance, reconstruct, rewrite
from llmprune.structured.config import StructuredConfig
from llmprune.structured.groups import ModelGroups, find_groups
from llmprune.structured.plan import Counts, Plan, check_ratios, choose, count_units
from llmprune.structured.statistics import Statistics, layer_pass, taylor_pass

logger = logging.getLogger(__name__)


@dataclass
class StructuredResult:
    """What a run produced: ``model`` is the smaller model (CPU), a plain transformers model."""

    config: StructuredConfig
    model: object
    tokenizer: object
    plan: Plan
    counts: Counts
    params: dict[str, int]
    dense_ppl: dict[str, perplexity.PerplexityResult] = field(default_factory=dict)
    pruned_ppl: dict[str, perplexity.PerplexityResult] = field(default_factory=dict)
    # --eval-tasks: llmprune.evaluation.zeroshot.evaluate_tasks' dicts ({} when not measured)
    dense_zeroshot: dict = field(default_factory=dict)
    pruned_zeroshot: dict = field(default_factory=dict)
    reconstruction_error: dict[str, list[float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    seqlen: int = 0
    calibration_sha256: str | None = None
    results_path: Path | None = None

    def to_dict(self) -> dict:
        def ppl(results):
            return {name: r.__dict__ for name, r in results.items()}

        return {
            "recipe": {
                "method": f"structured-{self.config.criterion}",
                "pattern": None,
                "calibration": {"source": self.config.dataset, "nsamples": self.config.nsamples, "seqlen": self.seqlen,
                                "seed": self.config.seed, "token_ids_sha256": self.calibration_sha256},
                "config": self.config.to_dict(),
            },
            "structured": {
                "params": self.params,
                "dropped_layers": list(self.plan.drop),
                "head_groups_removed_per_layer": self.counts.head_groups,
                "ffn_channels_removed_per_layer": self.counts.ffn_channels,
                "kept_heads": {str(i): _indices(m) for i, m in enumerate(self.plan.keep_heads) if m is not None},
                "kept_ffn_channels": {str(i): _indices(m) for i, m in enumerate(self.plan.keep_ffn) if m is not None},
                "reconstruction_relative_error": self.reconstruction_error,
            },
            "results": {"sparsity": 0.0, "dense_ppl": ppl(self.dense_ppl), "pruned_ppl": ppl(self.pruned_ppl),
                        "dense_zeroshot": self.dense_zeroshot, "pruned_zeroshot": self.pruned_zeroshot,
                        "seconds": self.seconds},
            "layers": [],
        }


def _indices(mask: torch.Tensor) -> list[int]:
    return torch.nonzero(mask).flatten().tolist()


def count_parameters(model) -> dict[str, int]:
    """``{"total": ..., "decoder": ...}`` unique parameters (tied ones once); decoder = inside
    the decoder layers."""
    from llmprune.models.architecture import find_decoder_layers

    _, layers = find_decoder_layers(model)
    return {"total": sum(p.numel() for p in model.parameters()), "decoder": sum(p.numel() for p in layers.parameters())}


def prune(
    model: str | None = None,
    *,
    ffn_ratio: float = 0.0,
    head_ratio: float = 0.0,
    drop_layers: int = 0,
    criterion: str = "activation",
    layer_criterion: str = "auto",
    reconstruct: bool = True,
    bias_compensation: bool = False,
    percdamp: float = 0.01,
    dataset: str = "c4",
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    eval: str = "wikitext2",
    eval_seqlen: int | None = None,
    max_eval_tokens: int | None = None,
    dense_eval: bool = True,
    save: str | None = None,
    overwrite: bool = False,
    results: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    revision: str | None = None,
    progress: bool = True,
    eval_tasks: str | None = None,
    eval_tasks_limit: int | None = None,
    eval_batch_size: int = 1,
    num_fewshot: int = 0,
    tokenizer=None,
    loaded_model=None,
) -> StructuredResult:
    """Remove FFN channels, attention heads (whole KV groups) and whole layers; the keywords are
    the CLI flags (``python -m llmprune.structured --help``).

    ``model`` is a Hub id, local folder, ``.gguf`` file or alias; or pass a model already in
    memory as ``loaded_model=`` with ``tokenizer=`` (it is not modified). Returns the smaller
    model in :class:`StructuredResult`; with ``save`` it is also written as a plain Hugging Face
    folder. Raises :class:`llmprune.errors.UsageError` for bad input, before any work.
    """
    options = dict(locals())
    del options["tokenizer"], options["loaded_model"]
    config = StructuredConfig(**options)
    check_config(config)
    if loaded_model is not None and tokenizer is None:
        raise UsageError("prune(loaded_model=...) also needs tokenizer=")
    # Every check that needs the architecture runs on a meta-device copy, before any weight is read.
    skeleton = loaded_model if loaded_model is not None else meta_model(config)
    groups = find_groups(skeleton)
    counts = count_units(groups, config.ffn_ratio, config.head_ratio, config.drop_layers)
    enable_bias = bias_fields_needed(config, skeleton.config, groups, counts)
    rewrite.check_loadable(skeleton, groups, counts, enable_bias)
    del skeleton
    from llmprune.evaluation import zeroshot

    tasks = zeroshot.prepare_tasks(zeroshot.ZeroShotOptions.from_config(config))  # names, lm-eval, network, data
    return _Run(config, counts, enable_bias, tasks).execute(loaded_model, tokenizer)


class _Run:
    """The stages of :func:`prune` after its checks, each timed into ``seconds``."""

    def __init__(self, config: StructuredConfig, counts: Counts, enable_bias: tuple[str, ...], tasks=None):
        self.tasks = tasks  # prepared --eval-tasks (llmprune.evaluation.zeroshot.TaskSet) or None
        self.config, self.counts, self.enable_bias = config, counts, enable_bias
        self.seconds: dict[str, float] = {}
        self.device = devices.resolve_device(config.device)

    def timed(self, name: str, work, *args):
        start = time.perf_counter()
        value = work(*args)
        self.seconds[name] = time.perf_counter() - start
        return value

    def execute(self, loaded_model, tokenizer) -> StructuredResult:
        config = self.config
        original, tokenizer = self.timed("load", self.load, loaded_model, tokenizer)
        self.tokenizer_for_tasks = tokenizer
        groups = find_groups(original)
        self.seqlen, self.eval_seqlen, self.add_bos = window_lengths(original, tokenizer, config)
        calibration, self.eval_tokens = self.timed("data", self.read_data, tokenizer)
        dense_ppl = {}
        if config.dense_eval and self.eval_tokens:
            dense_ppl = self.timed("eval_dense", self.evaluate, original)
        dense_zeroshot = self.timed("eval_tasks_dense", self.evaluate_tasks, original) if config.dense_eval else {}
        stats = self.timed("statistics", measure, original, groups, calibration, config, self.counts, self.device)
        plan = make_plan(original, groups, stats, config, self.counts)
        smaller, errors = self.timed("rebuild", rebuild, original, groups, stats, plan, self.counts, config,
                                     self.enable_bias)
        params = {f"{k}_before": v for k, v in count_parameters(original).items()}
        params.update({f"{k}_after": v for k, v in count_parameters(smaller).items()})
        result = StructuredResult(config, smaller, tokenizer, plan, self.counts, params, dense_ppl=dense_ppl,
                                  reconstruction_error=errors, seconds=self.seconds, seqlen=self.seqlen)
        if calibration is not None:
            result.calibration_sha256 = hashlib.sha256(calibration.numpy().tobytes()).hexdigest()
        result.dense_zeroshot = dense_zeroshot
        if self.eval_tokens:
            result.pruned_ppl = self.timed("eval_pruned", self.evaluate, smaller)
        result.pruned_zeroshot = self.timed("eval_tasks_pruned", self.evaluate_tasks, smaller)
        if config.save is not None:
            save_result(result)
        if config.results is not None:
            result.results_path = write_json_atomic(config.results, result.to_dict())
        return result

    def load(self, loaded_model, tokenizer):
        if loaded_model is None:
            from llmprune.models.loader import load_model

            loaded_model, tokenizer = load_model(self.config.model, dtype=self.config.dtype,
                                                 trust_remote_code=self.config.trust_remote_code,
                                                 revision=self.config.revision)
        return loaded_model.eval(), tokenizer

    def read_data(self, tokenizer):
        config = self.config
        calibration = None
        if needs_data(config, self.counts):
            calibration = data.get_calibration(config.dataset, tokenizer, nsamples=config.nsamples, seqlen=self.seqlen,
                                               seed=config.seed, add_bos=self.add_bos)
        eval_tokens = {s: data.get_eval_tokens(s, tokenizer, seqlen=self.eval_seqlen) for s in config.eval_sources}
        return calibration, eval_tokens

    def evaluate(self, model):
        return evaluate(model, self.eval_tokens, self.config, self.device, self.eval_seqlen, self.add_bos)

    def evaluate_tasks(self, model) -> dict:
        """--eval-tasks on ``model``, moved to the compute device and back; {} without tasks."""
        from llmprune.evaluation import zeroshot

        if self.tasks is None:
            return {}
        model.to(self.device)
        try:
            return zeroshot.evaluate_tasks(model, self.tokenizer_for_tasks, self.tasks, add_bos=self.add_bos or None)
        finally:
            model.to("cpu")


def check_config(config: StructuredConfig) -> None:
    """Cheap checks on every option before anything is loaded."""
    check_ratios(config.ffn_ratio, config.head_ratio, config.drop_layers)
    if config.criterion not in importance.UNIT_CRITERIA:
        raise UsageError(f"--criterion must be one of {', '.join(importance.UNIT_CRITERIA)}, got {config.criterion!r}")
    if config.layer_criterion not in importance.LAYER_CRITERIA:
        raise UsageError(f"--layer-criterion must be one of {', '.join(importance.LAYER_CRITERIA)}, "
                         f"got {config.layer_criterion!r}")
    if not isinstance(config.percdamp, (int, float)) or isinstance(config.percdamp, bool) or not config.percdamp > 0:
        raise UsageError(f"--percdamp must be a positive number, got {config.percdamp!r}")
    for name in ("nsamples", "seqlen", "eval_seqlen", "max_eval_tokens"):
        check_int("--" + name.replace("_", "-"), getattr(config, name), optional=name.startswith(("eval", "max")))
    if config.save is not None:
        check_output_dir(config.save, config.overwrite)
    if config.model is None:
        raise UsageError("--model is required: a Hub id, local folder, .gguf file or alias")
    devices.resolve_device(config.device)
    devices.parse_dtype(config.dtype)
    data.check_disjoint(config.dataset, config.eval_sources)


def meta_model(config: StructuredConfig):
    """The model built from its config on the meta device (no weights read), for the checks."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmprune.models.sources import check_causal, first_line, local_folder

    folder = local_folder(config.model, revision=config.revision)
    try:
        model_config = AutoConfig.from_pretrained(folder, trust_remote_code=config.trust_remote_code)
    except ValueError as error:
        raise UsageError(f"could not read the config of model '{config.model}': {first_line(error)}") from None
    check_causal(model_config, config.model, config.trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config, trust_remote_code=config.trust_remote_code)


def bias_fields_needed(config: StructuredConfig, model_config, groups: ModelGroups, counts: Counts) -> tuple[str, ...]:
    """Config bias fields to switch on for ``--bias-compensation`` (consumers without a bias);
    UsageError where the config has no such field."""
    if not config.bias_compensation:
        return ()
    fields = []
    for kind, count in (("heads", counts.head_groups), ("ffn", counts.ffn_channels)):
        group = (groups.heads if kind == "heads" else groups.ffn)[0]
        if not count or group is None or getattr(group.consumer.module, "bias", None) is not None:
            continue
        name = rewrite.BIAS_FIELDS[kind]
        text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
        if name not in text.to_dict():
            raise UsageError(f"--bias-compensation needs a bias on {group.consumer.name}, and this model's config has no "
                             f"{name} field to add one: run without --bias-compensation")
        fields.append(kind)
    return tuple(fields)


def window_lengths(model, tokenizer, config: StructuredConfig) -> tuple[int, int, bool]:
    """(calibration seqlen, evaluation seqlen, add BOS), capped by the model's limit."""
    from llmprune.models.sources import model_max_length

    seqlen_value = config.seqlen
    limit = model_max_length(model)
    if limit is not None and seqlen_value > limit:
        logger.warning("--seqlen %d exceeds the model's limit of %d positions; using %d", seqlen_value, limit, limit)
        seqlen_value = limit
    return seqlen_value, min(config.eval_seqlen or seqlen_value, limit or 1 << 62), data.needs_bos(tokenizer)


def _layer_criterion(config: StructuredConfig) -> str:
    if config.layer_criterion == "auto":
        return importance.AUTO_LAYER_CRITERION[config.criterion]
    return config.layer_criterion


def _unit_kinds(counts: Counts) -> tuple[str, ...]:
    return tuple(k for k, n in (("heads", counts.head_groups), ("ffn", counts.ffn_channels)) if n)


def needs_data(config: StructuredConfig, counts: Counts) -> bool:
    """True when any statistic needs calibration windows."""
    units = bool(_unit_kinds(counts))
    layer_data = counts.drop_layers and _layer_criterion(config) != "magnitude"
    return bool((units and (config.criterion != "magnitude" or config.reconstruct or config.bias_compensation))
                or layer_data)


def measure(model, groups: ModelGroups, calibration: torch.Tensor | None, config: StructuredConfig,
            counts: Counts | None, device: torch.device, *, kinds: tuple[str, ...] | None = None,
            taylor: bool | None = None) -> Statistics:
    """Every statistic the plan and the rebuild need (``kinds`` / ``taylor`` override what
    ``counts`` and ``config`` ask for, so one measurement can serve many ratios)."""
    kinds = _unit_kinds(counts) if kinds is None else kinds
    if taylor is None:
        taylor = (config.criterion == "taylor" and bool(kinds)) or (counts.drop_layers and _layer_criterion(config) == "taylor")
    stats = Statistics()
    if calibration is None:
        return stats
    stats = layer_pass(model, groups, calibration, device, kinds=kinds, full_hessian=config.reconstruct,
                       show_progress=config.progress)
    if taylor:
        stats.grads = taylor_pass(model, groups, calibration, device, show_progress=config.progress)
    return stats


def _layer_tensors(layer) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in layer.named_parameters()}


def make_plan(model, groups: ModelGroups, stats: Statistics, config: StructuredConfig, counts: Counts) -> Plan:
    """Score every unit and layer with the configured criteria and choose what goes."""
    layer_scores, block_start = None, None
    if counts.drop_layers:
        criterion = _layer_criterion(config)
        if criterion == "angular":
            block_start = importance.angular_block_start(stats.last_states, counts.drop_layers)
        elif criterion == "block-influence":
            layer_scores = [s.block_influence for s in stats.layers]
        elif criterion == "taylor":
            layer_scores = [float(sum((p.float() * g).abs().sum() for name, p in _layer_tensors(layer).items()
                                      for g in [stats.grads[i][name]]))
                            for i, layer in enumerate(groups.layers)]
        else:
            layer_scores = [float(sum(g.consumer.read_weight().float().pow(2).sum() for g in (groups.heads[i], groups.ffn[i])
                                      if g is not None)) for i in range(len(groups.layers))]
    head_scores: list = [None] * len(groups.layers)
    ffn_scores: list = [None] * len(groups.layers)
    for kind, count, scores in (("heads", counts.head_groups, head_scores), ("ffn", counts.ffn_channels, ffn_scores)):
        if not count:
            continue
        for i, group in enumerate(groups.heads if kind == "heads" else groups.ffn):
            tensors = _layer_tensors(groups.layers[i])
            if config.criterion == "magnitude":
                scores[i] = importance.magnitude_scores(group, tensors)
            elif config.criterion == "taylor":
                scores[i] = importance.taylor_scores(group, tensors, stats.grads[i])
            else:
                square_sum = getattr(stats.layers[i], kind).square_sum
                scores[i] = importance.activation_scores(group, group.consumer.read_weight(), square_sum)
    return choose(counts, layer_scores, block_start, head_scores, ffn_scores)


def rebuild(model, groups: ModelGroups, stats: Statistics, plan: Plan, counts: Counts, config: StructuredConfig,
            enable_bias: tuple[str, ...] = ()):
    """``(smaller model, {kind: per-layer relative output error of the consumer})``: the
    consumers refitted (``config.reconstruct``) and bias-compensated (``config.bias_compensation``)."""
    replacements: dict[tuple[int, str], torch.Tensor] = {}
    errors: dict[str, list[float]] = {}
    for kind, masks in (("heads", plan.keep_heads), ("ffn", plan.keep_ffn)):
        for i, keep in enumerate(masks):
            group = (groups.heads if kind == "heads" else groups.ffn)[i]
            if keep is None or group is None or bool(keep.all()):
                continue
            consumer = group.consumer
            weight = consumer.read_weight().float()  # (out, in)
            kept = group.consumer_cut.index(keep)
            consumer_stats = getattr(stats.layers[i], kind) if stats.layers else None
            if config.reconstruct and consumer_stats is not None and consumer_stats.hessian is not None:
                new_weight = reconstruct.refit(weight, consumer_stats.hessian, kept, percdamp=config.percdamp)
            else:
                new_weight = weight[:, kept]
            if consumer_stats is not None and consumer_stats.hessian is not None:
                errors.setdefault(kind, []).append(reconstruct.output_error(weight, new_weight, consumer_stats.hessian, kept))
            dtype = consumer.read_weight().dtype
            stored = new_weight.t() if consumer.transposed else new_weight
            replacements[(i, f"{consumer.name}.weight")] = stored.to(dtype).contiguous()
            if config.bias_compensation:
                bias = getattr(consumer.module, "bias", None)
                new_bias = reconstruct.compensate_bias(weight, new_weight, None if bias is None else bias.detach(),
                                                       consumer_stats.mean, kept)
                replacements[(i, f"{consumer.name}.bias")] = new_bias.to(dtype)
    return rewrite.build(model, groups, plan, counts, replacements, enable_bias), errors


def evaluate(model, eval_tokens: dict[str, torch.Tensor], config: StructuredConfig, device: torch.device,
             eval_seqlen: int, add_bos: bool) -> dict[str, perplexity.PerplexityResult]:
    """Every evaluation of one model (perplexity on each ``--eval`` source, the papers' protocol),
    on ``device`` and back to the CPU. The one place a new kind of evaluation is added."""
    results = {}
    with devices.explain_out_of_memory("evaluating the model"):
        model.to(device)
        try:
            for source, tokens in eval_tokens.items():
                results[source] = perplexity.perplexity(model, tokens, seqlen=eval_seqlen, source=source,
                                                        max_tokens=config.max_eval_tokens, add_bos=add_bos,
                                                        device=device, show_progress=config.progress)
                logger.info("%s perplexity %.3f on %d tokens", source, results[source].ppl, results[source].n_tokens)
        finally:
            model.to("cpu")
    return results


def save_result(result: StructuredResult) -> Path:
    """The smaller model as a plain Hugging Face folder with ``llmprune.json`` and a model card."""
    from llmprune.checkpoints.modelcard import base_model_info
    from llmprune.checkpoints.save import save_checkpoint

    config = result.config
    start = time.perf_counter()
    path = save_checkpoint(result.model, result.tokenizer, config.save, result.to_dict(), save_format="dense", pruned={},
                           base_model=base_model_info(config.model, config.revision), overwrite=config.overwrite)
    result.seconds["save"] = time.perf_counter() - start
    return path


def default_results_path(model: str) -> str:
    """``llmprune-results/<model>-structured-<UTC time>.json`` (the CLI's default)."""
    name = Path(str(model).rstrip("/")).name.replace(".gguf", "")
    return str(Path("llmprune-results") / f"{name}-structured-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json")
