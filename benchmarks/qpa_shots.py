"""Shot-frugal QPA training against plain parameter shift: final quality against cumulative shots (issue 16).

    .venv/bin/python benchmarks/qpa_shots.py [--seeds 0,1] [--steps 120] [--n-train 1920] [--qpa '{...}']
        [--noisy aer-noisy:FakeNairobiV2] [--threads 1] [--append-results]

all-minilm-l6-v2 on GLUE SST-2 (seq_cls; a fixed seeded training subset, accuracy on the first --n-dev dev rows),
QPA on query and value with the classifier head trained, one configuration (--qpa: QPAConfig fields as JSON)
for every variant, the same data order, seed, steps and learning rate; only where the circuits run and how the
QNN's gradient is taken differ:
  exact             the exact simulator, autograd (no shots): the quality the QNN can reach
  frozen            the QNN's angles frozen at init, exact: what the angles add (quantum_gap = exact - frozen)
  naive             Aer, parameter shift, --shots per circuit, a gradient call every step (the baseline)
  shot_adaptive     parameter shift with shots per angle from the noise estimate (gCANS), at most --shots
  spsa              SPSA, 4 perturbations averaged, epsilon 0.1 decaying as (k+1)^-0.101
  period4           parameter shift, the angles updated every 4 steps from the mean dL/dp
  spsa_period4      both
  warm              parameter shift after the first half of the steps on the exact simulator
and, on a noisy fake device (--noisy; noise restricted to the qubits used), naive and the best frugal variant.
Shots are what the QNN's executor ran (forward and gradient circuits), from the adapter's own usage count.
"best" is the variant with the fewest shots whose mean accuracy is within 0.5 points of naive's (else the
closest). The plot (benchmarks/results/qpa_shots.png, matplotlib from `make bench`'s extra) shows accuracy
against cumulative shots, one point per variant and seed. The last line is
`qpa_shots naive_shots=.. best_shots=.. shots_ratio=.. naive_metric=.. best_metric=.. quantum_gap=..`;
the ratio means something only beside a positive quantum_gap (a QNN that matters).
"""

from __future__ import annotations

import json
import random
import statistics
import time

import common
from common import append_results, command_line, fit, load_avg, save_json, table

from qpeft_core import QPAConfig, get_qpeft_model
from qpeft_core.train import cls_examples, evaluate, load_model, read_labeled

TARGETS = ["query", "value"]
DEFAULT_QPA = {"r": 8, "n_mlp": 2048, "qnn_depth": 4}
FRUGAL = {
    "shot_adaptive": {"gradient": "shot_adaptive", "gradient_options": {"min_shots": 32, "snr": 4.0}},
    "spsa": {"gradient": "spsa", "gradient_options": {"samples": 4, "decay": 0.101}},
    "period4": {"gradient": "parameter_shift", "quantum_update_every": 4},
    "spsa_period4": {"gradient": "spsa", "gradient_options": {"samples": 4, "decay": 0.101}, "quantum_update_every": 4},
}


def variants(args) -> dict[str, dict]:
    naive = {"executor": "aer", "shots": args.shots, "gradient": "parameter_shift"}
    out = {"exact": {}, "frozen": {"freeze": True}, "naive": naive}
    out |= {name: {**naive, **cfg} for name, cfg in FRUGAL.items()}
    out["warm"] = {**naive, "warm_start_steps": args.steps // 2}
    return out


def main():
    ap = common.parser(__doc__)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--n-train", type=int, default=1920, help="training subset of SST-2 train (fixed, seeded)")
    ap.add_argument("--n-dev", type=int, default=400, help="dev rows evaluated (the first ones)")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument(
        "--shots", type=int, default=1024, help="shots per circuit of the naive baseline (a cap for adaptive)"
    )
    ap.add_argument("--qpa", default=json.dumps(DEFAULT_QPA), help="QPAConfig fields (JSON) for every variant")
    ap.add_argument(
        "--noisy", default="aer-noisy:FakeNairobiV2", help="noisy executor for naive and the best ('': none)"
    )
    ap.add_argument("--only", default="", help="comma-separated variants to run (default: all)")
    args = ap.parse_args()
    common.setup(args)
    qpa = json.loads(args.qpa)

    sst = args.data / "glue" / "SST-2"
    rows = read_labeled(sst / "train.tsv")
    pick = random.Random(0).sample(range(len(rows)), args.n_train)
    _, tok = load_model("all-minilm-l6-v2", task="seq_cls", device=args.device)
    train_data = cls_examples([rows[i] for i in pick], tok, args.max_length)
    dev = cls_examples(read_labeled(sst / "dev.tsv")[: args.n_dev], tok, args.max_length)
    seeds = [int(s) for s in args.seeds.split(",")]

    def run(name: str, spec: dict, seed: int) -> dict:
        spec = dict(spec)
        freeze = spec.pop("freeze", False)
        model, _ = load_model("all-minilm-l6-v2", task="seq_cls", device=args.device, seed=seed)
        cfg = QPAConfig(target_modules=TARGETS, modules_to_save=["classifier"], seed=seed, **{**qpa, **spec})
        model = get_qpeft_model(model, cfg)
        if freeze:
            model.method.generator.theta.requires_grad_(False)
        res = fit(
            model,
            tok,
            train_data,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=seed,
            device=args.device,
        )
        acc = evaluate(model, dev, 64)["accuracy"]
        usage = model.method.usage
        row = {
            "variant": name,
            "executor": cfg.executor,
            "seed": seed,
            "accuracy": acc,
            "shots": usage.shots,
            "circuits": usage.circuits,
            "calls": dict(model.method.calls),
            "train_s": res["train_s"],
            "load_avg": load_avg(),
        }
        print(f"{name} seed={seed} acc={acc:.4f} shots={usage.shots:,} ({row['train_s']:.0f} s, load {load_avg()})")
        return row

    plan = variants(args)
    only = [v for v in args.only.split(",") if v]
    rows_out = [run(name, spec, seed) for name, spec in plan.items() if not only or name in only for seed in seeds]

    def mean(name, key, executor=None):
        vals = [r[key] for r in rows_out if r["variant"] == name and (executor is None or r["executor"] == executor)]
        return statistics.fmean(vals) if vals else None

    def spread(name, key):
        vals = [r[key] for r in rows_out if r["variant"] == name]
        return statistics.stdev(vals) if len(vals) > 1 else 0.0

    naive_acc, naive_shots = mean("naive", "accuracy"), mean("naive", "shots")
    frugal = [n for n in FRUGAL if mean(n, "accuracy") is not None] + (["warm"] if mean("warm", "accuracy") else [])
    close = [n for n in frugal if mean(n, "accuracy") >= naive_acc - 0.005]
    best = min(close, key=lambda n: mean(n, "shots")) if close else max(frugal, key=lambda n: mean(n, "accuracy"))
    if args.noisy:
        for name in ("naive", best):
            spec = {**plan[name], "executor": args.noisy}
            rows_out.extend(run(f"{name} ({args.noisy})", spec, seed) for seed in seeds)

    gap = 100 * (mean("exact", "accuracy") - mean("frozen", "accuracy"))
    summary_rows = []
    for name in dict.fromkeys(r["variant"] for r in rows_out):
        acc, shots = mean(name, "accuracy"), mean(name, "shots")
        summary_rows.append(
            {
                "variant": name,
                "accuracy": f"{100 * acc:.2f} ± {100 * spread(name, 'accuracy'):.2f}",
                "shots": f"{shots:,.0f}",
                "vs naive": "-" if not shots or not naive_shots else f"{naive_shots / shots:.1f}x fewer",
            }
        )
    ratio = naive_shots / mean(best, "shots")
    result = {
        "naive_shots": naive_shots,
        "best": best,
        "best_shots": mean(best, "shots"),
        "shots_ratio": ratio,
        "naive_metric": naive_acc,
        "best_metric": mean(best, "accuracy"),
        "quantum_gap": gap,
    }
    save_json("qpa_shots", {"args": vars(args) | {"data": str(args.data)}, "rows": rows_out, "result": result})
    plot(rows_out, common.HERE / "results" / "qpa_shots.png")
    text = table(summary_rows, ["variant", "accuracy", "shots", "vs naive"])
    print(text)
    if args.append_results:
        append_results(
            f"\n## qpa_shots\n\n`{command_line()}` ({time.strftime('%Y-%m-%d')}, load {load_avg()})\n\n"
            f"SST-2 dev accuracy (first {args.n_dev} rows, mean ± std over seeds {args.seeds}) against the shots the "
            f"QNN ran, {args.steps} steps; QPA {json.dumps(qpa)}. quantum_gap (exact - frozen angles): "
            f"{gap:+.2f} points. Plot: benchmarks/results/qpa_shots.png.\n\n{text}\n"
        )
    print(
        f"qpa_shots naive_shots={naive_shots:.0f} best_shots={mean(best, 'shots'):.0f} shots_ratio={ratio:.2f} "
        f"naive_metric={naive_acc:.4f} best_metric={mean(best, 'accuracy'):.4f} quantum_gap={gap:.2f}"
    )


def plot(rows: list[dict], path) -> None:
    """Accuracy against cumulative shots (log scale), one marker per variant and seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["variant"] for r in rows):
        pts = [(max(r["shots"], 1), 100 * r["accuracy"]) for r in rows if r["variant"] == name]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=name, s=28)
    ax.set_xscale("log")
    ax.set_xlabel("shots run by the QNN (log; exact variants at 1)")
    ax.set_ylabel("SST-2 dev accuracy (%)")
    ax.set_title("QPA: quality against shots")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
