"""Training-time sparsity lab, language model: a small Llama trained from scratch on PTB
(word level), every method of ``llmprune.finetune`` at several sparsities, under one protocol.

Protocol (all defaults are flags):

* model: a Llama built from a config (``--hidden 256 --layers 4 --heads 4``, FFN 2.75x hidden
  rounded to 32, tied embeddings) over a word-level tokenizer of PTB train's 10,000 words
  (Mikolov's ``ptb.train.txt`` from the offline ``treebank`` package; ``<unk>`` as in the file);
  one random initialisation per seed, saved as an ordinary Hugging Face folder;
* training: ``llmprune.finetune`` (the fine-tuning CLI's function, no teacher), PTB train in
  windows of ``--seqlen 64`` tokens, ``--batch-size 16``, AdamW at ``--lr 3e-3`` with
  ``--warmup 40`` steps then linear decay, ``--steps`` optimizer steps per training; every run
  sees the same data order (seed 0) and the same budget of ``--steps``, except IMP, which trains
  once more per round (its cost is reported);
* evaluation: perplexity on PTB test (windows of ``--seqlen`` tokens, all of it by default).

Methods (each a row; ``oneshot`` prunes the trained dense model by magnitude with
``llmprune.prune`` and does not train again):
``dense, oneshot, gmp, imp-init, imp-late, movement, rigl`` (and, where built: ``movement-soft``,
``l0``, ``ticket-reinit``, ``ticket-random``).

One IMP run gives every sparsity: its rounds prune to ``--sparsities`` in turn
(``--imp-sparsities``), each round's checkpoint is one row.

    python evals/lab_lm.py --out evals/results/lab_lm-<date>.json       # the README's table
    python evals/lab_lm.py --report-only --out evals/results/lab_lm-<date>.json

Results are written after every run; ``--append`` keeps what a stopped run measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from llmprune.checkpoints.files import write_json_atomic


def ptb_vocabulary() -> list[str]:
    """PTB train's words, most frequent first (ties: first occurrence), ``<unk>`` included."""
    from collections import Counter

    from llmprune.calibration.data import load_text

    counts = Counter(load_text("ptb", "train").split())
    return [word for word, _ in counts.most_common()]


def word_tokenizer(folder: Path):
    """A ``PreTrainedTokenizerFast`` splitting on whitespace over PTB train's words; words not
    in it (none in PTB test) map to ``<unk>``. EOS (for ``generate``) is an extra token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ptb_vocabulary()
    vocab = {word: i for i, word in enumerate(words)}
    vocab["<eos>"] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>",
                                        pad_token="<eos>")
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_model(folder: Path, args, seed: int) -> Path:
    """The randomly initialised model (seed ``seed``) and its tokenizer, saved to ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = word_tokenizer(folder)
    ffn = int(round(args.hidden * 2.75 / 32)) * 32
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=ffn,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=max(256, args.seqlen),
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def common(args) -> dict:
    """``llmprune.finetune`` keywords shared by every training."""
    return {"teacher": "none", "dataset": "ptb", "steps": args.steps, "seqlen": args.seqlen,
            "batch_size": args.batch_size, "lr": args.lr, "warmup": args.warmup, "seed": 0,
            "eval": "ptb", "max_eval_tokens": args.eval_tokens, "eval_before": False, "progress": False,
            "device": "cpu"}


def ppl_of(results: dict) -> float:
    return results["ptb"].ppl if hasattr(results["ptb"], "ppl") else results["ptb"]["ppl"]


def save_masked(model, tokenizer, masks, folder: Path, note: str) -> Path:
    """``model`` with ``masks`` applied, saved as an llmprune checkpoint whose ``llmprune.json``
    declares the masked weights pruned: ``llmprune.finetune`` then keeps exactly these masks
    (``--schedule constant``)."""
    from llmprune.checkpoints.save import save_checkpoint
    from llmprune.patterns import Unstructured, pattern_to_dict

    with torch.no_grad():
        for name, (param, _) in masks.weights.items():
            param.mul_(masks.masks[name])
    sparsity = masks.sparsity()
    pattern = pattern_to_dict(Unstructured(round(sparsity, 6)))
    metadata = {"recipe": {"method": note, "pattern": pattern},
                "results": {"sparsity": sparsity}, "layers": masks.report()}
    save_checkpoint(model, tokenizer, str(folder), metadata, save_format="dense",
                    pruned={name: pattern for name in masks.masks},
                    base_model={"source": "lab", "online": False}, overwrite=True)
    return folder


class Lab:
    """The runs of one seed; each ``row`` is written to ``--out`` when it is measured."""

    def __init__(self, args, seed: int, result: dict):
        self.args, self.seed, self.result = args, seed, result
        self.work = args.work / f"seed{seed}"
        self.init = build_model(self.work / "init", args, seed)

    def done(self, method: str, sparsity: float) -> bool:
        return any(r["method"] == method and r["sparsity_target"] == sparsity and r["seed"] == self.seed
                   for r in self.result["rows"])

    def add(self, method: str, sparsity: float, measured: float, ppl: float, seconds: float, trainings: int,
            **extra) -> None:
        row = {"method": method, "seed": self.seed, "sparsity_target": sparsity, "sparsity": measured, "ppl": ppl,
               "train_seconds": seconds, "trainings": trainings,
               "train_tokens": trainings * self.args.steps * self.args.batch_size * self.args.seqlen, **extra}
        self.result["rows"].append(row)
        write_json_atomic(self.args.out, self.result)
        print(f"seed {self.seed} {method:14s} {sparsity:.2f}: sparsity {measured:.4f} ppl {ppl:8.2f} "
              f"({seconds:.0f} s)", flush=True)

    def finetune(self, model: Path, **options):
        import llmprune

        start = time.perf_counter()
        result = llmprune.finetune(model=str(model), **{**common(self.args), **options})
        return result, time.perf_counter() - start

    # -- methods
    def dense(self) -> Path:
        """The dense model trained once (reused if ``--work`` has it, e.g. from another process)."""
        folder = self.work / "dense"
        if not (folder / "config.json").is_file():
            result, seconds = self.finetune(self.init, method="gmp", schedule="constant", save=str(folder),
                                            overwrite=True)
            self.add("dense", 0.0, 0.0, ppl_of(result.after_ppl), seconds, 1)
        return folder

    def dense_long(self) -> None:
        """The dense model trained as long as one IMP run in total (``steps x (rounds + 1)``):
        the compute-matched reference for the tickets."""
        trainings = len(self.args.sparsities) + 1
        result, seconds = self.finetune(self.init, method="gmp", schedule="constant",
                                        steps=self.args.steps * trainings)
        self.add("dense-long", 0.0, 0.0, ppl_of(result.after_ppl), seconds, trainings)

    def oneshot(self, dense: Path, sparsity: float) -> None:
        import llmprune

        start = time.perf_counter()
        result = llmprune.prune(str(dense), method="magnitude", sparsity=sparsity, eval="ptb",
                                seqlen=self.args.seqlen, max_eval_tokens=self.args.eval_tokens, dense_eval=False,
                                device="cpu", progress=False)
        self.add("oneshot", sparsity, result.sparsity, ppl_of(result.pruned_ppl), time.perf_counter() - start, 0)

    def gradual(self, row: str, sparsity: float, **options) -> None:
        """A method that prunes during one training from the initialisation to ``sparsity``."""
        result, seconds = self.finetune(self.init, sparsity_to=sparsity, prune_every=self.args.prune_every,
                                        **options)
        self.add(row, sparsity, result.sparsity, ppl_of(result.after_ppl), seconds, 1,
                 strategy=result.strategy)

    def imp(self, method: str, rewind: str) -> dict[float, Path]:
        """One IMP run through every sparsity; returns {sparsity: that round's checkpoint}."""
        folder = self.work / method
        targets = self.args.sparsities
        rounds = {t: (folder / "rounds" / f"round-{i + 1}" if i + 1 < len(targets) else folder)
                  for i, t in enumerate(targets)}
        if all((c / "llmprune.json").is_file() for c in rounds.values()):
            return rounds  # trained before (this run or another process on the same --work)
        result, seconds = self.finetune(self.init, method="imp", imp_sparsities=",".join(map(str, targets)),
                                        rewind=rewind, save=str(folder), overwrite=True)
        for i, target in enumerate(targets):
            entry = result.rounds[i + 1]
            if not self.done(method, target):
                self.add(method, target, entry["sparsity"], entry["ppl"]["ptb"]["ppl"],
                         seconds * (i + 2) / (len(targets) + 1), i + 2, rewind=rewind)
        return rounds

    def controls(self, ticket: Path, sparsity: float) -> None:
        """The lottery-ticket controls at the ticket's per-matrix sparsity, trained as the ticket
        was (same steps and data, masks fixed; ``llmprune.training.imp.start_control``): its masks
        on a fresh initialisation (``reinit``), and a random mask of the same per-matrix counts
        on the ticket's own initialisation (``random-mask``)."""
        from llmprune.models.loader import load_model
        from llmprune.training import imp
        from llmprune.training.masks import MaskSet

        ticket_masks = MaskSet.from_zeros(load_model(str(ticket), dtype="float32")[0]).masks
        for row, control in (("ticket-reinit", "reinit"), ("ticket-random", "random-mask")):
            if self.done(row, sparsity):
                continue
            model, tokenizer = load_model(str(self.init), dtype="float32")
            masks = MaskSet.dense(model)
            imp.start_control(control, model, masks, ticket_masks, imp.state_copy(model), seed=self.seed)
            start_folder = save_masked(model, tokenizer, masks, self.work / f"{row}-{sparsity}-start", row)
            result, seconds = self.finetune(start_folder, method="gmp", schedule="constant")
            self.add(row, sparsity, result.sparsity, ppl_of(result.after_ppl), seconds, 1, control=control)


def run_seed(args, seed: int, result: dict) -> None:
    lab = Lab(args, seed, result)
    methods = args.methods
    dense = lab.dense()
    if "dense-long" in methods and not lab.done("dense-long", 0.0):
        lab.dense_long()
    for s in args.sparsities:
        if "oneshot" in methods and not lab.done("oneshot", s):
            lab.oneshot(dense, s)
    if "imp-init" in methods:
        lab.imp("imp-init", "init")
    if "imp-late" in methods:
        lab.imp("imp-late", f"step:{args.late_rewind}")
    for s in args.sparsities:
        if "gmp" in methods and not lab.done("gmp", s):
            lab.gradual("gmp", s, method="gmp", schedule="cubic")
        if "movement" in methods and not lab.done("movement", s):
            lab.gradual("movement", s, method="movement")
        if "rigl" in methods and not lab.done("rigl", s):
            lab.gradual("rigl", s, method="rigl", rigl_every=args.prune_every, rigl_distribution="erk")
        for method, options in EXTRA_METHODS.items():
            if method in methods and not lab.done(method, s):
                lab.gradual(method, s, **options)
    if {"ticket-reinit", "ticket-random"} & set(methods):
        tickets = lab.imp("imp-init", "init")  # the tickets: rewound to init
        for s in args.sparsities:
            lab.controls(tickets[s], s)


# methods that prune during one training, as gmp, through other flags of llmprune.finetune
EXTRA_METHODS: dict[str, dict] = {"movement-soft": {"method": "movement", "movement_mode": "soft"},
                                   "l0": {"method": "l0"}}
METHODS = ("dense", "dense-long", "oneshot", "gmp", "imp-init", "imp-late", "ticket-reinit", "ticket-random", "movement",
           "rigl", *EXTRA_METHODS)
KEY = ("method", "seed", "sparsity_target")


def markdown(result: dict) -> str:
    """Mean PTB test perplexity per method and sparsity (min-max over seeds when several)."""
    rows = result["rows"]
    sparsities = sorted({r["sparsity_target"] for r in rows if r["method"] not in ("dense", "dense-long")})
    dense = [r["ppl"] for r in rows if r["method"] == "dense"]
    head = "| method | trainings | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |"
    lines = [head, "|" + "---|" * (2 + len(sparsities))]
    if dense:
        lines.append(f"| dense | 1 | {cell(dense)} |" + " |" * (len(sparsities) - 1))
    long = [r for r in rows if r["method"] == "dense-long"]
    if long:
        lines.append(f"| dense, {long[0]['trainings']}x the steps | {long[0]['trainings']} | {cell([r['ppl'] for r in long])} |"
                     + " |" * (len(sparsities) - 1))
    for method in [m for m in METHODS if m not in ("dense", "dense-long")]:
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        cells = [cell([r["ppl"] for r in mine if r["sparsity_target"] == s]) for s in sparsities]
        lines.append(f"| {method} | {'1 + round' if method.startswith('imp') else mine[0]['trainings']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def cell(values: list[float]) -> str:
    if not values:
        return "-"
    mean = sum(values) / len(values)
    return f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} ({min(values):.1f}-{max(values):.1f}, n={len(values)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps per training")
    ap.add_argument("--seqlen", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--prune-every", type=int, default=15, help="gmp / movement / rigl: steps between mask updates")
    ap.add_argument("--late-rewind", type=int, default=15, help="imp-late: the step the survivors are rewound to")
    ap.add_argument("--sparsities", default="0.5,0.8,0.9,0.95")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", default="0", help="comma-separated initialisation seeds")
    ap.add_argument("--eval-tokens", type=int, default=None, help="PTB test tokens (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path("/tmp/llmprune-lab-lm"), help="models and checkpoints")
    ap.add_argument("--append", action="store_true", help="keep --out's rows and skip what they measured")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--merge", default="", help="comma-separated result files whose rows --out lacks are added "
                                                "(processes run with the same protocol and --work), then as --report-only")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.merge:
        merge_into(args.out, [Path(f) for f in args.merge.split(",") if f.strip()])
    if args.report_only or args.merge:
        result = json.loads(args.out.read_text())
        text = markdown(result)
        args.out.with_suffix(".md").write_text(text + "\n")
        print(plot_svg(result, args.out.with_suffix(".svg")))
        print(text)
        return
    torch.set_num_threads(args.threads)
    args.sparsities = [float(x) for x in args.sparsities.split(",")]
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown[0]!r}; valid: {', '.join(METHODS)}")
    if args.append and args.out.exists():
        result = json.loads(args.out.read_text())
    else:
        from llmprune.checkpoints.save import library_versions

        result = {"protocol": {k: v for k, v in vars(args).items() if k not in ("out", "work", "append",
                                                                                  "report_only")},
                  "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared)",
                  "versions": library_versions(), "rows": [], "commands": []}
    result["commands"].append("python " + " ".join(os.sys.argv))
    for seed in (int(x) for x in args.seeds.split(",")):
        run_seed(args, seed, result)
    write_json_atomic(args.out, result)
    args.out.with_suffix(".md").write_text(markdown(result) + "\n")
    plot_svg(result, args.out.with_suffix(".svg"))
    print(markdown(result))


def merge_into(out: Path, sources: list[Path]) -> None:
    """Add the rows of ``sources`` that ``out`` lacks (same protocol required)."""
    result = json.loads(out.read_text())
    for source in sources:
        other = json.loads(source.read_text())
        same = ("hidden", "layers", "heads", "steps", "seqlen", "batch_size", "lr", "warmup", "prune_every", "eval_tokens")
        for name in same:
            if other["protocol"][name] != result["protocol"][name]:
                raise SystemExit(f"--merge: {source} has {name} {other['protocol'][name]!r}, {out} has "
                                 f"{result['protocol'][name]!r}")
        known = {tuple(r[k] for k in KEY) for r in result["rows"]}
        result["rows"] += [r for r in other["rows"] if tuple(r[k] for k in KEY) not in known]
        result["commands"] += other["commands"]
    write_json_atomic(out, result)


def plot_svg(result: dict, path: Path) -> Path:
    """PTB test perplexity (log scale) against sparsity, one line per method (mean over seeds)."""
    import math

    rows = result["rows"]
    width, height, pad = 560, 360, 50
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
               "#17becf", "#000000"]
    sparsities = sorted({r["sparsity_target"] for r in rows if r["method"] not in ("dense", "dense-long")})
    ppls = [r["ppl"] for r in rows if math.isfinite(r["ppl"])]
    lo, hi = math.log(min(ppls)), math.log(min(max(ppls), 1e5))
    hi = hi if hi > lo else lo + 1

    def xy(i, ppl):
        x = pad + (i + 0.5) / max(1, len(sparsities)) * (width - pad - 150)
        y = 20 + (height - pad - 20) * (1 - (min(math.log(ppl), hi) - lo) / (hi - lo))
        return x, y

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             'font-size="10">', f'<rect x="{pad}" y="20" width="{width - pad - 150}" height="{height - pad - 20}" '
             'fill="none" stroke="#000"/>']
    for i, s in enumerate(sparsities):
        x, _ = xy(i, math.exp(lo))
        parts.append(f'<text x="{x}" y="{height - pad + 14}" text-anchor="middle">{s:.0%}</text>')
    for f in (0, 0.25, 0.5, 0.75, 1):
        value = math.exp(lo + (hi - lo) * f)
        _, y = xy(0, value)
        parts.append(f'<text x="{pad - 4}" y="{y + 3}" text-anchor="end">{value:.0f}</text>')
    dense = [r["ppl"] for r in rows if r["method"] == "dense"]
    if dense:
        _, y = xy(0, sum(dense) / len(dense))
        parts.append(f'<line x1="{pad}" x2="{width - 150}" y1="{y}" y2="{y}" stroke="#999" stroke-dasharray="4,3"/>')
    long = [r["ppl"] for r in rows if r["method"] == "dense-long"]
    if long:
        _, y = xy(0, sum(long) / len(long))
        parts.append(f'<line x1="{pad}" x2="{width - 150}" y1="{y}" y2="{y}" stroke="#999" stroke-dasharray="1,2"/>')
    for k, method in enumerate(m for m in METHODS if m not in ("dense", "dense-long")):
        points = []
        for i, s in enumerate(sparsities):
            values = [r["ppl"] for r in rows if r["method"] == method and r["sparsity_target"] == s]
            if values:
                points.append(xy(i, sum(values) / len(values)))
        if not points:
            continue
        color = palette[k % len(palette)]
        parts.append(f'<polyline points="{" ".join("%.1f,%.1f" % p for p in points)}" fill="none" stroke="{color}"/>')
        parts += ['<circle cx="%.1f" cy="%.1f" r="2.5" fill="%s"/>' % (*p, color) for p in points]
        parts.append(f'<text x="{width - 140}" y="{30 + 14 * k}" fill="{color}">{method}</text>')
    parts.append(f'<text x="{pad + (width - pad - 150) / 2}" y="{height - 12}" text-anchor="middle">sparsity of the '
                 'decoder matrices; PTB test perplexity (log); dashed: dense, dotted: dense trained as long as IMP</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")
    return path


if __name__ == "__main__":
    main()
