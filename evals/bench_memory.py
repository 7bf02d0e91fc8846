"""Peak host memory and time per layer of Wanda and SparseGPT against model depth.

    python evals/bench_memory.py            # full run: 4096/11008, 32 heads, 8 KV heads, 4, 8, 32 layers

writes Llama-shaped checkpoints with random bf16 weights (sharded safetensors, config, a
word-level tokenizer built from PTB train) with 4, 8 and 32 decoder layers, prunes each with
Wanda and with SparseGPT (50 %, 8 PTB windows of 128 tokens, ``--offload disk``, CPU) in a
subprocess, and measures that subprocess's peak RSS and wall time. It prints a markdown
table and writes ``evals/results/bench_memory-<UTC date>.json`` and ``.md``. On 2 CPU cores
the full run takes about an hour. The checkpoints are cached under ``--workdir`` (default
``/tmp/llmprune-bench-memory``) and reused: 12 GB for 32 layers of 4096 hidden, written in
about 3 s per layer; all depths share one file per layer (hard links). Each run's
``--work-dir`` (the pruned layers) is deleted after the run unless ``--keep-work``. A small
smoke run:

    python evals/bench_memory.py --hidden 256 --intermediate 688 --heads 4 --kv-heads 2 \
        --layers 2,4 --nsamples 4 --seqlen 64 --out /tmp/bench_memory-smoke.json

How it measures. Peak RSS is ``ru_maxrss`` of the pruning subprocess from ``os.wait4``. On
Linux a child inherits its parent's high-water mark at ``fork`` (``evals/load_memory.py``
measured it), so this harness imports nothing heavy (no torch) and writes the checkpoints in
a subprocess of its own; ``harness_maxrss_bytes`` is recorded beside each run to show it is
far below the measured peaks. ``import baseline`` is the peak RSS of a process that only
imports torch, transformers (Llama modelling) and ``llmprune.pipeline``: the fixed cost of
the interpreter, included in every peak. Seconds per layer come from the run's results
JSON (``layers[i].seconds``: statistics, solve, propagate and, with disk offload, load and
write); "s/layer" is the sum of a layer's phases. With ``--dataset ptb`` the pruning process
tokenizes PTB train itself, which alone raises its peak by about 0.5 GiB (measured: 0.44 ->
0.99 GiB with the word tokenizer); ``--pretokenized`` calibrates on the same windows read
from a ``.pt`` file written beforehand, so that cost leaves the measurement.

How to read the goals (issue "bounded memory"):

- depth: ``peak(deepest) / peak(shallowest) <= 1.15`` for each method (32 vs 4 layers).
- bound: ``peak < 3 x layer_fp32 + activations``, where ``layer_fp32`` is one decoder layer's
  parameter count x 4 bytes and ``activations`` is nsamples x seqlen x hidden x 2 bytes (bf16)
  counted twice (the layer's inputs and outputs are both held). The peak also contains the
  import baseline and the non-layer weights (embeddings, final norm, lm_head in bf16), which
  the bound does not name; the report prints the comparison with each of them added to the
  bound, and with the baseline subtracted from the peak, each labelled, so a reader can see
  which reading holds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GiB = 2**30
BF16_BYTES = 2
FP32_BYTES = 4
DEPTH_GOAL = 1.15
PHASE_ORDER = ("load", "statistics", "solve", "propagate", "write")
LAYER_TENSORS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")


@dataclass(frozen=True)
class Shape:
    """A Llama shape without its depth: the checkpoints of one benchmark differ only in layers."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def tag(self) -> str:
        return f"h{self.hidden}-i{self.intermediate}-a{self.heads}-kv{self.kv_heads}-v{self.vocab}"

    def layer_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of every tensor of one decoder layer, by name inside the layer (weights are [out, in])."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        return {"self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (kv, h),
                "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, h),
                "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h), "mlp.down_proj.weight": (h, i),
                "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,)}

    def layer_params(self) -> int:
        return sum(_numel(s) for s in self.layer_shapes().values())

    def nonlayer_params(self) -> int:
        return 2 * self.vocab * self.hidden + self.hidden  # embed_tokens, lm_head (untied), final norm


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ------------------------------------------------------------------- checkpoint (child process)

def _store_dir(workdir: Path, shape: Shape) -> Path:
    return workdir / f"store-{shape.tag}"


def _write_shard(path: Path, tensors: dict) -> None:
    """Write one safetensors file atomically: a half-written shard never looks complete."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.partial")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def _random(shape: tuple[int, ...], seed: int):
    """bf16 normal * 0.02 (small enough that 32 random layers keep the forward finite)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.bfloat16).mul_(0.02)


def write_store(workdir: Path, shape: Shape, max_layers: int) -> Path:
    """Fill the shard store for ``shape`` up to ``max_layers`` layers; existing shards are kept.

    One file per decoder layer (``layer-00007.safetensors``, tensors named
    ``model.layers.7.*``), one for the embeddings, one for the final norm and lm_head. Each
    file is generated, written and freed before the next, so at most one layer (plus its
    serialized copy) is in memory. Layer ``i`` has the same seed in every depth, which is why
    the checkpoints of all depths can share these files (hard links).
    """
    import torch

    torch.set_num_threads(1)
    store = _store_dir(workdir, shape)
    store.mkdir(parents=True, exist_ok=True)
    embed = store / "embed.safetensors"
    if not embed.exists():
        _write_shard(embed, {"model.embed_tokens.weight": _random((shape.vocab, shape.hidden), seed=1)})
    head = store / "head.safetensors"
    if not head.exists():
        _write_shard(head, {"model.norm.weight": torch.ones(shape.hidden, dtype=torch.bfloat16),
                            "lm_head.weight": _random((shape.vocab, shape.hidden), seed=2)})
    for index in range(max_layers):
        path = store / f"layer-{index:05d}.safetensors"
        if path.exists():
            continue
        start = time.perf_counter()
        tensors = {}
        for k, (name, tensor_shape) in enumerate(shape.layer_shapes().items()):
            key = f"model.layers.{index}.{name}"
            if name.endswith("layernorm.weight"):
                tensors[key] = torch.ones(tensor_shape, dtype=torch.bfloat16)
            else:
                tensors[key] = _random(tensor_shape, seed=1000 * (index + 1) + k)
        _write_shard(path, tensors)
        del tensors
        print(f"wrote {path.name} in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    tokenizer_dir = store / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").exists():
        _write_tokenizer(tokenizer_dir, shape.vocab)
    return store


def _write_tokenizer(folder: Path, vocab: int) -> None:
    """A word-level tokenizer over PTB train (as tests/conftest.py builds one); no BOS added."""
    from collections import Counter

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from llmprune.calibration.data import load_text

    specials = ["<unk>", "<s>", "</s>"]
    counts = Counter(w for w in load_text("ptb", "train").split() if w not in specials)
    words = [w for w, _ in counts.most_common(vocab - len(specials))]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, folder)


def assemble_checkpoint(workdir: Path, shape: Shape, layers: int) -> Path:
    """A Hugging Face folder with ``layers`` decoder layers, its shards hard-linked from the store."""
    from transformers import LlamaConfig

    store = _store_dir(workdir, shape)
    folder = workdir / f"llama-{shape.tag}-L{layers}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    sources = [store / "embed.safetensors", *(store / f"layer-{i:05d}.safetensors" for i in range(layers)),
               store / "head.safetensors"]
    weight_map, total = {}, 0
    for k, source in enumerate(sources, start=1):
        name = f"model-{k:05d}-of-{len(sources):05d}.safetensors"
        try:
            os.link(source, folder / name)
        except OSError:  # another filesystem: copy
            shutil.copyfile(source, folder / name)
        for key, (dtype, tensor_shape) in _header(source).items():
            weight_map[key] = name
            total += _numel(tuple(tensor_shape)) * {"BF16": 2, "F16": 2, "F32": 4}[dtype]
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, dtype="bfloat16",
    )
    config.save_pretrained(folder)
    for item in (store / "tokenizer").iterdir():
        shutil.copyfile(item, folder / item.name)
    return folder


def _header(path: Path) -> dict[str, tuple[str, list[int]]]:
    """``{tensor name: (dtype, shape)}`` from a safetensors header (8-byte length + JSON)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return {k: (v["dtype"], v["shape"]) for k, v in header.items() if k != "__metadata__"}


def check_checkpoint(folder: Path, shape: Shape, layers: int) -> None:
    """Cheap consistency checks: AutoConfig reads it, every indexed tensor exists with its shape."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", layers, shape.hidden), config
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    expected = {"model.embed_tokens.weight": (shape.vocab, shape.hidden), "model.norm.weight": (shape.hidden,),
                "lm_head.weight": (shape.vocab, shape.hidden)}
    for i in range(layers):
        expected.update({f"model.layers.{i}.{n}": s for n, s in shape.layer_shapes().items()})
    assert set(index["weight_map"]) == set(expected), "index does not list exactly the model's tensors"
    for name in sorted(set(index["weight_map"].values())):
        for key, (dtype, tensor_shape) in _header(folder / name).items():
            assert dtype == "BF16" and tuple(tensor_shape) == expected[key], (name, key, dtype, tensor_shape)
            assert index["weight_map"][key] == name, key


def write_calibration(folder: Path, path: Path, dataset: str, nsamples: int, seqlen: int) -> None:
    """The windows ``--dataset DATASET`` would draw (seed 0), saved as int64 ``[nsamples, seqlen]``."""
    import torch
    from transformers import AutoTokenizer

    from llmprune.calibration.data import get_calibration

    ids = get_calibration(dataset, AutoTokenizer.from_pretrained(folder), nsamples=nsamples, seqlen=seqlen, seed=0)
    tmp = path.with_name(f".{path.name}.partial")
    torch.save(ids.contiguous(), tmp)
    os.replace(tmp, path)


def child_write(spec: dict) -> None:
    workdir, shape, depths = Path(spec["workdir"]), Shape(**spec["shape"]), spec["layers"]
    write_store(workdir, shape, max(depths))
    folders = {}
    for layers in depths:
        folder = assemble_checkpoint(workdir, shape, layers)
        check_checkpoint(folder, shape, layers)
        folders[str(layers)] = str(folder)
    calibration = spec.get("calibration")
    if calibration:
        path = Path(calibration["path"])
        if not path.exists():
            write_calibration(Path(folders[str(depths[0])]), path, calibration["dataset"], calibration["nsamples"],
                              calibration["seqlen"])
    print(json.dumps(folders))


def child_baseline() -> None:
    import torch
    import transformers
    import transformers.models.llama.modeling_llama  # noqa: F401

    import llmprune.pipeline  # noqa: F401

    print(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__,
                      "torch_threads": torch.get_num_threads()}))


# ------------------------------------------------------------------------- measuring (harness)

def _harness_maxrss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def run_measured(cmd: list[str], env: dict, log: Path, timeout: float) -> dict:
    """Run ``cmd`` with stdout+stderr into ``log``; its peak RSS (``os.wait4``), wall time, exit code."""
    harness = _harness_maxrss()
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - start > timeout:
                proc.kill()
            time.sleep(0.1)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    return {"returncode": proc.returncode, "peak_rss_bytes": usage.ru_maxrss * 1024, "wall_s": round(wall, 2),
            "user_s": round(usage.ru_utime, 2), "sys_s": round(usage.ru_stime, 2), "harness_maxrss_bytes": harness,
            "log": str(log)}


def _last_json(path: str) -> dict:
    """The last line of a log that is a JSON object (what a ``--child-*`` process printed)."""
    for line in reversed(Path(path).read_text().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no JSON line in {path}")


def _tail(path: str, lines: int = 15) -> str:
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])


def _cli_flags(env: dict) -> set[str]:
    proc = subprocess.run([sys.executable, "-m", "llmprune.wanda", "--help"], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)
    return {word.rstrip(",") for word in proc.stdout.split() if word.startswith("--")}


def layer_times(results: dict) -> dict:
    """Mean/median seconds per layer (sum of phases) and mean seconds per phase, from a results JSON."""
    layers = results.get("layers", [])
    totals = [sum(layer["seconds"].values()) for layer in layers]
    phases = sorted({p for layer in layers for p in layer["seconds"]},
                    key=lambda p: (PHASE_ORDER.index(p) if p in PHASE_ORDER else len(PHASE_ORDER), p))
    return {
        "layers": len(layers),
        "per_layer_s": [round(t, 3) for t in totals],
        "mean_s": round(statistics.mean(totals), 3) if totals else None,
        "median_s": round(statistics.median(totals), 3) if totals else None,
        "phase_mean_s": {p: round(sum(layer["seconds"].get(p, 0.0) for layer in layers) / len(layers), 3)
                         for p in phases},
    }


def references(shape: Shape, nsamples: int, seqlen: int, compute_bytes: int) -> dict:
    """Reference sizes; ``compute_bytes`` is the element size of the dtype the run computes in
    (``--dtype``): the activations and the non-layer weights are held in it."""
    layer_fp32 = shape.layer_params() * FP32_BYTES
    activations_one = nsamples * seqlen * shape.hidden * compute_bytes
    return {
        "layer_params": shape.layer_params(),
        "layer_fp32_bytes": layer_fp32,
        "layer_bf16_bytes": shape.layer_params() * BF16_BYTES,
        "activations_one_buffer_bytes": activations_one,
        "activations_counted_bytes": 2 * activations_one,
        "activations_note": f"nsamples x seqlen x hidden x {compute_bytes} bytes (the compute dtype), counted "
                            "twice: layer inputs and outputs",
        "nonlayer_bytes": shape.nonlayer_params() * compute_bytes,
        "nonlayer_note": f"embed_tokens + lm_head (untied) + final norm, {compute_bytes} bytes each (the compute dtype)",
        "bound_bytes": 3 * layer_fp32 + 2 * activations_one,
        "bound_note": "3 x layer_fp32 + activations (two buffers)",
        # Not part of the bound, printed to explain a SparseGPT shortfall: down_proj's Hessian is
        # intermediate x intermediate fp32 (and its Cholesky inverse is another one that size).
        "largest_hessian_fp32_bytes": shape.intermediate**2 * FP32_BYTES,
        "model_bf16_bytes_by_layers": {},
    }


def goals(runs: list[dict], refs: dict, baseline: int | None) -> dict:
    """The depth ratio per method and the bound comparisons for each method's deepest run."""
    out = {}
    for method in sorted({r["method"] for r in runs}):
        ok = sorted((r for r in runs if r["method"] == method and r["returncode"] == 0), key=lambda r: r["layers"])
        if not ok:
            continue
        low, high = ok[0], ok[-1]
        peak, bound = high["peak_rss_bytes"], refs["bound_bytes"]
        entry = {
            "depth_ratio": {"deep_layers": high["layers"], "shallow_layers": low["layers"],
                            "ratio": round(peak / low["peak_rss_bytes"], 4), "goal": DEPTH_GOAL,
                            "met": peak / low["peak_rss_bytes"] <= DEPTH_GOAL} if len(ok) > 1 else None,
            "bound": {"layers": high["layers"], "peak_bytes": peak, "bound_bytes": bound,
                      "peak_over_bound": round(peak / bound, 4), "met": peak < bound},
        }
        if baseline:  # the interpreter and libraries are not part of what the pipeline holds
            entry["peak_minus_baseline"] = {"peak_bytes": peak - baseline, "bound_bytes": bound,
                                            "met": peak - baseline < bound}
        out[method] = entry
    return out


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / GiB:.2f}"


def markdown(report: dict) -> str:
    runs, refs, base = report["runs"], report["references"], report["baseline"]
    phases = [p for p in PHASE_ORDER if any(p in r.get("times", {}).get("phase_mean_s", {}) for r in runs)]
    phases += sorted({p for r in runs for p in r.get("times", {}).get("phase_mean_s", {})} - set(phases))
    head = ["method", "layers", "peak RSS (GiB)", "wall (s)", "s/layer mean", "s/layer median",
            *(f"{p} (s)" for p in phases)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        t = r.get("times", {})
        if r.get("stopped_after_layers") is not None and t:
            # Killed for time; the peak and per-layer seconds cover the layers it finished.
            cells = [r["method"], f"{r['layers']} (stopped after {r['stopped_after_layers']})",
                     _gib(r["peak_rss_bytes"]), f"{r['wall_s']:.1f}", f"{t['mean_s']:.2f}", f"{t['median_s']:.2f}",
                     *(f"{t['phase_mean_s'][p]:.2f}" if p in t["phase_mean_s"] else "-" for p in phases)]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        if r["returncode"] != 0:
            lines.append(f"| {r['method']} | {r['layers']} | {_gib(r['peak_rss_bytes'])} | {r['wall_s']:.1f} | "
                         f"failed (exit {r['returncode']}) |" + " |" * (len(head) - 5))
            continue
        cells = [r["method"], str(r["layers"]), _gib(r["peak_rss_bytes"]), f"{r['wall_s']:.1f}",
                 f"{t['mean_s']:.2f}", f"{t['median_s']:.2f}",
                 *(f"{t['phase_mean_s'][p]:.2f}" if p in t["phase_mean_s"] else "-" for p in phases)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "import baseline (torch + transformers + llmprune.pipeline, nothing loaded): "
        f"{_gib(base['peak_rss_bytes'])} GiB; one decoder layer: {refs['layer_params'] / 1e6:.1f} M parameters, "
        f"{_gib(refs['layer_fp32_bytes'])} GiB fp32 ({_gib(refs['layer_bf16_bytes'])} GiB bf16); calibration "
        f"activations {_gib(refs['activations_counted_bytes'])} GiB ({refs['activations_note']}); non-layer weights "
        f"{_gib(refs['nonlayer_bytes'])} GiB ({refs['nonlayer_note']}); "
        f"largest SparseGPT Hessian (intermediate^2 fp32) {_gib(refs['largest_hessian_fp32_bytes'])} GiB; whole model "
        "in bf16: " + ", ".join(f"{_gib(v)} GiB at {n} layers" for n, v in refs["model_bf16_bytes_by_layers"].items())
        + ".",
        "",
        "| method | goal | measured | target | met |",
        "|---|---|---|---|---|",
    ]
    for method, g in report["goals"].items():
        d = g["depth_ratio"]
        if d:
            lines.append(f"| {method} | peak({d['deep_layers']}) / peak({d['shallow_layers']}) | {d['ratio']:.3f} | "
                         f"<= {d['goal']} | {'yes' if d['met'] else 'no'} |")
        rows = [("peak({layers}) < 3 x layer fp32 + activations", g["bound"])]
        if "peak_minus_baseline" in g:
            rows.append(("peak({layers}) - import baseline < same bound", g["peak_minus_baseline"]))
        for label, row in rows:
            lines.append(f"| {method} | {label.format(layers=g['bound']['layers'])} | {_gib(row['peak_bytes'])} GiB | "
                         f"{_gib(row['bound_bytes'])} GiB | {'yes' if row['met'] else 'no'} |")
    lines += ["", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--layers", default="4,8,32", help="comma-separated depths")
    parser.add_argument("--methods", default="wanda,sparsegpt")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--dataset", default="ptb", help="calibration source passed to --dataset")
    parser.add_argument("--pretokenized", action="store_true",
                        help="tokenize --dataset once beforehand and calibrate on the same windows from a .pt file, "
                             "so the measured peak excludes tokenizing the corpus (about 0.5 GiB for PTB train)")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--offload", default="disk", choices=("cpu", "disk"), help="passed to the CLI's --offload")
    parser.add_argument("--offload-activations", default=None, choices=("device", "cpu", "disk"),
                        help="passed to the CLI's --offload-activations (default: the CLI's default)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="passed to the CLI's --dtype: the dtype layers are computed in (the checkpoint stays "
                             "bf16 on disk). Default float32: on the 2-core AMD EPYC (AVX2, no bf16 instructions) "
                             "this was measured on, a bf16 [1024, 4096] x [4096, 11008] matmul ran for minutes "
                             "where fp32 took 1.2 s (75 GFLOP/s)")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS of the pruning runs (default: unset)")
    parser.add_argument("--workdir", default="/tmp/llmprune-bench-memory",
                        help="checkpoint cache, logs, per-run work folders")
    parser.add_argument("--keep-work", action="store_true", help="keep each run's --work-dir (pruned layers)")
    parser.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per pruning run")
    parser.add_argument("--out", default=None, help="JSON output (default: evals/results/bench_memory-<date>.json); "
                                                    "the markdown goes beside it with .md")
    parser.add_argument("--render", default=None, metavar="JSON",
                        help="only recompute the goals and the markdown table of a report written earlier")
    parser.add_argument("--child-write", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-baseline", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_write or args.child_baseline:
        sys.path.insert(0, str(ROOT))  # llmprune from this checkout, as the pruning runs get it
    if args.child_write:
        child_write(json.loads(args.child_write))
        return
    if args.render:
        path = Path(args.render)
        report = json.loads(path.read_text())
        report["goals"] = goals(report["runs"], report["references"], report["baseline"]["peak_rss_bytes"])
        path.write_text(json.dumps(report, indent=2) + "\n")
        path.with_suffix(".md").write_text(markdown(report))
        print(markdown(report))
        return
    if args.child_baseline:
        child_baseline()
        return

    shape = Shape(args.hidden, args.intermediate, args.heads, args.kv_heads, args.vocab)
    if shape.hidden % shape.heads or shape.heads % shape.kv_heads:
        parser.error("--hidden must be a multiple of --heads, and --heads of --kv-heads")
    depths = sorted({int(v) for v in args.layers.split(",")})
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    workdir = Path(args.workdir)
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; skips the Hub probe for ptb
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))

    needed = (max(depths) * shape.layer_params() + shape.nonlayer_params()) * BF16_BYTES
    store = _store_dir(workdir, shape)
    have = sum(f.stat().st_size for f in store.glob("*.safetensors")) if store.exists() else 0
    free = shutil.disk_usage(workdir).free
    if needed - have > free:
        sys.exit(f"error: the checkpoints need {(needed - have) / GiB:.1f} GiB more in {workdir}, "
                 f"only {free / GiB:.1f} GiB free")

    writer_env = dict(env, OMP_NUM_THREADS="1")
    spec = {"workdir": str(workdir), "shape": asdict(shape), "layers": depths}
    dataset = args.dataset
    if args.pretokenized:
        dataset = str(store / f"calibration-{Path(args.dataset).name}-{args.nsamples}x{args.seqlen}.pt")
        spec["calibration"] = {"path": dataset, "dataset": args.dataset, "nsamples": args.nsamples,
                               "seqlen": args.seqlen}
    spec = json.dumps(spec)
    writer = run_measured([sys.executable, __file__, "--child-write", spec], writer_env, workdir / "logs" / "write.log",
                          args.timeout)
    if writer["returncode"] != 0:
        sys.exit(f"error: writing the checkpoints failed:\n{_tail(writer['log'])}")
    folders = {int(k): v for k, v in _last_json(writer["log"]).items()}
    print(f"checkpoints ready in {writer['wall_s']:.1f} s (writer peak RSS {_gib(writer['peak_rss_bytes'])} GiB)",
          flush=True)

    baseline = run_measured([sys.executable, __file__, "--child-baseline"], env, workdir / "logs" / "baseline.log",
                            args.timeout)
    if baseline["returncode"] != 0:
        sys.exit(f"error: the import baseline failed:\n{_tail(baseline['log'])}")
    versions = _last_json(baseline["log"])
    print(f"import baseline peak RSS {_gib(baseline['peak_rss_bytes'])} GiB", flush=True)

    flags = _cli_flags(env)
    extra = []
    for flag, value, default in (("--offload", args.offload, "cpu"),
                                 ("--offload-activations", args.offload_activations, None)):
        if value is None:
            continue
        if flag in flags:
            extra += [flag, value]
        elif value != default:
            sys.exit(f"error: this llmprune has no {flag} flag (needed for {flag} {value})")
        # else: the flag does not exist yet and its value is what the CLI does anyway
    run_env = dict(env, OMP_NUM_THREADS=str(args.threads)) if args.threads else env

    runs = []
    for layers in depths:
        for method in methods:
            tag = f"{method}-L{layers}"
            results_path = workdir / "logs" / f"{tag}.results.json"
            results_path.unlink(missing_ok=True)
            cmd = [sys.executable, "-m", f"llmprune.{method}", "--model", folders[layers],
                   "--sparsity", str(args.sparsity), "--dataset", dataset, "--nsamples", str(args.nsamples),
                   "--seqlen", str(args.seqlen), "--eval", "none", "--no-dense-eval", "--device", "cpu",
                   "--dtype", args.dtype,
                   "--results", str(results_path), "--no-progress", *extra]
            work = workdir / "work" / tag
            if "--work-dir" in flags:
                shutil.rmtree(work, ignore_errors=True)
                cmd += ["--work-dir", str(work)]
            print(f"{tag}: running", flush=True)
            row = {"method": method, "layers": layers, "command": " ".join(cmd),
                   **run_measured(cmd, run_env, workdir / "logs" / f"{tag}.log", args.timeout)}
            if not args.keep_work:
                shutil.rmtree(work, ignore_errors=True)
            if row["returncode"] == 0:
                results = json.loads(results_path.read_text())
                row["cli_host_rss_bytes"] = results["results"]["peak_memory"].get("host_rss_bytes")
                row["cli_seconds"] = results["results"]["seconds"]
                row["sparsity"] = results["results"]["sparsity"]
                row["times"] = layer_times(results)
                print(f"{tag}: peak RSS {_gib(row['peak_rss_bytes'])} GiB, {row['wall_s']:.1f} s, "
                      f"{row['times']['mean_s']:.2f} s/layer", flush=True)
            else:
                row["error_tail"] = _tail(row["log"])
                print(f"{tag}: failed (exit {row['returncode']}):\n{row['error_tail']}", flush=True)
            runs.append(row)

    refs = references(shape, args.nsamples, args.seqlen, {"float32": 4, "bfloat16": 2, "float16": 2}[args.dtype])
    refs["model_bf16_bytes_by_layers"] = {n: (n * shape.layer_params() + shape.nonlayer_params()) * BF16_BYTES
                                          for n in depths}
    stamp = time.strftime("%Y-%m-%d", time.gmtime())
    out = Path(args.out) if args.out else HERE / "results" / f"bench_memory-{stamp}.json"
    report = {
        "what": "peak RSS (os.wait4 ru_maxrss of the pruning subprocess) and seconds per layer against depth",
        "command": "python evals/bench_memory.py " + " ".join(sys.argv[1:]),
        "shape": asdict(shape),
        "options": {"sparsity": args.sparsity, "dataset": args.dataset,
                    "calibration_file": dataset if args.pretokenized else None, "nsamples": args.nsamples,
                    "seqlen": args.seqlen, "dtype": args.dtype, "offload": args.offload, "offload_activations": args.offload_activations,
                    "threads": args.threads, "cli_extra_flags": extra},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    **versions},
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "writer": writer,
        "baseline": baseline,
        "references": refs,
        "runs": runs,
    }
    report["goals"] = goals(runs, refs, baseline["peak_rss_bytes"])
    table = markdown(report)
    print()
    print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(table)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    if any(r["returncode"] != 0 for r in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
