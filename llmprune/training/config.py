"""``FinetuneConfig``: every option of a fine-tuning run, as one frozen dataclass.

The flags of ``python -m llmprune.finetune`` are generated from these fields
(``llmprune.cli.finetune``), and ``llmprune.finetune(...)`` takes the same keywords.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from llmprune.evaluation.zeroshot import option_field as zeroshot_field

SCHEDULES = ("constant", "cubic")


def _opt(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class FinetuneConfig:
    """All options of one fine-tuning run. Field docs are the CLI help texts."""

    model: str = _opt(None, "a pruned checkpoint (dense or compressed format), or any model the one-shot CLI takes",
                      required=True)
    teacher: str | None = _opt(None, "the dense teacher, or 'none' for no distillation (default: the base model "
                                     "recorded in the checkpoint's llmprune.json, else --model itself)")
    dataset: str = _opt("c4", "training text (its train split): wikitext2, c4, ptb, wiki-summaries, a "
                              ".txt/.jsonl/.parquet file, or a pre-tokenized [n, seqlen] .pt/.safetensors/.npy file")
    steps: int = _opt(300, "optimizer steps")
    seqlen: int = _opt(512, "training window length in tokens")
    batch_size: int = _opt(4, "windows per micro-batch")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    lr: float = _opt(1e-4, "peak learning rate (AdamW; linear warmup, then linear decay to 0)")
    warmup: int = _opt(0, "warmup steps")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0: off)")
    seed: int = _opt(0, "seed for the data order and the Trainer")
    method: str = _opt("gmp", "mask-update strategy: gmp (gradual magnitude pruning with --schedule), movement "
                              "(movement pruning, --movement-mode hard or soft, on the cubic schedule flags), rigl "
                              "(drop / grow at --sparsity-to), imp (iterative magnitude pruning with rewinding), l0 "
                              "(hard-concrete gates and a Lagrangian towards --sparsity-to, --l0-structure)")
    schedule: str = _opt("constant", "gmp: constant (keep the loaded mask) or cubic (prune gradually during "
                                     "training); movement always prunes on the cubic schedule")
    sparsity_from: float = _opt(0.0, "cubic: initial sparsity s_i, in [0, 1)")
    sparsity_to: float | None = _opt(None, "cubic and movement: final sparsity s_f, in [0, 1) (default for N:M: "
                                           "1 - N/M); rigl: the sparsity throughout; imp: after the last round")
    prune_every: int = _opt(50, "cubic: steps between mask updates (dt)")
    prune_start: int = _opt(0, "cubic: first mask update step (t0)")
    prune_end: int | None = _opt(None, "cubic: last mask update step (default: the last multiple of --prune-every "
                                       "at or below 3/4 of --steps); l0: the step the gates are fixed (default: 3/4 "
                                       "of --steps)")
    pattern: str | None = _opt(None, "'unstructured' or 'N:M' (cubic: the target; constant: checked against the "
                                     "loaded mask; default: the checkpoint's declared pattern)")
    scope: str = _opt("layer", "unstructured ranking (gmp, imp: magnitude; movement: scores): layer (each matrix) or "
                               "global (all together)")
    imp_rounds: int = _opt(3, "imp: pruning rounds R; the model trains R + 1 times, --steps each (dense first)")
    imp_rate: float | None = _opt(None, "imp: fraction p of the remaining weights pruned after each training, in "
                                        "(0, 1) (default: 1 - (1 - S)^(1/R), so that round R reaches --sparsity-to S)")
    imp_sparsities: str | None = _opt(None, "imp: the sparsity after each round, comma-separated and increasing "
                                            "(e.g. 0.5,0.8,0.9,0.95; replaces --imp-rounds and --imp-rate)")
    rewind: str = _opt("init", "imp: what the surviving weights are rewound to after each pruning: init (the weights "
                               "before training) or step:K (step K of the dense training, 'late rewinding')")
    imp_control: str = _opt("none", "imp: lottery-ticket controls trained once each after the last round, with its "
                                    "per-matrix sparsity: none, or a comma-separated list of reinit (the ticket's masks, "
                                    "a fresh random initialisation, seed --seed + 1) and random-mask (a random mask, "
                                    "the same kept count per matrix, on the rewind state)")
    rigl_alpha: float = _opt(0.3, "rigl: fraction a of each matrix's active weights replaced at step 0, decayed as "
                                  "a (1 + cos(pi t / T_end)) / 2; in (0, 1]")
    rigl_every: int = _opt(100, "rigl: steps between drop / grow updates (dT)")
    rigl_end: int | None = _opt(None, "rigl: the step T_end from which the masks stay fixed (default: 3/4 of --steps)")
    rigl_distribution: str = _opt("uniform", "rigl: per-matrix sparsity: uniform (--sparsity-to everywhere) or erk "
                                             "(Erdos-Renyi-Kernel, the same total)")
    movement_mode: str = _opt("hard", "movement: hard (keep the top-k of the accumulated -W * dL/dW at each cubic "
                                      "update) or soft (learned scores S, the forward pass keeps sigmoid(S) > "
                                      "--movement-tau, penalty --movement-lambda; top-k of S at --sparsity-to at "
                                      "--prune-end)")
    movement_tau: float = _opt(0.1, "soft movement: threshold on sigmoid(S) in the forward pass, in (0, 1)")
    movement_lambda: float = _opt(1.0, "soft movement: final weight of the penalty lambda * mean sigmoid(S), ramped "
                                       "with the cubic schedule (lambda * s_t / s_f)")
    gate_lr: float = _opt(0.01, "l0 and soft movement: Adam learning rate of the gates (log_alpha, scores), their "
                                "own optimizer, no weight decay")
    l0_structure: str = _opt("weight", "l0: weight (a gate per weight of every masked matrix) or a comma list of "
                                       "heads, ffn, layers (a gate per KV group, FFN channel, decoder layer; the saved "
                                       "model is smaller and dense)")
    l0_warmup: int | None = _opt(None, "l0: steps over which the Lagrangian's target ramps linearly from 0 to "
                                       "--sparsity-to (default: half the steps until the gates are fixed)")
    l0_lambda_lr: float = _opt(0.01, "l0: Adam learning rate of the Lagrange multipliers (gradient ascent)")
    l0_beta: float = _opt(2.0 / 3.0, "l0: hard-concrete temperature beta")
    l0_init: float = _opt(3.0, "l0: initial log_alpha of every gate (3: P(gate != 0) = 0.99, test-time gate 1)")
    distill_weight: float = _opt(0.5, "weight a of KL(teacher || student): loss = (1 - a) LM + a KL "
                                      "(1 = distillation only, 0 = plain LM loss)")
    distill_temp: float = _opt(1.0, "distillation temperature T (the KL is scaled by T^2)")
    distill_hidden: float = _opt(0.0, "weight of the hidden-state MSE term (all layers; 0: off)")
    eval: str = _opt("wikitext2", "comma-separated evaluation sources (test splits), or 'none'")
    eval_seqlen: int | None = _opt(None, "evaluation window length (default: --seqlen)")
    max_eval_tokens: int | None = _opt(None, "evaluate at most this many tokens per source (whole windows)")
    eval_before: bool = _opt(True, "also evaluate the model before fine-tuning")
    # Zero-shot tasks through lm-eval: the same four fields in every entry point (llmprune.evaluation.zeroshot).
    eval_tasks: str | None = zeroshot_field("eval_tasks")
    eval_tasks_limit: int | None = zeroshot_field("eval_tasks_limit")
    eval_batch_size: int = zeroshot_field("eval_batch_size")
    num_fewshot: int = zeroshot_field("num_fewshot")
    save: str | None = _opt(None, "write the fine-tuned checkpoint to this folder")
    overwrite: bool = _opt(False, "allow --save into an existing non-empty folder (replaced atomically)")
    save_format: str = _opt("dense", "checkpoint format: dense (plain Hugging Face folder) or compressed")
    results: str | None = _opt(None, "write the results JSON (recipe, perplexities, loss curve) here")
    device: str = _opt("auto", "compute device: auto, cpu, cuda")
    teacher_device: str | None = _opt(None, "device of the teacher (default: --device)")
    dtype: str = _opt("auto", "weights dtype: auto (fp32; bf16 autocast on CUDA), float32, bfloat16, float16")
    gradient_checkpointing: bool = _opt(False, "recompute activations in backward (less memory, ~30 % slower)")
    work_dir: str | None = _opt(None, "folder for resumable training state (model, optimizer, scheduler, RNG, "
                                      "masks, step)")
    resume: bool = _opt(False, "continue the run recorded in --work-dir from its last saved step")
    save_every: int | None = _opt(None, "with --work-dir: save the training state every this many steps "
                                        "(default: steps / 10, at least 1)")
    trust_remote_code: bool = _opt(False, "allow model code from the Hub (off by default)")
    progress: bool = _opt(True, "show progress bars")

    @property
    def eval_sources(self) -> list[str]:
        names = [s.strip() for s in self.eval.split(",") if s.strip()]
        return [] if names in ([], ["none"]) else names

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Options that do not change the trained weights: a resumed run may differ in them.
NOT_RECIPE = ("eval", "eval_seqlen", "max_eval_tokens", "eval_before", "eval_tasks", "eval_tasks_limit",
              "eval_batch_size", "num_fewshot", "save", "overwrite", "save_format",
              "results", "work_dir", "resume", "save_every", "progress", "teacher_device", "device")
