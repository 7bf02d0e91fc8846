"""The CNN lab of issue #13: lottery tickets and their controls, filter pruning with and
without fine-tuning, and per-layer filter sensitivity, on scikit-learn's handwritten digits.

Data: ``sklearn.datasets.load_digits`` (1,797 8x8 grey images, 10 classes, bundled with
scikit-learn, so offline), split once into train / test, stratified, ``--split-seed``;
pixels scaled by the train set's mean and standard deviation. Model: ``--channels``
3x3 conv-BN-ReLU blocks (a 2x2 max-pool after every block but the first), Flatten, Linear.
Training: Adam at ``--lr``, ``--steps`` steps of ``--batch-size`` images drawn in a seeded
order (the same order for every training of a seed), masks enforced through the library's
``MaskSet`` by ``llmprune.training.loop.train_masked``. Accuracy on the test split, eval mode.

For each of ``--seeds`` (the initialisation and the data order):

1. Dense: train the model once; its accuracy is round 0 of IMP.
2. IMP (``IterativeMagnitude``, the library's strategy; ``--scope`` global by default):
   ``--imp-rounds`` rounds, each removing ``--imp-rate`` of the surviving weights of every
   Conv2d and Linear (default rate 1 - 0.5^(1/3) = 20.6 %, so rounds 3, 7, 10, 13 reach 50.0,
   80.2, 90.1 and 95.0 %), then rewinding the survivors (``imp.rewind_model``) to the
   initialisation (Frankle & Carbin 2019) or to step ``--late-step`` of the dense training
   (late rewinding, Frankle et al. 2020), and retraining.
3. Controls at ``--control-rounds`` (``imp.start_control``): the ticket's mask on a fresh
   initialisation (reinit), and a random mask with the ticket's kept count per layer on the
   rewind state (random mask); each trained like a round.
4. Filter pruning (``llmprune.training.filters``) of the trained dense model: the fraction
   ``--filter-fractions`` of every conv's filters with the lowest L1 norm removed (the model
   rewritten smaller), accuracy before and after ``--finetune-steps`` of fine-tuning.
5. Sensitivity (Li et al. 2017, Fig. 2b): one conv at a time, the fraction
   ``--sensitivity-fractions`` of its filters removed by L1 norm, no fine-tuning.

    OMP_NUM_THREADS=1 PYTHONPATH=. python evals/lab_cnn.py

writes ``--out`` (JSON; default ``evals/results/lab_cnn-<date>.json``), a Markdown table and an
SVG plot beside it. ``python evals/lab_cnn.py --plot-only --out FILE`` redraws them. Needs
scikit-learn (``pip install 'llmprune[lab]'``).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from llmprune.training import filters, imp
from llmprune.training.loop import train_masked
from llmprune.training.masks import MaskSet
from llmprune.training.strategies import IterativeMagnitude

ARMS = ("ticket", "reinit", "random-mask")


def load_data(split_seed: int, test_size: float) -> dict:
    """``{"train": (x [N, 1, 8, 8] fp32, y [N] int64), "test": ...}``, standardised by the train set."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise SystemExit("evals/lab_cnn.py needs scikit-learn: pip install 'llmprune[lab]' "
                         "(or pip install scikit-learn)") from None
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(digits.images, digits.target, test_size=test_size,
                                                        random_state=split_seed, stratify=digits.target)
    x_train, x_test = (torch.tensor(x, dtype=torch.float32).unsqueeze(1) for x in (x_train, x_test))
    mean, std = float(x_train.mean()), float(x_train.std())
    return {"train": ((x_train - mean) / std, torch.tensor(y_train)), "test": ((x_test - mean) / std, torch.tensor(y_test))}


def build_cnn(channels: list[int], classes: int = 10, size: int = 8) -> nn.Sequential:
    layers, previous = [], 1
    for i, c in enumerate(channels):
        layers += [nn.Conv2d(previous, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
        if i > 0 and size > 1:
            layers.append(nn.MaxPool2d(2))
            size //= 2
        previous = c
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(previous * size * size, classes))


def batch_order(n_train: int, steps: int, batch_size: int, seed: int) -> torch.Tensor:
    """``[steps, batch_size]`` indices: seeded epochs of permutations, concatenated."""
    generator = torch.Generator().manual_seed(seed)
    epochs = math.ceil(steps * batch_size / n_train)
    return torch.cat([torch.randperm(n_train, generator=generator) for _ in range(epochs)])[:steps * batch_size] \
        .view(steps, batch_size)


def loss_fn(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


@torch.no_grad()
def accuracy(model, data) -> float:
    model.eval()
    x, y = data["test"]
    return float((model(x).argmax(1) == y).float().mean())


def train(model, masks, data, order, lr, on_step=None) -> list[float]:
    x, y = data["train"]
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    return train_masked(model, masks, None, ((x[i], y[i]) for i in order), optimizer, loss_fn,
                        on_step=on_step)  # strategy None: the masks stay fixed within a training


def run_seed(seed: int, data: dict, args) -> dict:
    """Every measurement of one seed (see the module docstring)."""
    out = {"seed": seed, "imp": [], "filters": [], "sensitivity": []}
    order = batch_order(len(data["train"][1]), args.steps, args.batch_size, seed)
    torch.manual_seed(seed)
    model = build_cnn(args.channels)
    init_state = imp.state_copy(model)
    masks = MaskSet.dense(model)
    late = {}
    start = time.perf_counter()
    train(model, masks, data, order, args.lr,
          on_step=lambda step: late.setdefault("state", imp.state_copy(model)) if step == args.late_step else None)
    out["train_seconds"] = time.perf_counter() - start
    out["dense"] = accuracy(model, data)
    dense_state = imp.state_copy(model)
    out["params"] = sum(p.numel() for p in model.parameters())

    for rewind, rewind_state in (("init", init_state), (f"step:{args.late_step}", late["state"])):
        model.load_state_dict(dense_state)
        masks = MaskSet.dense(model)
        strategy = IterativeMagnitude.geometric(args.imp_rounds, args.imp_rate, rewind=rewind, scope=args.scope)
        for r in range(1, args.imp_rounds + 1):
            strategy.prune_round(masks)
            imp.rewind_model(model, masks, rewind_state)
            train(model, masks, data, order, args.lr)
            row = {"rewind": rewind, "round": r, "sparsity": masks.sparsity(), "arm": "ticket",
                   "accuracy": accuracy(model, data), "layer_sparsity": masks.per_weight_sparsity()}
            out["imp"].append(row)
            if r not in args.control_rounds:
                continue
            ticket_state, ticket = imp.state_copy(model), {n: m.clone() for n, m in masks.masks.items()}
            for control in ("reinit", "random-mask"):
                imp.start_control(control, model, masks, ticket, rewind_state, 1000 + seed)
                train(model, masks, data, order, args.lr)
                out["imp"].append({**row, "arm": control, "accuracy": accuracy(model, data),
                                   "sparsity": masks.sparsity()})
            masks.update(ticket)
            imp.rewind_model(model, masks, ticket_state)  # the trained ticket: the next round prunes it

    convs = [n for n, m in build_cnn(args.channels).named_modules() if isinstance(m, nn.Conv2d)]
    ft_order = batch_order(len(data["train"][1]), args.finetune_steps, args.batch_size, seed + 500)
    for fraction in args.filter_fractions:
        model.load_state_dict(dense_state)
        small = copy.deepcopy(model)
        filters.prune_filters(small, {name: fraction for name in convs}, "l1")
        row = {"fraction": fraction, "params": sum(p.numel() for p in small.parameters()),
               "accuracy": accuracy(small, data)}
        if args.finetune_steps:
            train(small, MaskSet({}, {}), data, ft_order, args.finetune_lr)
            row["finetuned"] = accuracy(small, data)
        out["filters"].append(row)
    for name in convs:
        for fraction in args.sensitivity_fractions:
            model.load_state_dict(dense_state)
            small = copy.deepcopy(model)
            filters.prune_filters(small, {name: fraction}, "l1")
            out["sensitivity"].append({"layer": name, "fraction": fraction, "accuracy": accuracy(small, data)})
    out["seconds"] = time.perf_counter() - start
    return out


# ---------------------------------------------------------------------------------------- summary


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def summarize(seeds: list[dict]) -> dict:
    imp_rows: dict[tuple, list] = {}
    for s in seeds:
        for row in s["imp"]:
            imp_rows.setdefault((row["rewind"], row["round"], row["arm"]), []).append(row)
    imp_summary = [{"rewind": k[0], "round": k[1], "arm": k[2], "sparsity": statistics.fmean(r["sparsity"] for r in v),
                    "accuracy": spread([r["accuracy"] for r in v])} for k, v in imp_rows.items()]
    filt = {}
    for s in seeds:
        for row in s["filters"]:
            filt.setdefault(row["fraction"], []).append(row)
    filters_summary = [{"fraction": f, "params": v[0]["params"], "accuracy": spread([r["accuracy"] for r in v]),
                        **({"finetuned": spread([r["finetuned"] for r in v])} if "finetuned" in v[0] else {})}
                       for f, v in sorted(filt.items())]
    sens = {}
    for s in seeds:
        for row in s["sensitivity"]:
            sens.setdefault((row["layer"], row["fraction"]), []).append(row["accuracy"])
    return {"dense": spread([s["dense"] for s in seeds]), "imp": imp_summary, "filters": filters_summary,
            "sensitivity": [{"layer": k[0], "fraction": k[1], "accuracy": spread(v)} for k, v in sens.items()]}


def pct(s: dict) -> str:
    return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"


def markdown(result: dict) -> str:
    summary, config = result["summary"], result["config"]
    late = f"step:{config['late_step']}"
    lines = [f"Dense: {pct(summary['dense'])} % test accuracy ({config['params']:,} parameters; mean ± std over "
             f"seeds {', '.join(map(str, config['seeds']))}).", "",
             f"| sparsity | ticket, rewind to init | reinit (init mask) | random mask | ticket, rewind to step "
             f"{config['late_step']} | reinit (late mask) | random mask (late) |", "|---|---|---|---|---|---|---|"]
    index = {(r["rewind"], r["round"], r["arm"]): r for r in summary["imp"]}
    for r in config["control_rounds"]:
        cells = [pct(index[(rw, r, arm)]["accuracy"]) if (rw, r, arm) in index else "-"
                 for rw in ("init", late) for arm in ARMS]
        lines.append(f"| {100 * index[('init', r, 'ticket')]['sparsity']:.1f} % (round {r}) | " + " | ".join(cells) + " |")
    lines += ["", "| filters removed per conv (L1) | parameters | accuracy, no fine-tuning | "
              f"after {config['finetune_steps']} fine-tuning steps |", "|---|---|---|---|"]
    for row in summary["filters"]:
        lines.append(f"| {100 * row['fraction']:g} % | {row['params']:,} | {pct(row['accuracy'])} | "
                     f"{pct(row['finetuned']) if 'finetuned' in row else '-'} |")
    fractions = sorted({r["fraction"] for r in summary["sensitivity"]})
    lines += ["", "| layer (filters) | " + " | ".join(f"{100 * f:g} %" for f in fractions) + " |",
              "|---|" + "---|" * len(fractions)]
    for layer, channels in zip(config["convs"], config["channels"]):
        cells = {r["fraction"]: pct(r["accuracy"]) for r in summary["sensitivity"] if r["layer"] == layer}
        lines.append(f"| conv {layer} ({channels}) | " + " | ".join(cells.get(f, "-") for f in fractions) + " |")
    return "\n".join(lines) + "\n"


def plot_svg(result: dict, path: Path) -> Path:
    """Three panels: IMP arms vs weights remaining (log); filter pruning vs fraction removed;
    per-layer sensitivity. Test accuracy (%) on y, each panel its own range; points are means
    over seeds, bars +- one standard deviation."""
    summary, config = result["summary"], result["config"]
    width, height, pad = 320, 250, 42
    inner_w, inner_h = width - pad - 10, height - pad - 20
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width * 3}" height="{height + 50}" '
             'font-family="sans-serif" font-size="10">']
    dense = summary["dense"]

    def panel(p, title, xlabel, xticks, xmax, lo, curves):
        """``curves``: [(points [(x, spread)], color, dash)]; x in [0, xmax]; y from ``lo`` to 100 %."""
        x0 = p * width

        def xy(x, acc):
            return x0 + pad + x / xmax * inner_w, 20 + inner_h * (1 - (acc - lo) / (1.0 - lo))

        parts.append(f'<text x="{x0 + width / 2}" y="14" text-anchor="middle" font-size="12">{title}</text>')
        parts.append(f'<rect x="{x0 + pad}" y="20" width="{inner_w}" height="{inner_h}" fill="none" stroke="#000"/>')
        for tick, label in xticks:
            parts.append(f'<text x="{xy(tick, lo)[0]:.1f}" y="{height - pad + 12}" text-anchor="middle">{label}</text>')
        for v in (lo, (lo + 1.0) / 2, 1.0):
            parts.append(f'<text x="{x0 + pad - 3}" y="{xy(0, v)[1] + 3:.1f}" text-anchor="end">{100 * v:.0f}</text>')
        parts.append(f'<text x="{x0 + width / 2}" y="{height - 12}" text-anchor="middle">{xlabel}</text>')
        for points, color, dash in curves:
            points = sorted(points, key=lambda q: q[0])
            coords = " ".join("%.1f,%.1f" % xy(x, s["mean"]) for x, s in points)
            parts.append(f'<polyline points="{coords}" fill="none" stroke="{color}"{dash}/>')
            for x, s in points:
                (px, py), (_, top), (_, bottom) = (xy(x, s["mean"]), xy(x, min(1.0, s["mean"] + s["std"])),
                                                   xy(x, max(lo, s["mean"] - s["std"])))
                parts.append(f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{bottom:.1f}" y2="{top:.1f}" stroke="{color}"/>')
                parts.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="2" fill="{color}"/>')

    def floor_to(values, step):
        return max(0.0, math.floor(min(values) / step) * step)

    late = f"step:{config['late_step']}"
    colors = {"ticket": "#1f77b4", "reinit": "#d62728", "random-mask": "#7f7f7f"}
    curves = []
    for rewind, dash in (("init", ""), (late, ' stroke-dasharray="4,3"')):
        for arm, color in colors.items():
            pts = [(-math.log10(1 - r["sparsity"]), r["accuracy"]) for r in summary["imp"]
                   if r["rewind"] == rewind and r["arm"] == arm]
            curves.append((pts + [(0.0, dense)] if arm == "ticket" else pts, color, dash))
    lo = floor_to([s["mean"] - s["std"] for pts, _, _ in curves for _, s in pts], 0.05)
    kept = [(-math.log10(k), f"{100 * k:g} %") for k in (1.0, 0.5, 0.2, 0.1, 0.05)]
    panel(0, "IMP tickets and controls", "weights remaining (log)", kept, -math.log10(0.04), lo, curves)
    fractions = [(f, f"{f:g}") for f in (0, 0.25, 0.5, 0.75, 1.0)]
    curves = [([(0.0, dense)] + [(r["fraction"], r["accuracy"]) for r in summary["filters"]], "#7f7f7f",
               ' stroke-dasharray="4,3"')]
    if summary["filters"] and "finetuned" in summary["filters"][0]:
        curves.append(([(0.0, dense)] + [(r["fraction"], r["finetuned"]) for r in summary["filters"]], "#1f77b4", ""))
    panel(1, "filter pruning (L1, every conv)", "fraction of filters removed", fractions, 1.0, 0.0, curves)
    layer_colors = ["#d62728", "#2ca02c", "#1f77b4", "#9467bd", "#ff7f0e"]
    names = ["red", "green", "blue", "purple", "orange"]
    curves = [([(0.0, dense)] + [(r["fraction"], r["accuracy"]) for r in summary["sensitivity"] if r["layer"] == layer],
               layer_colors[i % 5], "") for i, layer in enumerate(config["convs"])]
    panel(2, "sensitivity (one conv, no fine-tuning)", "fraction of its filters removed", fractions, 1.0, 0.0, curves)
    legend = ", ".join(f"conv {layer} ({c} filters) {names[i % 5]}"
                       for i, (layer, c) in enumerate(zip(config["convs"], config["channels"])))
    parts.append(f'<text x="10" y="{height + 22}">Test accuracy (%), mean over {len(config["seeds"])} seeds, bars '
                 f'+-1 std. Left: ticket blue, reinit red, random mask grey; solid: rewind to init, dashed: rewind '
                 f'to step {config["late_step"]}.</text>')
    parts.append(f'<text x="10" y="{height + 38}">Middle: grey dashed without fine-tuning, blue after '
                 f'{config["finetune_steps"]} fine-tuning steps. Right: {legend}.</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")
    return path


# ---------------------------------------------------------------------------------------- main


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=ints, default=[16, 32, 32], help="conv widths, comma-separated")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of every training")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (constant)")
    parser.add_argument("--seeds", type=ints, default=[0, 1, 2])
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--test-size", type=float, default=0.25)
    parser.add_argument("--imp-rounds", type=int, default=13)
    parser.add_argument("--imp-rate", type=float, default=1 - 0.5 ** (1 / 3),
                        help="fraction of the surviving weights removed per round")
    parser.add_argument("--scope", default="global", choices=["layer", "global"])
    parser.add_argument("--late-step", type=int, default=20, help="late rewinding: the step rewound to")
    parser.add_argument("--control-rounds", type=ints, default=[3, 7, 10, 13])
    parser.add_argument("--filter-fractions", type=floats, default=[0.25, 0.5, 0.75])
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--sensitivity-fractions", type=floats, default=[0.125, 0.25, 0.5, 0.75, 0.875])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(f"evals/results/lab_cnn-{datetime.date.today()}.json"))
    parser.add_argument("--plot-only", action="store_true", help="redraw the table and plot from --out")
    args = parser.parse_args(argv)
    if args.plot_only:
        result = json.loads(args.out.read_text())
    else:
        if not 0 < args.late_step <= args.steps:
            parser.error(f"--late-step must be in [1, --steps {args.steps}], got {args.late_step}")
        if any(not 1 <= r <= args.imp_rounds for r in args.control_rounds):
            parser.error(f"--control-rounds must be in [1, --imp-rounds {args.imp_rounds}]")
        torch.set_num_threads(args.threads)
        data = load_data(args.split_seed, args.test_size)
        start = time.perf_counter()
        seeds = []
        for seed in args.seeds:
            seeds.append(run_seed(seed, data, args))
            print(f"seed {seed}: dense {seeds[-1]['dense']:.4f}, {seeds[-1]['seconds']:.0f} s", flush=True)
        model = build_cnn(args.channels)
        config = {**{k: v for k, v in vars(args).items() if k not in ("out", "plot_only")},
                  "params": sum(p.numel() for p in model.parameters()),
                  "convs": [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)],
                  "n_train": len(data["train"][1]), "n_test": len(data["test"][1])}
        import sklearn

        result = {"config": config, "summary": summarize(seeds), "seeds": seeds,
                  "machine": {"platform": platform.platform(), "processor": platform.processor(),
                              "torch": torch.__version__, "sklearn": sklearn.__version__,
                              "threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
                  "seconds": time.perf_counter() - start}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    args.out.with_suffix(".md").write_text(table)
    plot_svg(result, args.out.with_suffix(".svg"))
    print(table)


if __name__ == "__main__":
    main()
