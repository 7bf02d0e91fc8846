"""Pipeline benchmark: wall time per phase (load, data, capture, statistics, solve,
propagate, eval) and peak memory for one pruning run; prints a table and writes JSON.

Real model, real text (CPU here):

    python evals/bench_pipeline.py --model smollm2-135m --method sparsegpt --pattern 2:4 \
        --dataset ptb --eval ptb --nsamples 16 --seqlen 512 --max-eval-tokens 4096

Random-weight Llama-shaped model built from a config (for GPU timing; speed does not depend
on the values), calibrated on random token ids written to a ``.pt`` file:

    python evals/bench_pipeline.py --random-llama 4096,11008,4 --dtype bfloat16 --device cuda \
        --nsamples 128 --seqlen 2048 --eval none
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from llmprune.checkpoints.files import write_json_atomic
from llmprune.checkpoints.save import library_versions
from llmprune.pipeline import prune

PHASES = ("load", "data", "eval_dense", "capture", "statistics", "solve", "propagate", "eval_pruned", "save")


def random_llama(spec: str, dtype: str, vocab: int = 32000):
    """A Llama model with random weights: ``spec`` is ``hidden,intermediate,layers``."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: F401

    hidden, intermediate, layers = (int(v) for v in spec.split(","))
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 128), num_key_value_heads=max(1, hidden // 512),
        max_position_embeddings=4096, tie_word_embeddings=False,
    )
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch_dtype).eval()
    return model


class _IdsOnlyTokenizer:
    """Stand-in tokenizer for random-id runs: no BOS, no text (data comes as token ids)."""

    bos_token_id = None

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __len__(self) -> int:
        return self.vocab_size

    def __call__(self, text, **_):
        raise RuntimeError("random-id benchmark has no text tokenizer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--random-llama", default=None, help="hidden,intermediate,layers of a random-weight Llama")
    parser.add_argument("--method", default="sparsegpt")
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--sparsity", type=float, default=None)
    parser.add_argument("--dataset", default="ptb")
    parser.add_argument("--eval", default="ptb")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-eval-tokens", type=int, default=4096)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--true-sequential", action="store_true")
    parser.add_argument("--out", default="evals/results/bench_pipeline.json")
    args = parser.parse_args()

    options = dict(
        method=args.method, pattern=args.pattern, sparsity=args.sparsity, nsamples=args.nsamples,
        seqlen=args.seqlen, eval=args.eval, max_eval_tokens=args.max_eval_tokens, device=args.device,
        dtype=args.dtype, true_sequential=args.true_sequential, progress=False,
    )
    with tempfile.TemporaryDirectory() as tmp:
        if args.random_llama:
            model = random_llama(args.random_llama, args.dtype)
            ids = torch.randint(0, model.config.vocab_size, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
            token_file = Path(tmp) / "calibration.pt"
            torch.save(ids, token_file)
            result = prune(f"random-llama-{args.random_llama}", loaded_model=model, tokenizer=_IdsOnlyTokenizer(model.config.vocab_size),
                           dataset=str(token_file), **options)
            name = f"random-llama-{args.random_llama}"
        else:
            result = prune(args.model, dataset=args.dataset, **options)
            name = args.model

    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    layers = result.layers
    per_layer = {phase: sum(l.seconds.get(phase, 0.0) for l in layers) / max(1, len(layers))
                 for phase in ("statistics", "solve", "propagate")}
    payload = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads",
        "model": name,
        "options": options,
        "seconds": result.seconds,
        "seconds_per_layer": per_layer,
        "forward_passes_per_layer": [l.forward_passes for l in layers],
        "peak_memory": result.peak_memory,
        "sparsity": result.sparsity,
        "ppl": {k: v.ppl for k, v in result.pruned_ppl.items()},
        "versions": library_versions(),
    }
    print(f"{'phase':12s} seconds")
    for phase in PHASES:
        if phase in result.seconds:
            print(f"{phase:12s} {result.seconds[phase]:8.2f}")
    for key, value in result.peak_memory.items():
        print(f"{key:24s} {value / 2**20:10.1f} MiB")
    write_json_atomic(args.out, payload)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
