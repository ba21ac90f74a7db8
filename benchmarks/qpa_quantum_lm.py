"""What QPA's QNN contributes on a causal LM: qpa_quantum.py's ablation on SmolLM2-135M, WikiText-2 (issue 16).

    .venv/bin/python benchmarks/qpa_quantum_lm.py [--seeds 0,1,2] [--steps 25] [--eval-tokens 4096]
        [--variants qpa,frozen,constant,lora_same,lora_r4] [--same-r 2] [--tag NAME]
        [qpa_wikitext.py's QPA and LoRA options: --qpa-lr, --lora-lr, --n-mlp, ...] [--threads 1] [--append-results]

The setting of qpa_wikitext.py: its data slices, targets (q_proj,v_proj), QPA configuration, loop, schedule and
learning rates (from its sweeps: --qpa-lr for every QPA variant, --lora-lr for every LoRA), with the variants
of qpa_quantum.py:
- qpa: QPA as qpa_wikitext.py configures it (exact simulator, QNN angles trained);
- frozen: the same, the QNN's angles kept at their random init;
- constant: the same, the QNN's output replaced by the uniform distribution (no executor; p~ = 0 everywhere);
- random_p: the same, the QNN's output replaced by a fixed classical random distribution (no executor);
- lora_same: LoRA at about QPA's trainable count (--same-r 2: 115,200 against QPA's ~123k; rank 3 is 172,800);
- lora_r<N>: LoRA at rank N; lora_r4 is qpa_wikitext.py's baseline.
One run per variant and seed of 2 x --steps steps (linear decay after a 10% warmup over the whole run, clipping
at 1) on the first 2 x steps x batch packed blocks of valid.txt, with the standard perplexity on the first
--eval-tokens targets of test.txt at --steps (horizon 1, mid-schedule) and at the end (horizon 2).
"""

from __future__ import annotations

import re
import statistics

import common
from common import adapter_params, append_results, command_line, load_avg, save_json, table

from qpeft_core.train import evaluate, load_model


def build(variant: str, seed: int, args):
    if variant == "lora_same":
        return common.lm_lora(args, seed, args.same_r)
    if m := re.fullmatch(r"lora_r(\d+)", variant):
        return common.lm_lora(args, seed, int(m[1]))
    return common.qpa_ablate(common.lm_qpa(args, seed), variant, seed)


def main():
    ap = common.parser(__doc__)
    common.lm_args(ap, steps=25, targets="q_proj,v_proj", one_run=False)
    common.lm_adapter_args(ap)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--variants", default="qpa,frozen,constant,lora_same,lora_r4")
    ap.add_argument("--same-r", type=int, default=2, help="lora_same's rank")
    ap.add_argument("--tag", default="", help="a suffix for the result file and RESULTS.md section")
    args = ap.parse_args()
    common.setup(args)
    variants, seeds = args.variants.split(","), [int(s) for s in args.seeds.split(",")]
    for v in variants:
        if not (v == "qpa" or v in common.ABLATIONS or v == "lora_same" or re.fullmatch(r"lora_r\d+", v)):
            raise SystemExit(f"--variants: unknown {v!r}")
    h1, h2 = args.steps, 2 * args.steps
    name = "qpa_quantum_lm" + (f"_{args.tag}" if args.tag else "")
    env = common.environment(args.device)

    base, tok = load_model(args.model, device=args.device)
    data = common.wikitext(tok, args.data, h2 * args.batch_size, args.eval_tokens, args.block)
    ppl_base = evaluate(base, data["test"], 4, max_tokens=args.eval_tokens)["ppl"]
    print(f"base ppl={ppl_base:.3f} (load {load_avg()})", flush=True)
    del base

    results, info = [], {}
    for seed in seeds:
        for v in variants:
            model = build(v, seed, args)
            lora = v.startswith("lora")
            if not lora:
                info = common.qpa_info(model)
            lr = args.lora_lr if lora else args.qpa_lr
            run = common.fit(
                model,
                tok,
                data["train"],
                steps=h2,
                batch_size=args.batch_size,
                lr=lr,
                seed=seed,
                device=args.device,
                lr_scale=None if lora else common.parse_lr_scale(args.qpa_lr_scale),
                eval_data=data["test"],
                eval_every=h1,
                eval_tokens=args.eval_tokens,
            )
            ppl = run.pop("ppl")
            row = {"variant": v, "seed": seed, "lr": lr, "trainable": adapter_params(model)}
            row.update({f"ppl@{s}": p for s, p in sorted(ppl.items())}, **run, load_avg=load_avg())
            row["qnn_calls"] = {} if lora else dict(model.method.calls)
            results.append(row)
            print(
                f"{v} seed={seed} lr={lr:g} trainable={row['trainable']:,d} "
                + " ".join(f"ppl@{s}={p:.3f}" for s, p in sorted(ppl.items()))
                + f" step_s={run['step_s']:.2f} train_s={run['train_s']:.0f} (load {load_avg()})",
                flush=True,
            )
            del model

    keys = [f"ppl@{h1}", f"ppl@{h2}"]
    summary_rows, gaps, means = common.ablation_tables(
        results,
        variants,
        keys,
        gap=lambda qpa, it: 100 * (it - qpa) / qpa,
        gap_col=lambda k: f"(it - qpa) / qpa @{k[4:]} (%)",
        digits=3,
    )
    for row in summary_rows:
        mine = [r for r in results if r["variant"] == row["variant"]]
        row.update(trainable=mine[0]["trainable"], lr=mine[0]["lr"])
        row["step_s"] = statistics.fmean(r["step_s"] for r in mine)
        row["train_s"] = statistics.fmean(r["train_s"] for r in mine)
    tab = table(summary_rows, ["variant", "trainable", "lr", *keys, "step_s", "train_s"])
    gap_tab = table(gaps, ["variant", *(f"(it - qpa) / qpa @{h} (%)" for h in (h1, h2))]) if gaps else ""
    print(tab)
    print(gap_tab)

    end = keys[1]
    # the quantum_gap, in perplexity: what freezing the QNN at init costs (positive = training it helps)
    qgap = None
    if ("qpa", end) in means and ("frozen", end) in means:
        qgap = 100 * (means[("frozen", end)] - means[("qpa", end)]) / means[("qpa", end)]
    shown = ["qpa", "frozen", "constant", "lora_same", "lora_r4"]
    shown += [v for v in variants if v not in shown]
    summary = f"{name} " + " ".join(f"{v}={means[(v, end)]:.3f}" if (v, end) in means else f"{v}=-" for v in shown)
    summary += f" quantum_gap={qgap:+.2f}%" if qgap is not None else " quantum_gap=-"
    save_json(
        name,
        {
            "args": vars(args),
            "env": env,
            "ppl_base": ppl_base,
            "qpa": info,
            "rows": results,
            "summary": summary_rows,
            "gaps": gaps,
            "quantum_gap_pct": qgap,
        },
    )
    if args.append_results:
        widths = f"widths {info['widths']}, " if info else ""
        append_results(f"""## {name}

`{command_line()}` ({env["date"][:10]}, {env["device"]}, {env["torch_threads"]} torch thread(s), load average at
the end {load_avg()})

SmolLM2-135M on WikiText-2 as qpa_wikitext.py: targets {args.targets}, {h2} steps x {args.batch_size} x
{args.block} tokens of valid.txt per run, one run per variant and seed (seeds {args.seeds}), standard
perplexity on the first {args.eval_tokens} targets of test.txt at step {h1} (mid-schedule) and {h2} (end); base
model {ppl_base:.3f}. QPA: generated rank {args.qpa_r or args.r}, n_mlp {args.n_mlp}, {args.qnn_depth} QNN blocks,
{widths}bit_features {args.bit_features}, exact simulator, lr {args.qpa_lr:g} for all its variants; LoRA lr
{args.lora_lr:g}, lora_same rank {args.same_r}. step_s: median seconds per training step; train_s: each run's
wall time with its two evaluations, on a shared machine.

{tab}

Gap each variant opens against QPA trained (mean ± std over seeds of the per-seed relative perplexity
difference; positive = QPA trained is better):

{gap_tab}

`{summary}`""")
    print(summary)


if __name__ == "__main__":
    main()
