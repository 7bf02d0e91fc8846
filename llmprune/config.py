"""``PruneConfig``: every option of a pruning run, as one frozen dataclass.

The CLI flags are generated from these fields (``llmprune.cli.oneshot``), so the Python function
``llmprune.prune(...)`` and ``python -m llmprune.<method>`` cannot drift apart. The config
that produced a checkpoint is saved inside it and read back with :meth:`PruneConfig.from_dict`,
which rejects unknown keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from llmprune.evaluation.zeroshot import option_field as zeroshot_field
from llmprune.solvers.dsnot import DSnoTConfig
from llmprune.solvers.exact import ExactConfig
from llmprune.solvers.owl import OwlConfig
from llmprune.solvers.quant import QuantConfig
from llmprune.solvers.ria import RIAConfig


def _opt(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


def _quant_field(name: str):
    """A field of :class:`QuantConfig` (default and help) as a PruneConfig field."""
    return _solver_field(QuantConfig, name)


def _solver_field(config: type, name: str):
    """A field of a solver's config (default and help) as a PruneConfig field."""
    (f,) = [f for f in dataclasses.fields(config) if f.name == name]
    return _opt(f.default, f.metadata["help"])


@dataclass(frozen=True)
class PruneConfig:
    """All options of one pruning run. Field docs are the CLI help texts."""

    model: str = _opt(None, "Hub id, local folder, .gguf file, or the built-in alias smollm2-135m", required=True)
    method: str = _opt("sparsegpt", "pruning method: sparsegpt, wanda or magnitude", cli=False)
    sparsity: float | None = _opt(None, "fraction of weights removed, in [0, 1), for unstructured pruning")
    pattern: str = _opt("unstructured", "'unstructured' or 'N:M' (at most N nonzeros in every M inputs, e.g. 2:4)")
    dataset: str = _opt(
        "c4", "calibration source: wikitext2, c4, ptb, wiki-summaries, or a .txt/.jsonl/.parquet/.pt/.safetensors/.npy file"
    )
    nsamples: int = _opt(128, "number of calibration windows")
    seqlen: int = _opt(2048, "calibration window length in tokens (capped by the model's limit, with a warning)")
    seed: int = _opt(0, "seed for the calibration windows")
    eval: str = _opt("wikitext2", "comma-separated evaluation sources (same kinds as --dataset), or 'none'")
    eval_seqlen: int | None = _opt(None, "evaluation window length (default: --seqlen)")
    max_eval_tokens: int | None = _opt(None, "evaluate at most this many tokens per source (whole windows)")
    dense_eval: bool = _opt(True, "also evaluate the dense model before pruning (perplexity and --eval-tasks)")
    # Zero-shot tasks through lm-eval: the same four fields in every entry point (llmprune.evaluation.zeroshot).
    eval_tasks: str | None = zeroshot_field("eval_tasks")
    eval_tasks_limit: int | None = zeroshot_field("eval_tasks_limit")
    eval_batch_size: int = zeroshot_field("eval_batch_size")
    num_fewshot: int = zeroshot_field("num_fewshot")
    save: str | None = _opt(None, "write the pruned checkpoint (safetensors) to this folder")
    overwrite: bool = _opt(False, "allow --save into an existing non-empty folder (replaced atomically)")
    save_format: str = _opt(
        "dense", "checkpoint format: dense (plain Hugging Face folder, zeros in place) or compressed (2:4 / bitmap packed)"
    )
    push_to_hub: str | None = _opt(None, "after --save, upload the folder to this Hub model repo (owner/name)")
    private: bool = _opt(False, "create the --push-to-hub repo private")
    hub_revision: str | None = _opt(None, "branch of the --push-to-hub repo to commit to (default: main)")
    commit_message: str | None = _opt(None, "commit message for --push-to-hub")
    results: str | None = _opt(None, "write the results JSON here (CLI default: llmprune-results/<model>-<method>-<pattern>-<time>.json)")
    device: str = _opt("auto", "compute device: auto, cpu, cuda, cuda:N")
    offload: str = _opt(
        "cpu",
        "where decoder layers wait while not processed: cpu (whole model in host memory) or disk (model built "
        "on the meta device, each layer read from the safetensors shards only while processed)",
    )
    calib_batch_size: int = _opt(1, "calibration windows per forward call of a decoder layer (same statistics to fp32 "
                                 "rounding); 1 is fastest on this project's CPU (evals/bench_calib_batch.py)")
    offload_activations: str = _opt("device", "where calibration hidden states live: device, cpu or disk (a file in the work folder)")
    work_dir: str | None = _opt(None, "folder for per-layer state (pruned layers, progress); makes the run resumable")
    resume: bool = _opt(False, "continue the run recorded in --work-dir from its first unfinished layer")
    dtype: str = _opt("auto", "model dtype: auto, float32, float16, bfloat16")
    true_sequential: bool = _opt(False, "prune each input group (attention in, o_proj, MLP in, down) after the previous")
    output_errors: bool = _opt(
        False, "report each layer's relative output error against its dense output on the calibration windows "
        "(the statistics pass then runs whole layers and keeps their dense outputs: slower)"
    )
    exclude: str = _opt("", "comma-separated patterns of matrix names inside a layer to leave dense, e.g. 'mlp.gate'")
    # Quantization of the pruned matrices (llmprune.solvers.quant): joint with SparseGPT, GPTQ after the others.
    wbits: int | None = _quant_field("wbits")
    groupsize: int = _quant_field("groupsize")
    sym: bool = _quant_field("sym")
    # Refinements around the method (llmprune.oneshot.refine): mask (score, refine) -> update -> quantize.
    update: str = _opt("none", "weight update on the final mask: none, or exact (kept weights re-fitted to the "
                       "dense layer's outputs: ADMM + conjugate gradients on the Hessian)")
    refine: str = _opt("none", "mask refinement before any update: none, or dsnot (DSnoT prune-and-grow, no weight update)")
    score: str = _opt("default", "mask score: default (the method's own), or ria (RIA's relative importance; wanda only)")
    exact_iters: int = _solver_field(ExactConfig, "exact_iters")
    exact_rho: float = _solver_field(ExactConfig, "exact_rho")
    exact_cg_iters: int = _solver_field(ExactConfig, "exact_cg_iters")
    exact_damp: float = _solver_field(ExactConfig, "exact_damp")
    dsnot_cycles: int = _solver_field(DSnoTConfig, "dsnot_cycles")
    dsnot_threshold: float = _solver_field(DSnoTConfig, "dsnot_threshold")
    dsnot_var_power: float = _solver_field(DSnoTConfig, "dsnot_var_power")
    dsnot_same_sign: bool = _solver_field(DSnoTConfig, "dsnot_same_sign")
    ria_alpha: float = _solver_field(RIAConfig, "ria_alpha")
    ria_per_row: bool = _solver_field(RIAConfig, "ria_per_row")
    permute_channels: bool = _opt(False, "with an N:M pattern, permute the channels feeding down_proj and o_proj "
                                  "(and the rows producing them) so N:M keeps more score; the model computes the same function")
    # Per-layer sparsities (llmprune.solvers.owl): OWL's outlier-weighted ratios, total unchanged.
    layer_ratios: str = _solver_field(OwlConfig, "layer_ratios")
    owl_m: float = _solver_field(OwlConfig, "owl_m")
    owl_lambda: float = _solver_field(OwlConfig, "owl_lambda")
    recipe: str = _opt("none", "a named combination of the options above: none, or best (for each method and pattern "
                       "the combination the committed benchmark measured best; options set explicitly keep their value)")
    trust_remote_code: bool = _opt(False, "allow model code from the Hub (off by default)")
    revision: str | None = _opt(None, "Hub revision (branch, tag or commit) of --model")
    progress: bool = _opt(True, "show progress bars")
    method_config: object = _opt(None, "the method's typed options (SparseGPTConfig, ...); default: its defaults", cli=False)

    def __post_init__(self) -> None:
        from llmprune.oneshot.methods import METHODS

        if self.method_config is None and self.method in METHODS:  # an unknown method is refused by prune()
            object.__setattr__(self, "method_config", METHODS[self.method].config())
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name, value in self.recipe_options.items():  # fills only what was left at its default
            if getattr(self, name) == defaults[name]:
                object.__setattr__(self, name, value)

    @property
    def recipe_options(self) -> dict:
        """What ``--recipe`` sets for this method, pattern and sparsity
        (``llmprune.oneshot.recipes``); UsageError for an unknown recipe or method."""
        from llmprune.oneshot.recipes import recipe_options

        return recipe_options(self.recipe, self.method, self.pattern, self.sparsity)

    @property
    def eval_sources(self) -> list[str]:
        names = [s.strip() for s in self.eval.split(",") if s.strip()]
        return [] if names in ([], ["none"]) else names

    @property
    def quant(self) -> QuantConfig | None:
        """The quantization options, or None without ``--wbits``. UsageError for bad values."""
        quant = QuantConfig(self.wbits, self.groupsize, self.sym)
        return quant if quant.enabled else None

    @property
    def refinements(self):
        """The ``llmprune.oneshot.refine.Refinements`` of ``--update / --refine / --score`` and
        their solvers' options. UsageError for bad values."""
        from llmprune.oneshot.refine import Refinements

        def pick(config: type):
            return config(**{f.name: getattr(self, f.name) for f in dataclasses.fields(config)})

        return Refinements(self.update, self.refine, self.score, pick(ExactConfig), pick(DSnoTConfig), pick(RIAConfig))

    @property
    def owl(self) -> OwlConfig:
        """``--layer-ratios / --owl-m / --owl-lambda``. UsageError for bad values."""
        return OwlConfig(self.layer_ratios, self.owl_m, self.owl_lambda)

    @property
    def exclude_patterns(self) -> tuple[str, ...]:
        return tuple(s.strip() for s in self.exclude.split(",") if s.strip())

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PruneConfig:
        """Read back :meth:`to_dict`; unknown keys (here or in ``method_config``) raise ValueError."""
        from llmprune.oneshot.methods import METHODS

        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown PruneConfig keys {unknown}; known keys: {sorted(known)}")
        data = dict(data)
        options = data.get("method_config")
        if isinstance(options, dict):
            config_cls = METHODS[data.get("method", "sparsegpt")].config
            allowed = {f.name for f in dataclasses.fields(config_cls)}
            if set(options) - allowed:
                raise ValueError(f"unknown {config_cls.__name__} keys {sorted(set(options) - allowed)}; "
                                 f"known keys: {sorted(allowed)}")
            data["method_config"] = config_cls(**options)
        return cls(**data)
