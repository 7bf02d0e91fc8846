"""End-to-end speed of a sparsified decoder LM: prefill latency and decode tokens/s.

The model is built from a config with random weights (speed does not depend on the values;
the sparsity pattern is imposed by magnitude on them), by default Llama-7B-shaped layers
(hidden 4096, intermediate 11008, 32 heads) but only ``--layers`` of them, in bf16 on CUDA.
Variants: every decoder Linear as

    dense             nn.Linear (cuBLAS)
    sparse24_triton   SparseLinear 2:4 (llmprune Triton kernel)
    semi_structured   nn.Linear with a torch.sparse.to_sparse_semi_structured weight (CUDA only)
    bitmap50_triton   SparseLinear bitmap, 50 % unstructured
    bitmap70_triton   SparseLinear bitmap, 70 % unstructured

Embeddings and lm_head stay dense in every variant. Measured per variant:

* ``logits_rel_err``: the converted model against the same pruned weights run dense (fp32 math
  is not involved: both in the model dtype), on one short input;
* prefill: ``model(ids[1, P], use_cache=False, logits_to_keep=1)``, median over runs;
* decode, eager: greedy steps of 1 token against a StaticCache after a ``--context`` prompt,
  one Python forward per token (includes the Python/launch overhead of HF's eager model, which
  at a few layers dominates and hides kernel speed);
* decode, CUDA graph: the same step captured once and replayed (no Python per token), and
  whether it produced the same tokens as the eager loop. Capture can fail on a transformers
  version whose decode step is not graph-safe: the reason is recorded.

    python evals/bench_e2e.py --out evals/results/h200
    python evals/bench_e2e.py --quick --out /tmp/e2e        # CPU dry run (Triton interpreter)
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import (  # noqa: E402 - same folder; shared environment, masks and timing
    CPU_MODE,
    DTYPES,
    env_info,
    fast_autotune,
    mask_24,
    mask_unstructured,
    setup_interpreter_if_no_cuda,
    time_fn,
)

VARIANTS = ("dense", "sparse24_triton", "semi_structured", "bitmap50_triton", "bitmap70_triton")
FULL = dict(hidden=4096, intermediate=11008, heads=32, kv_heads=32, layers=4, vocab=32000,
            prefill="256,2048", context=256, decode_tokens=64, dtype="bf16")
QUICK = dict(hidden=64, intermediate=176, heads=4, kv_heads=2, layers=2, vocab=256,
             prefill="24", context=8, decode_tokens=3, dtype="fp32")


def build_model(args: argparse.Namespace, dtype: torch.dtype, device: torch.device, seed: int) -> nn.Module:
    """Random-weight LlamaForCausalLM on `device` (weights ~ N(0, 0.02), norms at 1)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
        max_position_embeddings=max(4096, args.context + args.decode_tokens + 64), tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    with torch.no_grad():  # whatever the init did (or skipped): random, never empty/zero, weights
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, 0.02)
    return model.to(dtype).eval()


def decoder_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(f"model.layers.{name}", m) for name, m in model.model.layers.named_modules() if isinstance(m, nn.Linear)]


def impose_pattern_(model: nn.Module, variant: str) -> None:
    """Prune every decoder Linear in place to the variant's pattern (by magnitude)."""
    if variant == "dense":
        return
    with torch.no_grad():
        for _, lin in decoder_linears(model):
            w = lin.weight.data.float()
            if variant in ("sparse24_triton", "semi_structured"):
                mask = mask_24(w)
            else:
                mask = mask_unstructured(w, 0.5 if variant.startswith("bitmap50") else 0.7)
            lin.weight.data.mul_(mask.to(lin.weight.dtype))


def convert_(model: nn.Module, variant: str) -> dict:
    """Swap the decoder Linears for the variant's implementation; returns counts and weight bytes."""
    from llmprune.kernels.linear import SparseLinear, sparsify_model

    linears = decoder_linears(model)
    dense_bytes = sum(m.weight.nbytes for _, m in linears)
    if variant == "dense":
        return {"converted": 0, "decoder_linear_bytes": dense_bytes, "dense_bytes": dense_bytes}
    if variant == "semi_structured":
        if not next(model.parameters()).is_cuda:
            return {"skip": "PyTorch semi-structured sparsity runs on CUDA only"}
        from torch.sparse import to_sparse_semi_structured

        nbytes = 0
        try:
            for _, lin in linears:
                ws = to_sparse_semi_structured(lin.weight.data)
                lin.weight = nn.Parameter(ws, requires_grad=False)
                parts = (getattr(ws, "packed", None), getattr(ws, "meta", None))
                nbytes += sum(t.nbytes for t in parts if t is not None)
        except Exception as exc:  # noqa: BLE001 - unsupported here: record why
            return {"skip": f"not supported here: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
        return {"converted": len(linears), "decoder_linear_bytes": nbytes, "dense_bytes": dense_bytes}
    if variant == "sparse24_triton":
        report = sparsify_model(model, formats=("2:4",), backend="triton")
    else:
        sparsity = 0.5 if variant.startswith("bitmap50") else 0.7
        report = sparsify_model(model, formats=("bitmap",), min_bitmap_sparsity=sparsity - 0.05, backend="triton")
    converted = [name for name, fmt in report.items() if fmt in ("2:4", "bitmap")]
    if len(converted) != len(linears):
        skipped = {k: v for k, v in report.items() if k not in converted and k != "lm_head"}
        raise RuntimeError(f"{variant}: only {len(converted)} of {len(linears)} decoder Linears converted: {skipped}")
    nbytes = sum(m.packed.nbytes() for m in model.modules() if isinstance(m, SparseLinear))
    return {"converted": len(converted), "decoder_linear_bytes": nbytes, "dense_bytes": dense_bytes}


class Decoder:
    """Greedy decode steps against a StaticCache, eager or replayed from a CUDA graph.

    Works across transformers versions: the cache goes in as ``cache=`` (5.2x) or
    ``past_key_values=`` (older); positions are passed explicitly (``position_ids`` and, where
    the forward takes it, ``cache_position``) as device tensors updated in place, so a captured
    step reads the current position instead of a Python int.
    """

    def __init__(self, model: nn.Module, max_len: int, batch: int = 1):
        from transformers import StaticCache

        self.model = model
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.has_cache_position = "cache_position" in params
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        device = next(model.parameters()).device
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.graph = None
        self.graph_next = None

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        kw = {self.cache_kw: self.cache, "use_cache": True, "logits_to_keep": 1, "position_ids": pos[None]}
        if self.has_cache_position:
            kw["cache_position"] = pos
        return self.model(input_ids=ids, **kw).logits[:, -1]  # [B, vocab]

    def prefill(self, prompt: torch.Tensor) -> None:
        """Reset the cache, run the prompt, leave its greedy next token in self.ids."""
        self.cache.reset()
        n = prompt.shape[1]
        logits = self._forward(prompt, torch.arange(n, device=prompt.device))
        self.ids.copy_(logits.argmax(-1, keepdim=True))
        self.pos.fill_(n)

    def step(self) -> None:
        self.ids.copy_(self._forward(self.ids, self.pos).argmax(-1, keepdim=True))
        self.pos.add_(1)

    def capture(self, warmup_steps: int = 2) -> None:
        """Warm up on a side stream (autotuning, lazy allocations), then capture one step."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup_steps):
                self.step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.graph_next = self._forward(self.ids, self.pos).argmax(-1, keepdim=True)

    def replay(self) -> None:
        self.graph.replay()
        self.ids.copy_(self.graph_next)
        self.pos.add_(1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def decode_tokens_per_s(dec: Decoder, prompt: torch.Tensor, n_tokens: int, graph: bool) -> tuple[float, list[int]]:
    """Prefill, then time n_tokens greedy steps; returns (tokens/s, generated token ids)."""
    device = prompt.device
    dec.prefill(prompt)
    tokens = []
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n_tokens):
        dec.replay() if graph else dec.step()
        tokens.append(dec.ids.clone())  # device-side copy: no sync inside the timed loop
    _sync(device)
    elapsed = time.perf_counter() - t0
    return n_tokens / elapsed, [int(t[0, 0]) for t in tokens]


def run_variant(args, variant: str, dtype: torch.dtype, device: torch.device, meta: dict) -> dict:
    row: dict = {"variant": variant, "dtype": args.dtype}
    t0 = time.perf_counter()
    model = build_model(args, dtype, device, seed=args.seed)
    impose_pattern_(model, variant)
    g = torch.Generator().manual_seed(args.seed)
    probe = torch.randint(0, args.vocab, (1, 8 if args.quick else 32), generator=g).to(device)
    with torch.inference_mode():
        ref = model(probe, use_cache=False).logits.float()  # the pruned weights, run dense
    conv = convert_(model, variant)
    if "skip" in conv:
        return {**row, "status": f"unsupported: {conv['skip']}"}
    row.update(conv)
    row["lm_head_bytes"] = model.lm_head.weight.nbytes  # read once per decode step, like the decoder weights
    row["build_s"] = time.perf_counter() - t0
    with torch.inference_mode():
        out = model(probe, use_cache=False).logits.float()
        row["logits_rel_err"] = float((out - ref).norm() / ref.norm())
        row["first_forward_s"] = time.perf_counter() - t0 - row["build_s"]
        for p in (int(v) for v in args.prefill.split(",")):
            ids = torch.randint(0, args.vocab, (1, p), generator=g).to(device)
            fn = lambda ids=ids: model(ids, use_cache=False, logits_to_keep=1)  # noqa: E731
            if device.type == "cuda":
                fn()  # compile / autotune outside the timing
            t = time_fn(fn, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, min_reps=args.min_reps, cpu_reps=1)
            row[f"prefill_{p}_ms"] = t["median_ms"]
            row[f"prefill_{p}_p20_ms"], row[f"prefill_{p}_p80_ms"] = t["p20_ms"], t["p80_ms"]
            row[f"prefill_{p}_tokens_per_s"] = p / (t["median_ms"] * 1e-3)
        prompt = torch.randint(0, args.vocab, (1, args.context), generator=g).to(device)
        dec = Decoder(model, max_len=args.context + args.decode_tokens + 8)
        decode_tokens_per_s(dec, prompt, 1, graph=False)  # warm: autotune M=1, cache allocation
        tps, eager_tokens = decode_tokens_per_s(dec, prompt, args.decode_tokens, graph=False)
        row["decode_eager_tokens_per_s"] = tps
        row["decode_eager_ms_per_token"] = 1e3 / tps
        if device.type != "cuda":
            row["decode_graph"] = "skipped: no CUDA"
        else:
            try:
                dec.prefill(prompt)
                dec.capture()
                tps_g, graph_tokens = decode_tokens_per_s(dec, prompt, args.decode_tokens, graph=True)
                row["decode_graph_tokens_per_s"] = tps_g
                row["decode_graph_ms_per_token"] = 1e3 / tps_g
                row["decode_graph_same_tokens"] = graph_tokens == eager_tokens
                row["decode_graph"] = "ok"
            except Exception as exc:  # noqa: BLE001 - graph capture is optional: record why it failed
                row["decode_graph"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                torch.cuda.synchronize()
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}[dtype]
    err = row["logits_rel_err"]
    row["status"] = "ok" if err < tol else f"logits differ: rel err {err:.2e} >= {tol}"
    row["total_s"] = time.perf_counter() - t0
    del model, dec
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny config (CPU dry run with the Triton interpreter)")
    for key, value in FULL.items():
        ap.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=None,
                        help=f"default {value} (quick: {QUICK[key]})")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default=None, help="folder for e2e.json")
    ap.add_argument("--warmup-ms", type=float, default=10.0)
    ap.add_argument("--rep-ms", type=float, default=50.0)
    ap.add_argument("--min-reps", type=int, default=5)
    ap.add_argument("--autotune-ms", default="5,20", help="warm-up,rep ms per autotune config ('' keeps Triton's)")
    ap.add_argument("--budget-s", type=float, default=0.0, help="skip variants not started after this (0: no limit)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    variants = args.variants.split(",")
    if set(variants) - set(VARIANTS) or args.dtype not in DTYPES:
        ap.error(f"unknown variant or dtype: {args.variants} {args.dtype}")

    setup_interpreter_if_no_cuda()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    meta = env_info()
    meta["args"] = vars(args)
    if device.type == "cuda" and args.autotune_ms:
        wu, rep = (float(v) for v in args.autotune_ms.split(","))
        meta["autotune_do_bench"] = {"warmup_ms": wu, "rep_ms": rep, "kernels": fast_autotune(wu, rep)}
    if device.type != "cuda":
        meta["notes"] = [f"No CUDA: Triton kernels ran in the interpreter; timings are {CPU_MODE}."]
        if dtype == torch.bfloat16:
            ap.error("bf16 under the Triton interpreter computes wrong dots (triton#11584): use --dtype fp32/fp16")
    print(f"[bench_e2e] {meta['mode']}: gpu={meta['gpu']} layers={args.layers} hidden={args.hidden} "
          f"intermediate={args.intermediate} {args.dtype}", flush=True)

    out_dir = Path(args.out) if args.out else None
    results = []
    t_start = time.perf_counter()
    for variant in variants:
        if args.budget_s and time.perf_counter() - t_start > args.budget_s:
            results.append({"variant": variant, "status": "skipped: time budget"})
            continue
        try:
            row = run_variant(args, variant, dtype, device, meta)
        except Exception as exc:  # noqa: BLE001 - record, keep going with the next variant
            row = {"variant": variant, "status": f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
            if device.type == "cuda":
                torch.cuda.empty_cache()
        results.append(row)
        print("  " + _summary(row, args), flush=True)
        if out_dir is not None:
            _write(out_dir, meta, results)
    dense = next((r for r in results if r["variant"] == "dense" and r.get("status") == "ok"), None)
    if dense is not None:
        for r in results:
            for key in [k for k in r if k.endswith("_tokens_per_s")]:
                if key in dense and r.get(key):
                    r[key.replace("_tokens_per_s", "_speedup_vs_dense")] = r[key] / dense[key]
    meta["elapsed_s"] = time.perf_counter() - t_start
    if out_dir is not None:
        _write(out_dir, meta, results)
        print(f"[bench_e2e] wrote {out_dir}/e2e.json", flush=True)
    print(f"[bench_e2e] {sum(r.get('status') == 'ok' for r in results)}/{len(results)} variants ok "
          f"in {meta['elapsed_s']:.0f} s", flush=True)
    if any(r.get("status", "").startswith(("error", "logits differ")) for r in results):
        sys.exit(1)


def _summary(row: dict, args) -> str:
    if row.get("status") != "ok":
        return f"{row['variant']:<16} {row.get('status')}"
    pre = " ".join(f"prefill{p}={row[f'prefill_{p}_ms']:.2f}ms" for p in args.prefill.split(","))
    graph = (f"graph {row['decode_graph_tokens_per_s']:.1f} tok/s (same tokens: {row['decode_graph_same_tokens']})"
             if row.get("decode_graph") == "ok" else f"graph {row.get('decode_graph')}")
    return (f"{row['variant']:<16} {pre} decode eager {row['decode_eager_tokens_per_s']:.1f} tok/s, {graph}; "
            f"weights {row['decoder_linear_bytes'] / 2**20:.1f} MiB; logits err {row['logits_rel_err']:.1e}")


def _write(out_dir: Path, meta: dict, results: list[dict]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "e2e.json.tmp"
    tmp.write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
    tmp.replace(out_dir / "e2e.json")


if __name__ == "__main__":
    main()
