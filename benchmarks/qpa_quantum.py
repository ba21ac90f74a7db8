"""What QPA's QNN contributes: QPA against itself with the QNN frozen or removed, and against LoRA (issue 16).

    .venv/bin/python benchmarks/qpa_quantum.py [--seeds 0,1,2] [--steps 60] [--n-train 1920] [--batch-size 16]
        [--variants qpa,frozen,constant,lora_same,lora_r8,head] [--lr qpa=..,frozen=..,...]
        [--bit-features index|pairs|triples|random] [--p-mode feature|scale] [--task sst2|e2e_family]
        [--tag NAME] [--append-results]
    .venv/bin/python benchmarks/qpa_quantum.py --tune 1e-3,3e-3,1e-2,3e-2 [--tune-seeds 0]   # LR sweep

all-MiniLM-L6-v2 with a new 2-way classifier head on GLUE SST-2; every variant trains the head (peft's SEQ_CLS
modules_to_save for LoRA, modules_to_save=["classifier"] for QPA) and adapts query,value of all 6 layers:
- qpa: QPA as configured (exact simulator, QNN angles trained by autograd);
- frozen: the same, QNN angles kept at their random init (theta.requires_grad False);
- constant: the same, the QNN's output replaced by the uniform distribution (no executor at all): p~ is then
  0 for every state, so the mapping MLP sees the bits alone;
- random_p: the QNN's output replaced by a fixed classical random distribution (Exp(1) entries normalised, the
  Porter-Thomas statistics of a deep random circuit; no executor): a QNN-free per-state code;
- lora_same: LoRA at about QPA's trainable count (r=4: 36,864 vs QPA's ~35k); lora_r8: LoRA at the usual rank;
- head: the classifier head alone, the encoder frozen;
- qpeft: Quantum-PEFT as benchmarks/qpeft_sst2.py configures it (K=32, L=4, scaling 16).
--task e2e_family swaps SST-2 for a second binary task nobody tuned on (E2E NLG references labelled by
familyFriendly yes/no), to check one learning rate per method, taken from the SST-2 sweep, untuned.
One run per variant and seed of 2 x --steps steps (linear decay after a 10% warmup, clipping at 1), with the
dev accuracy (all 872 rows) at --steps (horizon 1, mid-schedule) and at the end (horizon 2). The learning rate
is each variant's own, one rate for all its parameters, chosen by --tune: every variant at every rate of the
grid, --steps steps, accuracy on --n-heldout other SST-2 *train* rows (never dev), mean over --tune-seeds.
"""

from __future__ import annotations

import csv
import random
import re
import statistics
import time

import common
from common import adapter_params, append_results, command_line, load_avg, save_json, save_tune, table

from qpeft_core import QPAConfig, QuantumPEFTConfig, get_qpeft_model
from qpeft_core.train import TrainConfig, cls_examples, load_model, make_lora_model, read_labeled, train

TARGETS = ["query", "value"]
VARIANTS = ("qpa", "frozen", "constant", "random_p", "lora_same", "lora_r8", "head", "qpeft")
QPA_VARIANTS = ("qpa", "frozen", "constant", "random_p")


def head_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" in n)


def parse_lrs(text: str) -> dict:
    out = {}
    for item in filter(None, (text or "").split(",")):
        name, _, lr = item.partition("=")
        if name not in VARIANTS:
            raise SystemExit(f"--lr: unknown variant {name!r}; one of {VARIANTS}")
        out[name] = float(lr)
    return out


def build(variant: str, seed: int, args):
    model, _ = load_model("all-minilm-l6-v2", task="seq_cls", device=args.device, seed=seed, num_labels=args.labels)
    if variant == "head":
        for n, p in model.named_parameters():
            p.requires_grad_("classifier" in n)
        return model
    if variant.startswith("lora"):
        return make_lora_model(model, TARGETS, r=4 if variant == "lora_same" else 8, task="seq_cls", seed=seed)
    if variant == "qpeft":  # benchmarks/qpeft_sst2.py's configuration
        cfg = QuantumPEFTConfig(
            target_modules=TARGETS,
            r=32,
            layers=4,
            scaling=16.0,
            init_std=0.1,
            modules_to_save=["classifier"],
            seed=seed,
        )
        return get_qpeft_model(model, cfg)
    cfg = QPAConfig(
        target_modules=TARGETS,
        r=args.qpa_r,
        lora_alpha=2 * args.qpa_r,
        n_mlp=args.n_mlp,
        qnn_depth=args.qnn_depth,
        bit_features=args.bit_features,
        p_mode=args.p_mode,
        modules_to_save=["classifier"],
        seed=seed,
    )
    return common.qpa_ablate(get_qpeft_model(model, cfg), variant, seed)


def run(variant, seed, lr, args, tok, train_data, eval_data, steps, eval_every):
    model = build(variant, seed, args)
    total, head = adapter_params(model) if variant != "head" else head_params(model), head_params(model)
    cfg = TrainConfig(
        max_steps=steps,
        batch_size=args.batch_size,
        lr=lr,
        warmup_steps=max(1, steps // 10),
        eval_every=eval_every,
        eval_batch_size=64,
        seed=seed,
        device=args.device,
        progress=False,
        # the head is the same classical layer in every variant: --head-lr gives it one rate across methods
        lr_scale={"classifier": args.head_lr / lr} if args.head_lr else {},
    )
    t0 = time.perf_counter()
    res = train(model, tok, train_data, eval_data, config=cfg)
    wall = time.perf_counter() - t0
    accs = {r["step"]: r["eval_accuracy"] for r in res.history if "eval_accuracy" in r}
    calls = dict(model.method.calls) if variant in QPA_VARIANTS else {}
    row = {"variant": variant, "seed": seed, "lr": lr, "adapter": total - head, "head": head, "train_s": wall}
    row.update({f"acc@{s}": a for s, a in sorted(accs.items())}, qnn_calls=calls)
    print(
        f"{variant} seed={seed} lr={lr:g} "
        + " ".join(f"acc@{s}={a:.4f}" for s, a in sorted(accs.items()))
        + f" train_s={wall:.0f} (load {load_avg()})",
        flush=True,
    )
    return row


def e2e_family(data, n_train: int, n_heldout: int, n_eval: int, seed: int):
    """A second binary task from offline data: E2E NLG references labelled by their meaning representation's
    familyFriendly[yes|no] (rows without it dropped). Train and held-out rows from devset.csv, evaluation rows
    (a seeded sample) from testset_w_refs.csv: different restaurants, so no reference is seen in both."""

    def rows(name):
        with open(data / "e2e_nlg" / name, newline="") as f:
            out = []
            for r in csv.DictReader(f):
                m = re.search(r"familyFriendly\[(yes|no)\]", r["mr"])
                if m:
                    out.append((r["ref"], int(m.group(1) == "yes")))
            return out

    pool, test = rows("devset.csv"), rows("testset_w_refs.csv")
    pool = random.Random(seed).sample(pool, n_train + n_heldout)
    return pool[:n_train], pool[n_train:], random.Random(seed).sample(test, min(n_eval, len(test)))


def main():
    ap = common.parser(__doc__)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=60, help="horizon 1; each run trains 2 x steps")
    ap.add_argument("--n-train", type=int, default=1920, help="fixed SST-2 train rows (2 x steps x batch: one epoch)")
    ap.add_argument("--n-heldout", type=int, default=500, help="other train rows, for --tune")
    ap.add_argument("--subset-seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--variants", default="qpa,frozen,constant,lora_same,lora_r8,head")
    ap.add_argument("--lr", default="", help="variant=lr,... (from --tune); missing variants: 3e-3")
    ap.add_argument("--qpa-r", type=int, default=8)
    ap.add_argument("--n-mlp", type=int, default=2048)
    ap.add_argument("--qnn-depth", type=int, default=8)
    ap.add_argument("--bit-features", choices=("index", "pairs", "triples", "random"), default="index")
    ap.add_argument("--p-mode", choices=("feature", "scale"), default="feature", help="QPAConfig.p_mode")
    ap.add_argument(
        "--head-lr", type=float, default=None, help="the classifier head's own rate (default: the variant's)"
    )
    ap.add_argument("--tag", default="", help="a suffix for the result file and RESULTS.md section")
    ap.add_argument("--tune", default=None, help="comma-separated LRs: sweep every variant on held-out train rows")
    ap.add_argument("--tune-seeds", default="0")
    ap.add_argument("--labels", type=int, default=2, help="number of classes")
    ap.add_argument(
        "--task",
        choices=("sst2", "e2e_family"),
        default="sst2",
        help="sst2: GLUE SST-2 (dev set evaluated); e2e_family: E2E NLG references labelled familyFriendly yes/no",
    )
    ap.add_argument("--n-eval", type=int, default=1000, help="e2e_family: evaluation rows (from the test set)")
    args = ap.parse_args()
    common.setup(args)
    variants = args.variants.split(",")

    _, tok = load_model("all-minilm-l6-v2", task="seq_cls", device=args.device)
    if args.task == "sst2":
        sst = args.data / "glue" / "SST-2"
        rows = read_labeled(sst / "train.tsv")
        pick = random.Random(args.subset_seed).sample(range(len(rows)), args.n_train + args.n_heldout)
        train_rows, held_rows = [rows[i] for i in pick[: args.n_train]], [rows[i] for i in pick[args.n_train :]]
        eval_rows = read_labeled(sst / "dev.tsv")
    else:
        train_rows, held_rows, eval_rows = e2e_family(
            args.data, args.n_train, args.n_heldout, args.n_eval, args.subset_seed
        )
    train_data = cls_examples(train_rows, tok, args.max_length)
    heldout = cls_examples(held_rows, tok, args.max_length)
    dev = cls_examples(eval_rows, tok, args.max_length)
    majority = max(statistics.fmean(y for _, y in eval_rows), 1 - statistics.fmean(y for _, y in eval_rows))
    print(
        f"task {args.task}: {len(train_rows)} train, {len(held_rows)} held-out, {len(eval_rows)} eval rows "
        f"(majority class {majority:.4f})",
        flush=True,
    )
    task_text = (
        f"{args.n_train} fixed SST-2 train rows, accuracy on the dev set (872 rows)"
        if args.task == "sst2"
        else f"E2E NLG familyFriendly yes/no: {args.n_train} devset.csv references for training, accuracy on "
        f"{len(eval_rows)} testset_w_refs.csv references (majority class {majority:.4f})"
    )
    name = "qpa_quantum" + (f"_{args.task}" if args.task != "sst2" else "") + (f"_{args.tag}" if args.tag else "")
    env = common.environment(args.device)

    if args.tune:
        seeds = [int(s) for s in args.tune_seeds.split(",")]
        tuned = [
            run(v, s, float(lr), args, tok, train_data, heldout, args.steps, 0)
            for v in variants
            for lr in args.tune.split(",")
            for s in seeds
        ]
        means = {}
        for r in tuned:
            means.setdefault((r["variant"], r["lr"]), []).append(r[f"acc@{args.steps}"])
        best = {v: max((statistics.fmean(a), lr) for (m, lr), a in means.items() if m == v)[1] for v in variants}
        grid = [{"variant": v, "lr": lr, "heldout_acc": statistics.fmean(a)} for (v, lr), a in means.items()]
        print(table(grid, ["variant", "lr", "heldout_acc"]))
        save_tune(name + "_tune", {"args": vars(args), "env": env, "rows": tuned, "best": best})
        if args.append_results:
            append_results(f"""## {name} tuning

`{command_line()}` ({env["date"][:10]}, {env["device"]}, {env["torch_threads"]} torch thread(s), load average
at the end {load_avg()})

Every variant at every rate, {args.steps} steps of batch {args.batch_size} on {args.n_train} SST-2 train rows,
accuracy on {args.n_heldout} other train rows (never dev), mean over seed(s) {args.tune_seeds}.

{table(grid, ["variant", "lr", "heldout_acc"])}

Best: {", ".join(f"{v}={lr:g}" for v, lr in best.items())}""")
        print(f"{name}_tune " + " ".join(f"{v}={lr:g}" for v, lr in best.items()))
        return

    lrs = {v: 3e-3 for v in variants} | parse_lrs(args.lr)
    seeds = [int(s) for s in args.seeds.split(",")]
    h1, h2 = args.steps, 2 * args.steps
    results = [run(v, s, lrs[v], args, tok, train_data, dev, h2, h1) for s in seeds for v in variants]
    summary_rows, gaps, means = common.ablation_tables(
        results,
        variants,
        [f"acc@{h}" for h in (h1, h2)],
        gap=lambda qpa, it: 100 * (qpa - it),
        gap_col=lambda k: f"qpa - it @{k[4:]} (points)",
        digits=4,
    )
    for row in summary_rows:
        mine = [r for r in results if r["variant"] == row["variant"]]
        row.update(adapter=mine[0]["adapter"], head=mine[0]["head"], lr=lrs[row["variant"]])
        row["train_s"] = statistics.fmean(r["train_s"] for r in mine)
    cols = ["variant", "adapter", "head", "lr", f"acc@{h1}", f"acc@{h2}", "train_s"]
    tab = table(summary_rows, cols)
    gap_tab = table(gaps, ["variant", f"qpa - it @{h1} (points)", f"qpa - it @{h2} (points)"]) if gaps else ""
    print(tab)
    print(gap_tab)

    end = f"acc@{h2}"

    def acc(v):
        return f"{means[(v, end)]:.4f}" if (v, end) in means else "-"

    # the quantum_gap: accuracy lost when the QNN is frozen at init (positive = training the QNN helps)
    qgap = [means[("qpa", end)] - means[("frozen", end)]] if ("qpa", end) in means and ("frozen", end) in means else []
    keys = ["qpa", "frozen", "constant", "lora_same", "lora_r8", "head"]  # always; the others where run
    keys += [v for v in ("random_p", "qpeft") if v in variants]
    summary = f"{name} " + " ".join(f"{k}={acc(k)}" for k in keys)
    summary += f" quantum_gap={100 * qgap[0]:+.2f}" if qgap else " quantum_gap=-"
    save_json(
        name,
        {"args": vars(args), "env": env, "lrs": lrs, "rows": results, "summary": summary_rows, "gaps": gaps},
    )
    if args.append_results:
        head_note = f"; the head at {args.head_lr:g} in every variant" if args.head_lr else ""
        append_results(f"""## {name}

`{command_line()}` ({env["date"][:10]}, {env["device"]}, {env["torch_threads"]} torch thread(s), load average at
the end {load_avg()})

all-MiniLM-L6-v2 + a new 2-way classifier head (trained in every variant), query,value of all 6 layers;
{task_text}, batch {args.batch_size}, one run of {h2} steps per variant and seed (seeds {args.seeds}),
accuracy at step {h1} (mid-schedule) and {h2} (end). QPA: r={args.qpa_r}, n_mlp={args.n_mlp}, {args.qnn_depth}
QNN blocks, bit_features={args.bit_features}, p_mode={args.p_mode}, exact
simulator. lr: each variant's own, from the tuning sweep{head_note}. "adapter" excludes the head's numbers.

{tab}

Gap each variant opens against QPA trained (mean ± std over seeds of the per-seed difference; positive = QPA
trained is better):

{gap_tab}

`{summary}`""")
    print(summary)


if __name__ == "__main__":
    main()
