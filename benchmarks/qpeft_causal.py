"""Quantum-PEFT vs LoRA r=8 on SmolLM2-135M, WikiText-2 (issue 4).

    .venv/bin/python benchmarks/qpeft_causal.py [--steps 80] [--batch-size 4] [--block 128]
        [--eval-tokens 4096] [--targets q_proj,v_proj] [--lora-lr ..] [--qpeft-lr ..] [--qpeft-r 32]
        [--qpeft-layers 4] [--seed 0] [--device cpu|cuda] [--append-results]
    .venv/bin/python benchmarks/qpeft_causal.py --tune 1e-2,3e-2 --tune-steps 20 --tune-methods Quantum-PEFT

The setting of qpa_wikitext.py (same data, slices, schedule and loop) with LoRA r=8 (alpha 16) against
Quantum-PEFT (K columns, L Pauli layers, scaling s; 576 = 2^6 x 3^2 and 192 = 2^6 x 3 run as mixed-radix
circuits) on the same targets. Learning rates come from --tune sweeps on the held-out tail of valid.txt.
"""

from __future__ import annotations

import common
from common import append_results, command_line, lm_args, lm_compare, lm_tune, load_avg, save_json, save_tune, table

from qpeft_core import QuantumPEFTConfig, get_qpeft_model
from qpeft_core.train import load_model, make_lora_model


def main():
    ap = common.parser(__doc__)
    lm_args(ap, steps=80, targets="q_proj,v_proj")
    # LoRA's LR: the r=4 sweep of qpa_wikitext.py (same alpha / r = 2); Quantum-PEFT's K, L, scaling: the SST-2
    # sweeps of qpeft_sst2.py; its LR: the sweep in benchmarks/results/qpeft_causal_tune.json
    ap.add_argument("--lora-lr", type=float, default=1e-2)
    ap.add_argument("--qpeft-lr", type=float, default=3e-2)
    ap.add_argument("--qpeft-r", type=int, default=32, help="K, columns of U and V")
    ap.add_argument("--qpeft-layers", type=int, default=4, help="L, entangling layers of each Pauli circuit")
    ap.add_argument("--qpeft-scaling", type=float, default=4.0)
    ap.add_argument("--qpeft-init-std", type=float, default=0.1, help="std of the random angles at init")
    args = ap.parse_args()
    common.setup(args)
    targets = args.targets.split(",")

    def lora():
        model, _ = load_model(args.model, device=args.device)
        return make_lora_model(model, targets, r=8, alpha=16, seed=args.seed)

    def qpeft():
        model, _ = load_model(args.model, device=args.device)
        cfg = QuantumPEFTConfig(
            target_modules=targets,
            r=args.qpeft_r,
            layers=args.qpeft_layers,
            scaling=args.qpeft_scaling,
            init_std=args.qpeft_init_std,
            seed=args.seed,
        )
        return get_qpeft_model(model, cfg)

    builders = {"LoRA r=8": lora, "Quantum-PEFT": qpeft}
    if args.tune:
        tuned = lm_tune(args, builders)
        print(table(tuned["rows"], ["method", "lr", "heldout_ppl", "loss_first", "loss_last", "train_s"]))
        save_tune("qpeft_causal_tune", {"args": vars(args), "env": common.environment(args.device), **tuned})
        print(
            f"qpeft_causal_tune best_lora_lr={tuned['best']['LoRA r=8']} best_qpeft_lr={tuned['best']['Quantum-PEFT']}"
        )
        return

    res = lm_compare(args, builders, {"LoRA r=8": args.lora_lr, "Quantum-PEFT": args.qpeft_lr})
    lo, qp = res["rows"]
    for row in res["rows"]:
        row["fewer_x"] = lo["trainable"] / row["trainable"]
    cols = ["method", "trainable", "fewer_x", *common.LM_COLUMNS]
    tab = table(res["rows"], cols)
    print(tab)
    summary = (
        f"qpeft_causal lora_params={lo['trainable']} qpeft_params={qp['trainable']} "
        f"lora_ppl={lo['ppl_after']:.3f} qpeft_ppl={qp['ppl_after']:.3f}"
    )
    env = common.environment(args.device)
    save_json(
        common.result_name("qpeft_causal", args, ap, ("targets", "steps", "seed")),
        {"args": vars(args), "env": env, **res},
    )
    if args.append_results:
        append_results(f"""## qpeft_causal

`{command_line()}` ({env["date"][:10]}, {env["device"]}, load average at the end {load_avg()})

SmolLM2-135M-Instruct, targets {args.targets} of all 30 layers; LoRA r=8 (alpha 16) vs Quantum-PEFT K={args.qpeft_r},
L={args.qpeft_layers}, s={args.qpeft_scaling:g} (Pauli mapping, mixed radix for 576 and 192);
{args.steps} steps x {args.batch_size} x {args.block} tokens of WikiText-2 valid.txt; perplexity on the first
{res["eval_tokens"]} target tokens of test.txt (standard, padding excluded);
ppl_ref: the QPA reference convention on the same text (lines padded to {args.block}, padding in the loss),
dominated by the padding positions since nothing here trains on padding: compare it only within this table.
train_s is wall time on a shared machine (see the load), not a speed comparison.

{tab}

`{summary}`""")
    print(summary)


if __name__ == "__main__":
    main()
