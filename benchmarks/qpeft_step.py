"""Quantum-PEFT train step time over LoRA's, and merged-model inference time over the base model's (issue 4).

    .venv/bin/python benchmarks/qpeft_step.py [--repeats 15] [--batch-size 4] [--block 128] [--targets q_proj,v_proj]
        [--qpeft-r 32] [--qpeft-layers 4] [--threads N] [--device cpu|cuda] [--append-results]

Train step: two copies of SmolLM2-135M in one process, LoRA r=8 and Quantum-PEFT (K=32, L=4, as in
qpeft_causal.py) on the same targets and batch; a step is forward, backward, AdamW, zero_grad (as in the
training loop); the two run in turns after warmup, ratio of the medians (goal <= 1.10). Inference: the
Quantum-PEFT model after those optimizer steps (so Delta W != 0), merged with merge_and_unload(), against a
freshly loaded base model; no-grad forward of the same batch, in turns, ratio of the medians (goal: ~1.0).
"""

from __future__ import annotations

import common
import torch
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

from qpeft_core import QuantumPEFTConfig, get_qpeft_model
from qpeft_core.train import load_model, make_lora_model


def main():
    ap = common.parser(__doc__)
    common.step_args(ap)
    ap.add_argument("--qpeft-r", type=int, default=32, help="K (qpeft_causal.py's default)")
    ap.add_argument("--qpeft-layers", type=int, default=4, help="L (qpeft_causal.py's default)")
    args = ap.parse_args()
    common.setup(args)
    targets = args.targets.split(",")

    model, tok = load_model(args.model, device=args.device)
    lora = make_lora_model(model, targets, r=8, alpha=16)
    model, _ = load_model(args.model, device=args.device)
    qpeft = get_qpeft_model(model, QuantumPEFTConfig(target_modules=targets, r=args.qpeft_r, layers=args.qpeft_layers))
    batch = lm_batch(tok, args.data, args.batch_size, args.block, args.device)

    load_start = load_avg()
    steps = interleaved(
        {"LoRA r=8": train_step(lora, batch), "Quantum-PEFT": train_step(qpeft, batch, lr=1e-2)},
        args.repeats,
        args.warmup,
    )
    del lora
    with torch.no_grad():
        delta = max(float(t.lam.abs().max()) for t in qpeft.method.adapters.values())
    merged = qpeft.merge_and_unload().eval()
    base, _ = load_model(args.model, device=args.device)
    base.eval()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def infer(m):
        def fwd():
            with torch.no_grad():
                m(**inputs)

        return fwd

    infer_t = interleaved({"base": infer(base), "merged": infer(merged)}, args.repeats, args.warmup)
    load_end = load_avg()
    same_type = type(merged) is type(base) and not any("Adapted" in type(x).__name__ for x in merged.modules())
    step_rat, infer_rat = ratios(steps, "Quantum-PEFT", "LoRA r=8"), ratios(infer_t, "merged", "base")
    step_ratio, infer_ratio = step_rat["median_ratio"], infer_rat["median_ratio"]
    rows = [
        {
            "measurement": f"train step, {k}",
            "median_s": v["median_s"],
            "min_s": min(v["all_s"]),
            "max_s": max(v["all_s"]),
        }
        for k, v in steps.items()
    ] + [
        {
            "measurement": f"inference, {k}",
            "median_s": v["median_s"],
            "min_s": min(v["all_s"]),
            "max_s": max(v["all_s"]),
        }
        for k, v in infer_t.items()
    ]
    tab = table(rows, ["measurement", "median_s", "min_s", "max_s"])
    print(tab)
    print(
        f"merged model: {type(merged).__name__}, no adapter layers left: {same_type}; "
        f"max |lambda| after the timed steps: {delta:.3g}"
    )
    print("train step:", ", ".join(f"{k} {v:.3f}" for k, v in step_rat.items()))
    print("inference:", ", ".join(f"{k} {v:.3f}" for k, v in infer_rat.items()))
    summary = f"qpeft_step step_ratio={step_ratio:.3f} merged_infer_ratio={infer_ratio:.3f}"
    env = common.environment(args.device)
    save_json(
        "qpeft_step",
        {
            "args": vars(args),
            "env": env,
            "rows": rows,
            "train_step": steps,
            "inference": infer_t,
            "step_ratio": step_ratio,
            "merged_infer_ratio": infer_ratio,
            "train_step_ratios": step_rat,
            "inference_ratios": infer_rat,
            "plain_model": same_type,
            "load_start": load_start,
            "load_end": load_end,
        },
    )
    if args.append_results:
        append_results(f"""## qpeft_step

`{command_line()}` ({env["date"][:10]}, {env["device"]}, {env["torch_threads"]} torch threads; load average
1/5/15 min {load_start} at the start, {load_end} at the end)

SmolLM2-135M, targets {args.targets}, LoRA r=8 vs Quantum-PEFT K={args.qpeft_r} L={args.qpeft_layers}; one batch of
{args.batch_size} x {args.block} tokens; {args.repeats} interleaved repetitions after {args.warmup} warmup rounds,
medians. Inference: no-grad forward of the merged Quantum-PEFT model (a plain {type(merged).__name__}, no
adapter layers left: {same_type}) against the base model.

{tab}

Ratios (Quantum-PEFT / LoRA; merged / base): of the medians {step_ratio:.3f} / {infer_ratio:.3f}; of the minima
{step_rat["min_ratio"]:.3f} / {infer_rat["min_ratio"]:.3f}; median of the per-round ratios
{step_rat["paired_median_ratio"]:.3f} / {infer_rat["paired_median_ratio"]:.3f}.

Goals: train step ratio <= 1.10 {"met" if step_ratio <= 1.10 else "NOT met"} ({step_ratio:.3f}); merged
inference = base ({infer_ratio:.3f}).

`{summary}`""")
    print(summary)


if __name__ == "__main__":
    main()
