"""How close can a QPA of a given parameter budget get to LoRA? LoRA's own factors, cut to QPA's rank.

    .venv/bin/python benchmarks/qpa_capacity.py [--targets lm_head] [--steps 160] [--ranks 16,32,64,96]
        [--n-mlp 2048] [--layout target|rows] [--bit-features index|pairs] [--budgets 0.5,0.55] [--append-results]

QPA generates LoRA's factors as a B x n_mlp block, the mapping MLP's output H W^T + bias with H its B x w
hidden activations, so the block has rank at most w + 1, and the parameter budget fixes w (most of QPA's
numbers are the w x n_mlp output weights). This trains LoRA r=4 on the targets exactly as qpa_wikitext.py
does (same data, steps, seed and LR), lays its trained factors out as QPA lays out what it generates (each
target's A and B balanced to equal norm, the scale QPA's per-target gate absorbs), replaces the block by its
best rank-k approximation (truncated SVD) and evaluates test.txt perplexity, for the ranks in --ranks and
the ranks each budget in --budgets allows. Training QPA directly may find a better rank-k solution than the
truncation of LoRA's, so this estimates the ceiling rather than proving it; qpa_wikitext.py's measured QPA
runs sit next to it in RESULTS.md.
"""

from __future__ import annotations

import dataclasses
import math

import common
import torch
from common import append_results, command_line, lm_args, load_avg, save_json, table

from qpeft_core import QPAConfig
from qpeft_core.adapters.layers import find_targets
from qpeft_core.adapters.qpa import QPAMethod
from qpeft_core.adapters.qpa.generator import resolve_widths
from qpeft_core.train import evaluate, load_model, make_lora_model


def block_of(factors: dict, index: dict, m: int, n_mlp: int) -> torch.Tensor:
    """The B x n_mlp block QPA would have to generate for these (A, B) factors (zero-padded past m)."""
    flat = torch.zeros(math.ceil(m / n_mlp) * n_mlp)
    for name, (a, b) in factors.items():
        flat[index[name][0].flatten()] = a.flatten()
        flat[index[name][1].flatten()] = b.flatten()
    return flat.view(-1, n_mlp)


def main():
    ap = common.parser(__doc__)
    lm_args(ap, steps=160, targets="lm_head")
    ap.add_argument("--r", type=int, default=4, help="LoRA's rank")
    ap.add_argument("--lora-lr", type=float, default=1e-2, help="as qpa_wikitext.py's")
    ap.add_argument("--n-mlp", type=int, default=2048)
    ap.add_argument("--qnn-depth", type=int, default=8)
    ap.add_argument("--layout", choices=("target", "rows"), default="target")
    ap.add_argument("--bit-features", choices=("index", "pairs", "triples"), default="index")
    ap.add_argument("--ranks", default="16,32,64,96", help="block ranks to evaluate, besides the budgets' own")
    ap.add_argument("--budgets", default="0.5,0.55", help="QPAConfig.param_budget values whose rank to evaluate")
    args = ap.parse_args()
    if args.tune:
        ap.error("--tune: this benchmark trains LoRA at --lora-lr only")
    common.setup(args)
    targets = args.targets.split(",")

    base, tok = load_model(args.model, device=args.device)
    data = common.wikitext(tok, args.data, args.steps * args.batch_size, args.eval_tokens, args.block)
    before = evaluate(base, data["test"], 4, max_tokens=args.eval_tokens)["ppl"]

    # QPA's layout (QPAMethod.unflatten) and its budgets' widths, from a QPA method over the model's targets;
    # find_targets leaves the model as it is, for LoRA below
    cfg = QPAConfig(target_modules=targets, r=args.r, n_mlp=args.n_mlp, qnn_depth=args.qnn_depth, layout=args.layout)
    method = QPAMethod(cfg, find_targets(base, targets))
    m, n_targets = method.m, len(method.targets)
    index = method.unflatten(torch.arange(m))
    budget_width = {}
    for budget in (float(b) for b in args.budgets.split(",") if b):
        c = dataclasses.replace(cfg, param_budget=budget, bit_features=args.bit_features)
        budget_width[budget] = resolve_widths(c, m, n_targets)[-1]
    del method

    model = make_lora_model(base, targets, r=args.r, alpha=2 * args.r, seed=args.seed)
    run = common.fit(
        model,
        tok,
        data["train"],
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lora_lr,
        seed=args.seed,
        device=args.device,
    )
    lora_ppl = evaluate(model, data["test"], 4, max_tokens=args.eval_tokens)["ppl"]
    print(f"LoRA r={args.r}: ppl {before:.3f} -> {lora_ppl:.3f} ({run['train_s']:.0f} s)", flush=True)

    named = dict(model.named_modules())
    modules = {name: named["base_model.model." + name] for name in index}  # where peft keeps the wrapped model
    trained = {
        n: (mod.lora_A["default"].weight.data.clone(), mod.lora_B["default"].weight.data.clone())
        for n, mod in modules.items()
    }
    # ΔW = B A is unchanged by A s, B / s; QPA's per-target gate sets B's scale, so balance the two in the block
    balance = {n: ((b.norm() / a.norm()).sqrt().clamp_min(1e-12)) for n, (a, b) in trained.items()}
    block = block_of({n: (a * balance[n], b / balance[n]) for n, (a, b) in trained.items()}, index, m, args.n_mlp)
    u, s, v = torch.linalg.svd(block.double(), full_matrices=False)
    energy = (s**2).cumsum(0) / (s**2).sum()

    full = len(s)
    budget_rank = {b: min(w + 1, full) for b, w in budget_width.items()}  # the block's rank is at most w + 1
    # full rank reproduces LoRA: the check that the layout round trip is exact
    ranks = sorted({min(int(k), full) for k in args.ranks.split(",") if k} | set(budget_rank.values()) | {full})
    rows = []
    for k in ranks:
        flat = ((u[:, :k] * s[:k]) @ v[:k]).float().flatten()
        for name, mod in modules.items():
            ia, ib = index[name]
            mod.lora_A["default"].weight.data.copy_(flat[ia] / balance[name])
            mod.lora_B["default"].weight.data.copy_(flat[ib] * balance[name])
        ppl = evaluate(model, data["test"], 4, max_tokens=args.eval_tokens)["ppl"]
        budgets = ", ".join(f"{b:g}" for b, r in budget_rank.items() if r == k)
        rows.append(
            {
                "rank": k,
                "of_rows": block.shape[0],
                "budget": budgets,
                "energy": float(energy[k - 1]),
                "ppl": ppl,
                "vs_lora_pct": 100 * (ppl - lora_ppl) / lora_ppl,
            }
        )
        print(f"rank {k}: ppl {ppl:.3f} ({rows[-1]['vs_lora_pct']:+.2f}% vs LoRA)", flush=True)
        if k == full and not math.isclose(ppl, lora_ppl, rel_tol=1e-4):
            raise RuntimeError(f"the full-rank block gives ppl {ppl} != LoRA's {lora_ppl}: the layout map is wrong")
    tab = table(rows, ["rank", "of_rows", "budget", "energy", "ppl", "vs_lora_pct"])
    print(tab)
    at = {b: next(row for row in rows if row["rank"] == r) for b, r in budget_rank.items()}
    summary = f"qpa_capacity lora_ppl={lora_ppl:.3f} " + " ".join(
        f"rank_at_{b:g}={row['rank']} ppl_at_{b:g}={row['ppl']:.3f} rel_at_{b:g}={row['vs_lora_pct'] / 100:+.4f}"
        for b, row in at.items()
    )
    keys = ("targets", "steps", "seed", "r", "n_mlp", "layout", "bit_features")
    save_json(
        common.result_name("qpa_capacity", args, ap, keys),
        {
            "args": vars(args),
            "env": common.environment(args.device),
            "lora_ppl": lora_ppl,
            "before_ppl": before,
            "rows": rows,
            **run,
        },
    )
    if args.append_results:
        append_results(f"""## qpa_capacity

`{command_line()}` ({common.environment(args.device)["date"][:10]}, {args.device}, load average at the end
{load_avg()})

SmolLM2-135M-Instruct, LoRA r={args.r} on {args.targets}, {args.steps} steps as qpa_wikitext.py: perplexity
{before:.3f} -> {lora_ppl:.3f}. Its factors laid out as QPA's {block.shape[0]} x {args.n_mlp} block (layout
{args.layout}), cut to rank k by SVD; "budget": the param_budget whose one-layer mapping MLP (bit features
{args.bit_features}) allows exactly rank k; energy: the share of the block's squared norm kept.

{tab}

`{summary}`""")
    print(summary)


if __name__ == "__main__":
    main()
