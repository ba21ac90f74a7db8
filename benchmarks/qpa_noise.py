"""QPA trained under a fake IBM device's noise, with and without readout-error mitigation (issue 17, Noise).

    .venv/bin/python benchmarks/qpa_noise.py [--model tiny-gpt2] [--targets c_attn] [--steps 60] [--batch-size 4]
        [--block 64] [--eval-tokens 4096] [--fake-device FakeManilaV2] [--shots 1000] [--calibration-shots 10000]
        [--n-mlp 64] [--qnn-depth 4] [--lr 2e-2] [--seeds 0,1,2] [--threads 1] [--append-results]

Three runs per seed, alike in everything but the executor: (a) the exact simulator, (b) aer-noisy:<device>
(the device's noise restricted to the qubits in use) and (c) the same with readout_mitigation="mthree". All
three sample --shots shots per circuit and use parameter shift (one gradient call per optimizer step), so they
differ only by the noise and its mitigation. Data: the first blocks of WikiText-2 valid.txt; metric: standard
perplexity on the start of test.txt. Shots are every shot the executor ran, calibration included.
"""

from __future__ import annotations

import statistics
import time

import common
import torch
from common import append_results, command_line, fit, lm_metrics, load_avg, result_name, save_json, table, wikitext

from qpeft_core import QPAConfig, get_qpeft_model
from qpeft_core.quantum.backend import TorchBackend
from qpeft_core.train import load_model

RUNS = ("exact", "noisy", "mitigated")


def main():
    ap = common.parser(__doc__)
    ap.add_argument("--model", default="tiny-gpt2")
    ap.add_argument("--targets", default="c_attn")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--fake-device", default="FakeManilaV2")
    ap.add_argument("--shots", type=int, default=1000)
    ap.add_argument("--calibration-shots", type=int, default=10_000, help="readout_calibration_shots")
    ap.add_argument("--r", type=int, default=4)
    ap.add_argument("--n-mlp", type=int, default=64)
    ap.add_argument("--qnn-depth", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-2)
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args()
    common.setup(args)
    seeds = [int(s) for s in args.seeds.split(",")]
    executors = {
        "exact": ("exact", {}),
        "noisy": (f"aer-noisy:{args.fake_device}", {}),
        "mitigated": (
            f"aer-noisy:{args.fake_device}",
            {"readout_mitigation": "mthree", "readout_calibration_shots": args.calibration_shots},
        ),
    }

    base, tok = load_model(args.model, device=args.device)
    data = wikitext(tok, args.data, args.steps * args.batch_size, args.eval_tokens, args.block)
    before = lm_metrics(base, data, args.eval_tokens)["ppl"]
    print(f"base: ppl={before:.3f}", flush=True)
    rows = []
    for seed in seeds:
        for run in RUNS:
            executor, options = executors[run]
            model, _ = load_model(args.model, device=args.device)
            config = QPAConfig(
                target_modules=args.targets.split(","),
                r=args.r,
                lora_alpha=2 * args.r,
                n_mlp=args.n_mlp,
                qnn_depth=args.qnn_depth,
                executor=executor,
                executor_options=options,
                shots=args.shots,
                gradient="parameter_shift",
                quantum_grad="per_step",
                seed=seed,
            )
            qpa = get_qpeft_model(model, config)
            t0 = time.perf_counter()
            trained = fit(
                qpa,
                tok,
                data["train"],
                steps=args.steps,
                batch_size=args.batch_size,
                lr=args.lr,
                seed=seed,
                device=args.device,
            )
            ppl = lm_metrics(qpa, data, args.eval_tokens)["ppl"]
            method = qpa.method
            usage = method.usage
            # the distribution the adapter's last weights were generated from, against the exact one at the same
            # angles: shot noise alone for the exact run, plus the device's noise (less its readout) for the others
            theta = method.generator.theta.detach()[None]
            exact_p = TorchBackend(method.ansatz, dtype=torch.float64).probabilities(theta).probs[0]
            tvd = 0.5 * (method.probs.detach().double() - exact_p).abs().sum().item()
            rows.append(
                {
                    "run": run,
                    "seed": seed,
                    "executor": executor,
                    "qubits": method.n_qubits,
                    "ppl": ppl,
                    "loss_last": trained["loss_last"],
                    "tvd_final": tvd,
                    "shots": usage.shots,
                    "circuits": usage.circuits,
                    "wall_s": time.perf_counter() - t0,
                }
            )
            print(
                f"seed {seed} {run}: ppl={ppl:.3f} shots={usage.shots:,d} circuits={usage.circuits:,d} "
                f"({rows[-1]['wall_s']:.0f} s, load {load_avg()})",
                flush=True,
            )

    summary = {run: [r for r in rows if r["run"] == run] for run in RUNS}
    means = {
        run: {
            "ppl": statistics.fmean(r["ppl"] for r in rs),
            "ppl_sd": statistics.stdev(r["ppl"] for r in rs) if len(rs) > 1 else 0.0,
            "tvd_final": statistics.fmean(r["tvd_final"] for r in rs),
            "shots": round(statistics.fmean(r["shots"] for r in rs)),
        }
        for run, rs in summary.items()
    }
    columns = ["run", "seed", "executor", "qubits", "ppl", "loss_last", "tvd_final", "shots", "circuits"]
    per_seed = table(rows, [*columns, "wall_s"])
    mean_rows = [
        {
            "run": run,
            "ppl_mean": m["ppl"],
            "ppl_sd": m["ppl_sd"],
            "tvd_final_mean": m["tvd_final"],
            "shots_mean": m["shots"],
        }
        for run, m in means.items()
    ]
    mean_table = table(mean_rows, ["run", "ppl_mean", "ppl_sd", "tvd_final_mean", "shots_mean"])
    print(per_seed)
    print(mean_table)
    line = (
        f"qpa_noise exact_metric={means['exact']['ppl']:.3f} noisy_metric={means['noisy']['ppl']:.3f} "
        f"mitigated_metric={means['mitigated']['ppl']:.3f} metric=ppl seeds={len(seeds)} "
        f"exact_tvd={means['exact']['tvd_final']:.4f} noisy_tvd={means['noisy']['tvd_final']:.4f} "
        f"mitigated_tvd={means['mitigated']['tvd_final']:.4f} "
        f"exact_shots={means['exact']['shots']:.0f} noisy_shots={means['noisy']['shots']:.0f} "
        f"mitigated_shots={means['mitigated']['shots']:.0f} device={args.fake_device}"
    )
    env = common.environment(args.device)
    save_json(
        result_name("qpa_noise", args, ap, ("model", "fake_device", "steps", "seeds", "shots")),
        {"args": vars(args), "env": env, "ppl_before": before, "rows": rows, "means": means},
    )
    if args.append_results:
        append_results(
            f"## qpa_noise\n\n`{command_line()}` ({env['date'][:10]}, {env['device']}, {env['torch_threads']} torch "
            f"thread(s), load average at the end {load_avg()})\n\n"
            f"QPA (r={args.r}, n_mlp {args.n_mlp}, {args.qnn_depth} QNN layers) on {args.model} {args.targets}, "
            f"{args.steps} steps of batch {args.batch_size} x {args.block} tokens of WikiText-2 valid.txt, "
            f"{args.shots} shots per circuit, parameter shift once per step, seeds {args.seeds}; perplexity on "
            f"{args.eval_tokens} tokens of test.txt (before training: {before:.3f}); tvd_final: total variation "
            "distance between the QNN distribution the final adapter was generated from (measured, --shots shots) "
            f"and the exact one at the same angles. noisy: aer-noisy:"
            f"{args.fake_device}; mitigated: the same with mthree ({args.calibration_shots} calibration shots, "
            "balanced: twice that in all, once per run). Shots include the calibration.\n\n"
            f"{mean_table}\n\n{per_seed}\n\n`{line}`"
        )
    print(line)


if __name__ == "__main__":
    main()
