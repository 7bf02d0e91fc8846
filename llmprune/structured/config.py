"""``StructuredConfig``: every option of a structured pruning run, as one frozen dataclass.

The flags of ``python -m llmprune.structured`` are generated from these fields
(``llmprune.cli.structured``) and :func:`llmprune.structured.prune` takes the same keywords, so
the two cannot drift apart. The config is saved inside the checkpoint (``llmprune.json``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from llmprune.evaluation.zeroshot import option_field as zeroshot_field


def _opt(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class StructuredConfig:
    """All options of one structured pruning run. Field docs are the CLI help texts."""

    model: str = _opt(None, "Hub id, local folder, .gguf file, or the built-in alias smollm2-135m", required=True)
    ffn_ratio: float = _opt(0.0, "fraction of FFN intermediate channels removed, the same count in every layer, in [0, 1)")
    head_ratio: float = _opt(
        0.0, "fraction of attention heads removed per layer, in [0, 1); with grouped-query attention whole KV groups "
             "are removed (the ratio must be a multiple of 1/num_key_value_heads)")
    drop_layers: int = _opt(0, "number of whole decoder layers removed (0 <= K < number of layers)")
    criterion: str = _opt("activation", "unit importance: activation (FLAP/Wanda-sp), taylor (LLM-Pruner |w*grad|) "
                                        "or magnitude (weight norms, the baseline)")
    layer_criterion: str = _opt(
        "auto", "layer importance for --drop-layers: auto (block-influence for activation, taylor for taylor, "
                "magnitude for magnitude), block-influence (ShortGPT), angular (K consecutive layers), taylor, magnitude")
    reconstruct: bool = _opt(True, "refit o_proj / down_proj by least squares on the kept channels")
    bias_compensation: bool = _opt(False, "fold the mean lost contribution into the consumer's bias (FLAP); needs a "
                                          "bias or a config field for one (attention_bias / mlp_bias)")
    percdamp: float = _opt(0.01, "dampening of the reconstruction's Hessian, as a fraction of its mean diagonal")
    dataset: str = _opt(
        "c4", "calibration source: wikitext2, c4, ptb, wiki-summaries, or a .txt/.jsonl/.parquet/.pt/.safetensors/.npy file")
    nsamples: int = _opt(128, "number of calibration windows")
    seqlen: int = _opt(2048, "calibration window length in tokens (capped by the model's limit, with a warning)")
    seed: int = _opt(0, "seed for the calibration windows")
    eval: str = _opt("wikitext2", "comma-separated evaluation sources (same kinds as --dataset), or 'none'")
    eval_seqlen: int | None = _opt(None, "evaluation window length (default: --seqlen)")
    max_eval_tokens: int | None = _opt(None, "evaluate at most this many tokens per source (whole windows)")
    dense_eval: bool = _opt(True, "also evaluate the dense model before pruning")
    save: str | None = _opt(None, "write the smaller model (plain Hugging Face safetensors folder) here")
    overwrite: bool = _opt(False, "allow --save into an existing non-empty folder (replaced atomically)")
    results: str | None = _opt(None, "write the results JSON here (CLI default: llmprune-results/<model>-structured-<time>.json)")
    device: str = _opt("auto", "compute device: auto, cpu, cuda, cuda:N")
    dtype: str = _opt("auto", "model dtype: auto, float32, float16, bfloat16")
    trust_remote_code: bool = _opt(False, "allow model code from the Hub (off by default)")
    revision: str | None = _opt(None, "Hub revision (branch, tag or commit) of --model")
    progress: bool = _opt(True, "show progress bars")
    # Zero-shot tasks through lm-eval: the same four fields in every entry point (llmprune.evaluation.zeroshot).
    eval_tasks: str | None = zeroshot_field("eval_tasks")
    eval_tasks_limit: int | None = zeroshot_field("eval_tasks_limit")
    eval_batch_size: int = zeroshot_field("eval_batch_size")
    num_fewshot: int = zeroshot_field("num_fewshot")

    @property
    def eval_sources(self) -> list[str]:
        names = [s.strip() for s in self.eval.split(",") if s.strip()]
        return [] if names in ([], ["none"]) else names

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> StructuredConfig:
        """Read back :meth:`to_dict`; unknown keys raise ValueError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown StructuredConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)
