"""QPA train step time over LoRA's, on the same model and batch (issue 3).

    .venv/bin/python benchmarks/qpa_step.py [--repeats 15] [--batch-size 4] [--block 128]
        [--targets q_proj,v_proj] [--widths 60] [--threads N] [--device cpu|cuda] [--append-results]

Two copies of SmolLM2-135M in one process, one with LoRA r=4 and one with QPA (r=4, n_mlp 2048, 8 QNN
layers, exact simulator) on the same targets, as in qpa_wikitext.py. A step is what the training loop
does per optimizer step: forward, backward, the before_optimizer_step hook (QPA's one quantum gradient
call per step), AdamW, zero_grad. The two steps run in turns (LoRA, QPA, LoRA, ...) on the same batch
after warmup; the ratio is of the medians. Goal: <= 1.15.
"""

from __future__ import annotations

import common
from common import (
    append_results,
    command_line,
    interleaved,
    lm_batch,
    load_avg,
    ratios,
    save_json,
    table,
    train_step,
)

from qpeft_core import QPAConfig, get_qpeft_model
from qpeft_core.train import load_model, make_lora_model


def main():
    ap = common.parser(__doc__)
    common.step_args(ap)
    ap.add_argument("--r", type=int, default=4)
    ap.add_argument("--widths", default=None, help="mapping MLP hidden widths, as in qpa_wikitext.py")
    args = ap.parse_args()
    common.setup(args)
    targets = args.targets.split(",")

    model, tok = load_model(args.model, device=args.device)
    lora = make_lora_model(model, targets, r=args.r, alpha=2 * args.r)
    model, _ = load_model(args.model, device=args.device)
    widths = {"mapping_widths": [int(w) for w in args.widths.split(",")]} if args.widths else {}
    cfg = QPAConfig(target_modules=targets, r=args.r, lora_alpha=2 * args.r, quantum_grad="per_step", **widths)
    qpa = get_qpeft_model(model, cfg)
    batch = lm_batch(tok, args.data, args.batch_size, args.block, args.device)

    load_start = load_avg()
    t = interleaved({"LoRA": train_step(lora, batch), "QPA": train_step(qpa, batch)}, args.repeats, args.warmup)
    load_end = load_avg()
    rat = ratios(t, "QPA", "LoRA")
    ratio = rat["median_ratio"]
    rows = [
        {
            "method": k,
            "trainable": m.get_nb_trainable_parameters()[0],
            "median_s": t[k]["median_s"],
            "min_s": min(t[k]["all_s"]),
            "max_s": max(t[k]["all_s"]),
        }
        for k, m in (("LoRA", lora), ("QPA", qpa))
    ]
    tab = table(rows, ["method", "trainable", "median_s", "min_s", "max_s"])
    print(tab)
    print(", ".join(f"{k} {v:.3f}" for k, v in rat.items()))
    summary = f"qpa_step step_ratio={ratio:.3f}"
    env = common.environment(args.device)
    save_json(
        "qpa_step",
        {
            "args": vars(args),
            "env": env,
            "rows": rows,
            "times": t,
            "step_ratio": ratio,
            **rat,
            "load_start": load_start,
            "load_end": load_end,
        },
    )
    if args.append_results:
        append_results(f"""## qpa_step

`{command_line()}` ({env["date"][:10]}, {env["device"]}, {env["torch_threads"]} torch threads; load average
1/5/15 min {load_start} at the start, {load_end} at the end)

SmolLM2-135M, targets {args.targets}, rank {args.r}, one batch of {args.batch_size} x {args.block} tokens;
full optimizer step (forward, backward, QPA's per-step quantum gradient, AdamW), {args.repeats} interleaved
repetitions after {args.warmup} warmup rounds, medians.

{tab}

QPA / LoRA: ratio of the medians {ratio:.3f}; of the minima {rat["min_ratio"]:.3f}; median of the per-round
ratios {rat["paired_median_ratio"]:.3f}.

Goal (QPA step / LoRA step <= 1.15): {"met" if ratio <= 1.15 else "NOT met"}.

`{summary}`""")
    print(summary)


if __name__ == "__main__":
    main()
