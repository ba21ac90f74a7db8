"""Quantum-PEFT vs LoRA r=8 on all-MiniLM-L6-v2, SST-2 (issue 4).

    .venv/bin/python benchmarks/qpeft_sst2.py [--seeds 0,1,2] [--n-train 2000] [--epochs 1] [--batch-size 16]
        [--lora-lr ..] [--qpeft-lr ..] [--qpeft-r 32] [--qpeft-layers 4] [--device cpu|cuda] [--append-results]
    .venv/bin/python benchmarks/qpeft_sst2.py --tune 1e-3,3e-3 --tune-qpeft 3e-3,1e-2,3e-2 [--tune-seeds 0,1]
        # LR sweep on held-out train rows; --tune-qpeft "" sweeps LoRA alone

Both methods adapt query and value of all 6 layers and train the new classifier head (peft's SEQ_CLS
modules_to_save for LoRA, modules_to_save=["classifier"] for Quantum-PEFT); the head's 770 numbers are
counted separately, the adapter's own numbers are what the goal compares. Same fixed training subset of
GLUE SST-2 train (seeded, the same for every seed), same steps, batch order, schedule (linear decay after
10% warmup, clipping at 1) and seed per run; the learning rate is each method's own, and it and Quantum-PEFT's
K, L and scaling were chosen by --tune sweeps on other train rows (never the dev set). Dev accuracy on all
872 dev rows. Goal: >= 10x fewer adapter parameters than LoRA r=8 and mean dev accuracy at most 1 point below LoRA's.
"""

from __future__ import annotations

import random
import statistics

import common
from common import adapter_params, append_results, command_line, fit, load_avg, save_json, save_tune, table

from qpeft_core import QuantumPEFTConfig, get_qpeft_model
from qpeft_core.train import cls_examples, evaluate, load_model, make_lora_model, read_labeled

TARGETS = ["query", "value"]


def head_params(model) -> int:
    """Trainable numbers of the classifier head (peft wraps it as modules_to_save)."""
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" in n)


def main():
    ap = common.parser(__doc__)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--n-train", type=int, default=2000, help="training subset of SST-2 train (fixed, seeded)")
    ap.add_argument("--n-heldout", type=int, default=872, help="other train rows, for --tune only")
    ap.add_argument("--subset-seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    # defaults: the best mean over seeds 0 and 1 on 872 held-out train rows in the sweeps of
    # benchmarks/results/qpeft_sst2_tune.json (RESULTS.md, "qpeft_sst2 tuning")
    ap.add_argument("--lora-lr", type=float, default=5e-3)
    ap.add_argument("--qpeft-lr", type=float, default=1e-2)
    ap.add_argument("--qpeft-r", type=int, default=32, help="K, columns of U and V")
    ap.add_argument("--qpeft-layers", type=int, default=4, help="L, entangling layers of each Pauli circuit")
    ap.add_argument("--qpeft-scaling", type=float, default=16.0, help="s; s x lr is lambda's effective lr under AdamW")
    ap.add_argument("--qpeft-init-std", type=float, default=0.1, help="std of the random angles at init")
    ap.add_argument(
        "--qpeft-angle-scale", type=float, default=1.0, help="a; a x lr is the angles' effective lr under AdamW"
    )
    ap.add_argument(
        "--qpeft-lr-scale",
        default="",
        help="Quantum-PEFT's per-parameter LR multipliers, e.g. classifier=0.5 (TrainConfig.lr_scale)",
    )
    ap.add_argument(
        "--tune", default=None, help="comma-separated LRs: sweep both methods on --tune-seeds, held-out rows"
    )
    ap.add_argument(
        "--tune-qpeft", default=None, help='Quantum-PEFT\'s own LRs for --tune (default: the same; "": none)'
    )
    # one seed's held-out accuracy moves by ~2 points from seed to seed (the dev std of the 3-seed runs), more
    # than the differences a sweep looks for; averaging seeds is the only cure that keeps the dev set out
    ap.add_argument("--tune-seeds", default="0", help="seeds of every --tune run; the best LR is by their mean")
    args = ap.parse_args()
    common.setup(args)

    sst = args.data / "glue" / "SST-2"
    rows = read_labeled(sst / "train.tsv")
    pick = random.Random(args.subset_seed).sample(range(len(rows)), args.n_train + args.n_heldout)
    _, tok = load_model("all-minilm-l6-v2", task="seq_cls", device=args.device)
    train_data = cls_examples([rows[i] for i in pick[: args.n_train]], tok, args.max_length)
    heldout = cls_examples([rows[i] for i in pick[args.n_train :]], tok, args.max_length)
    dev = cls_examples(read_labeled(sst / "dev.tsv"), tok, args.max_length)
    steps = args.epochs * args.n_train // args.batch_size

    def lora(seed):
        model, _ = load_model("all-minilm-l6-v2", task="seq_cls", device=args.device, seed=seed)
        return make_lora_model(model, TARGETS, r=8, alpha=16, task="seq_cls", seed=seed)

    def qpeft(seed):
        model, _ = load_model("all-minilm-l6-v2", task="seq_cls", device=args.device, seed=seed)
        cfg = QuantumPEFTConfig(
            target_modules=TARGETS,
            r=args.qpeft_r,
            layers=args.qpeft_layers,
            scaling=args.qpeft_scaling,
            init_std=args.qpeft_init_std,
            angle_scale=args.qpeft_angle_scale,
            modules_to_save=["classifier"],
            seed=seed,
        )
        return get_qpeft_model(model, cfg)

    builders = {"LoRA r=8": lora, "Quantum-PEFT": qpeft}
    lr_scales = {"Quantum-PEFT": common.parse_lr_scale(args.qpeft_lr_scale)}

    def run(name, seed, lr, eval_data):
        model = builders[name](seed)
        total, head = adapter_params(model), head_params(model)
        res = fit(
            model,
            tok,
            train_data,
            steps=steps,
            batch_size=args.batch_size,
            lr=lr,
            seed=seed,
            device=args.device,
            lr_scale=lr_scales.get(name),
        )
        acc = evaluate(model, eval_data, 64)["accuracy"]
        row = {
            "method": name,
            "seed": seed,
            "lr": lr,
            "adapter": total - head,
            "head": head,
            "accuracy": acc,
            **res,
            "load_avg": load_avg(),
        }
        print(
            f"{name} seed={seed} lr={lr:g} acc={acc:.4f} train_s={res['train_s']:.0f} (load {load_avg()})", flush=True
        )
        return row

    if args.tune or args.tune_qpeft:
        # --tune-qpeft "" sweeps LoRA alone
        sweep = {"LoRA r=8": args.tune or "", "Quantum-PEFT": args.tune if args.tune_qpeft is None else args.tune_qpeft}
        tune_seeds = [int(x) for x in args.tune_seeds.split(",")]
        tuned = [
            run(name, seed, float(lr), heldout)
            for name in builders
            for lr in sweep[name].split(",")
            if lr
            for seed in tune_seeds
        ]
        means = {}
        for r in tuned:
            means.setdefault((r["method"], r["lr"]), []).append(r["accuracy"])
        best = {
            n: max((statistics.fmean(a), lr) for (m, lr), a in means.items() if m == n)[1] for n in sweep if sweep[n]
        }
        mean_rows = [
            {"method": m, "lr": lr, "seed": "mean", "accuracy": statistics.fmean(a)} for (m, lr), a in means.items()
        ]
        print(table(tuned + mean_rows, ["method", "seed", "lr", "accuracy", "loss_first", "loss_last", "train_s"]))
        save_tune(
            "qpeft_sst2_tune", {"args": vars(args), "env": common.environment(args.device), "rows": tuned, "best": best}
        )
        print(f"qpeft_sst2_tune best_lora_lr={best.get('LoRA r=8')} best_qpeft_lr={best.get('Quantum-PEFT')}")
        return

    seeds = [int(s) for s in args.seeds.split(",")]
    lrs = {"LoRA r=8": args.lora_lr, "Quantum-PEFT": args.qpeft_lr}
    results = [run(name, seed, lrs[name], dev) for seed in seeds for name in builders]
    means = []
    for name in builders:
        mine = [r for r in results if r["method"] == name]
        accs = [r["accuracy"] for r in mine]
        means.append(
            {
                **mine[0],
                "seed": "mean",
                "accuracy": statistics.fmean(accs),
                "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "train_s": statistics.fmean(r["train_s"] for r in mine),
            }
        )
    lo, qp = means
    cols = ["method", "seed", "adapter", "head", "lr", "accuracy", "acc_std", "train_s"]
    tab = table(results + means, cols)
    print(tab)
    fewer = lo["adapter"] / qp["adapter"]
    gap = lo["accuracy"] - qp["accuracy"]
    met = fewer >= 10 and gap <= 0.01
    summary = (
        f"qpeft_sst2 lora_params={lo['adapter']} qpeft_params={qp['adapter']} "
        f"lora_acc={lo['accuracy']:.4f} qpeft_acc={qp['accuracy']:.4f}"
    )
    env = common.environment(args.device)
    save_json(
        common.result_name("qpeft_sst2", args, ap, ("epochs", "n_train", "seeds")),
        {
            "args": vars(args),
            "env": env,
            "steps": steps,
            "rows": results,
            "means": means,
            "fewer_params_x": fewer,
            "acc_gap": gap,
            "goal_met": met,
        },
    )
    if args.append_results:
        append_results(f"""## qpeft_sst2

`{command_line()}` ({env["date"][:10]}, {env["device"]}, load average at the end {load_avg()})

all-MiniLM-L6-v2 + a new 2-way classifier head, targets query,value of all 6 layers. {args.n_train} fixed
SST-2 train rows, {args.epochs} epoch(s) = {steps} steps of batch {args.batch_size}; accuracy on the full dev set
(872). Quantum-PEFT: K={args.qpeft_r}, L={args.qpeft_layers}, scaling {args.qpeft_scaling:g},
Pauli mapping (384 = 2^7 x 3: mixed radix); under AdamW the lr column is the classifier
head's learning rate, a x lr = {args.qpeft_angle_scale * lrs["Quantum-PEFT"]:g} the angles' (angle_scale a =
{args.qpeft_angle_scale:g}) and s x lr = {args.qpeft_scaling * lrs["Quantum-PEFT"]:g} that of s * lambda
(docs/quantum_peft.md).
"adapter" = the method's own trainable numbers; "head" = the classifier head, trained in both and counted
separately. train_s = wall time of the training loop.

{tab}

Goal (>= 10x fewer adapter parameters, mean accuracy at most 1 point below LoRA): {"met" if met else "NOT met"}
({fewer:.1f}x fewer; accuracy {-gap * 100:+.2f} points).

`{summary}`""")
    print(summary)


if __name__ == "__main__":
    main()
