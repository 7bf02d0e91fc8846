"""File sizes of dense and compressed checkpoints, and a bitwise round-trip check of each.

    python evals/checkpoint_sizes.py [--model smollm2-135m] [--dtypes float16] [--patterns 2:4,0.5,0.7]
                                     [--workdir DIR] [--out FILE]

For each dtype and pattern: prune by magnitude (no calibration data; the bytes depend only
on the pattern, not on which weights survive), save in both formats, load each back with
``llmprune.load`` and compare logits on a fixed input with the in-memory model (bitwise),
then record the sizes. Writes JSON (default ``evals/results/checkpoint_sizes-<UTC date>.json``)
and prints a Markdown table.

``pruned_*_bytes`` count only the pruned matrices (what compression acts on): dense bytes
are ``numel x dtype size``; stored bytes are the packed tensors' bytes in the shards.
``weight_files_bytes`` are the whole ``*.safetensors`` files (embeddings and norms included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOKENS = [[1, 504, 3458, 282, 4250, 314, 260, 1345, 28, 2457, 30, 1553]]


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def run(model: str, dtypes: list[str], patterns: list[str], workdir: Path) -> list[dict]:
    import torch

    import llmprune
    from llmprune.checkpoints.save import save_checkpoint
    from llmprune.checkpoints.modelcard import base_model_info

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
    ids = torch.tensor(TOKENS)
    base = base_model_info(model)
    rows = []
    for dtype in dtypes:
        for pattern in patterns:
            options = dict(pattern=pattern) if ":" in pattern else dict(sparsity=float(pattern))
            start = time.perf_counter()
            result = llmprune.prune(model, method="magnitude", eval="none", dense_eval=False, device="cpu",
                                    progress=False, dtype=dtype, **options)
            prune_s = time.perf_counter() - start
            with torch.no_grad():
                reference = result.model(input_ids=ids).logits
            row = {"dtype": dtype, "pattern": pattern, "sparsity": round(result.sparsity, 6),
                   "prune_seconds": round(prune_s, 1)}
            for save_format in ("dense", "compressed"):
                folder = workdir / f"{dtype}-{pattern.replace(':', 'of')}-{save_format}"
                start = time.perf_counter()
                save_checkpoint(result.model, result.tokenizer, folder, result.to_dict(), save_format=save_format,
                                base_model=base, overwrite=True)
                save_s = time.perf_counter() - start
                start = time.perf_counter()
                loaded = llmprune.load(folder)
                load_s = time.perf_counter() - start
                with torch.no_grad():
                    same = bool(torch.equal(loaded(input_ids=ids).logits, reference))
                del loaded
                sizes = json.loads((folder / "llmprune.json").read_text())["sizes"]
                row[save_format] = {
                    "folder_bytes": _folder_bytes(folder),
                    "weight_files_bytes": sizes["weight_files_bytes"],
                    "pruned_dense_bytes": sizes["pruned_dense_bytes"],
                    "pruned_stored_bytes": sizes["pruned_stored_bytes"],
                    "storage_counts": sizes["storage_counts"],
                    "save_seconds": round(save_s, 1),
                    "load_seconds": round(load_s, 1),
                    "logits_bitwise_equal": same,
                }
            compressed = row["compressed"]
            row["pruned_bytes_ratio"] = round(compressed["pruned_stored_bytes"] / compressed["pruned_dense_bytes"], 4)
            row["weight_files_ratio"] = round(compressed["weight_files_bytes"] / row["dense"]["weight_files_bytes"], 4)
            rows.append(row)
            print(f"{dtype} {pattern}: pruned bytes {row['pruned_bytes_ratio']:.4f}x, files {row['weight_files_ratio']:.4f}x, "
                  f"bitwise {row['dense']['logits_bitwise_equal']}/{compressed['logits_bitwise_equal']}", flush=True)
            del result
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| dtype | pattern | storage | pruned matrices, dense | as stored | ratio | weight files, dense | compressed | ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d, c = r["dense"], r["compressed"]
        storage = ", ".join(f"{n} {s}" for s, n in c["storage_counts"].items() if n)
        lines.append(
            f"| {r['dtype']} | {r['pattern']} | {storage} | {c['pruned_dense_bytes'] / 1e6:.1f} MB | "
            f"{c['pruned_stored_bytes'] / 1e6:.1f} MB | {r['pruned_bytes_ratio']:.3f}x | "
            f"{d['weight_files_bytes'] / 1e6:.1f} MB | {c['weight_files_bytes'] / 1e6:.1f} MB | {r['weight_files_ratio']:.3f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtypes", default="float16", help="comma-separated: float16, bfloat16, float32")
    parser.add_argument("--patterns", default="2:4,0.5,0.7", help="comma-separated N:M patterns or sparsities")
    parser.add_argument("--workdir", default=None, help="keep the checkpoints here (default: a temporary folder)")
    parser.add_argument("--out", default=None, help="JSON output (default: evals/results/checkpoint_sizes-<date>.json)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llmprune-sizes-") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        rows = run(args.model, args.dtypes.split(","), args.patterns.split(","), workdir)
    table = markdown(rows)
    print(table)
    checks = {
        "2:4 fp16 pruned bytes <= 0.57x": [r["pruned_bytes_ratio"] <= 0.57 for r in rows
                                           if r["dtype"] == "float16" and r["pattern"] == "2:4"],
        "70% fp16 pruned bytes <= 0.40x": [r["pruned_bytes_ratio"] <= 0.40 for r in rows
                                           if r["dtype"] == "float16" and r["pattern"] == "0.7"],
        "all round trips bitwise": [r[f]["logits_bitwise_equal"] for r in rows for f in ("dense", "compressed")],
    }
    stamp = time.strftime("%Y-%m-%d", time.gmtime())
    out = Path(args.out or HERE / "results" / f"checkpoint_sizes-{stamp}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "what": "checkpoint sizes, dense vs compressed, and bitwise round trips (magnitude pruning)",
        "command": "python evals/checkpoint_sizes.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k not in ("workdir", "out")),
        "model": args.model,
        "checks": {name: bool(values) and all(values) for name, values in checks.items()},
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": rows,
        "markdown": table,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
