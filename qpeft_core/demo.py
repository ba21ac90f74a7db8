"""`make demo`: the most complete end-to-end job the project runs today.

1. Trains a QNN to reproduce a target distribution through each executor in turn (exact simulator, Aer
   with shots, a fake IBM device in qiskit-ibm-runtime's local testing mode with its noise), printing
   loss, circuits, shots and time for each. Only the executor changes between the runs.
2. Fine-tunes SmolLM2-135M on WikiText-2 with QPA on the exact executor, prints the parameter counts and
   perplexity before/after, exports the result as a plain PEFT LoRA adapter and generates text from it
   with transformers + peft alone (no quantum software in that step).
3. Trains a Quantum-PEFT adapter on the same model and prints its parameter count beside LoRA's.

`make demo` runs `python -m services.demo`, which runs these three parts (`run` here) and then the same
fine-tune as jobs through the embedded service; `python -m qpeft_core.demo` runs the library parts alone.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from qpeft_core.quantum.ansatz import qpa_ansatz
from qpeft_core.quantum.backend import TorchBackend
from qpeft_core.quantum.gradients import QNN
from qpeft_core.quantum.registry import make_backend

RUNS = [
    # (executor spec, gradient strategy, shots, optimizer steps)
    ("exact", "autograd", None, 80),
    ("aer", "parameter_shift", 1024, 40),
    ("fake-ibm:FakeManilaV2", "parameter_shift", 1024, 15),
]


def fit_distribution(spec, gradient, shots, steps, n_qubits=3, layers=3, seed=0):
    ansatz = qpa_ansatz(n_qubits, layers)
    gen = torch.Generator().manual_seed(seed)
    # A target the ansatz can express exactly, so the exact run can reach zero loss.
    target = TorchBackend(ansatz, dtype=torch.float64).exact_probabilities(
        torch.rand(1, ansatz.n_params, generator=gen, dtype=torch.float64) * 6.28
    )
    thetas = torch.nn.Parameter(torch.rand(1, ansatz.n_params, generator=gen, dtype=torch.float64) * 0.2)
    qnn = QNN(make_backend(spec, ansatz), gradient, shots)
    opt = torch.optim.Adam([thetas], lr=0.1)
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        loss = (qnn(thetas) - target).square().sum()
        loss.backward()
        opt.step()
    elapsed = time.perf_counter() - t0
    with torch.no_grad():
        final = TorchBackend(ansatz, dtype=torch.float64).exact_probabilities(thetas)
    tvd = 0.5 * (final - target).abs().sum().item()
    return {
        "executor": spec,
        "gradient": gradient,
        "shots_per_circuit": shots,
        "steps": steps,
        "final_tvd": tvd,
        "circuits": qnn.usage.circuits,
        "shots": qnn.usage.shots,
        "qpu_s_estimated": qnn.usage.qpu_s_estimated,
        "seconds": elapsed,
    }


def default_data_dir() -> Path:
    return Path(os.environ.get("QPEFT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def finetune(model_name, data_dir, steps, device, out_dir):
    """QPA then Quantum-PEFT on the same base model and data; returns a summary dict."""
    import transformers

    from qpeft_core import QPAConfig, QuantumPEFTConfig, get_qpeft_model
    from qpeft_core.adapters.io import load_peft_lora
    from qpeft_core.train import TrainConfig, evaluate, lm_blocks, load_model, make_lora_model, read_texts, train

    transformers.utils.logging.disable_progress_bar()  # the weight-loading bars drown the demo's output
    wiki = Path(data_dir) / "wikitext-2"
    if not wiki.is_dir():
        raise FileNotFoundError(f"WikiText-2 not found at {wiki}: pass --data DIR (the shared data folder)")
    model, tok = load_model(model_name, device=device)
    train_data = lm_blocks(read_texts(wiki / "valid.txt"), tok, 128, max_tokens=128 * 4 * steps)
    eval_data = lm_blocks(read_texts(wiki / "test.txt"), tok, 128, max_tokens=2048 + 128)
    targets = ["q_proj", "v_proj"] if "llama" in type(model).__name__.lower() else ["c_attn"]
    base_ppl = evaluate(model, eval_data, batch_size=4, max_tokens=2048)["ppl"]
    lora_params = make_lora_model(load_model(model_name, device=device)[0], targets, r=4).get_nb_trainable_parameters()[
        0
    ]

    qpa = get_qpeft_model(
        model, QPAConfig(target_modules=targets, r=4, n_mlp=2048, qnn_depth=8, quantum_grad="per_step")
    )
    qpa_params = qpa.get_nb_trainable_parameters()[0]
    cfg = TrainConfig(max_steps=steps, batch_size=4, lr=2e-3, warmup_steps=2, device=device, progress=False)
    t0 = time.perf_counter()
    train(qpa, tok, train_data, config=cfg)
    qpa_s = time.perf_counter() - t0
    qpa_ppl = evaluate(qpa, eval_data, batch_size=4, max_tokens=2048)["ppl"]
    lora_dir = Path(out_dir) / "qpa-lora-export"
    qpa.export_lora(lora_dir)

    # Inference from the exported adapter with plain transformers + peft: no qpeft, no quantum executor.
    fresh, _ = load_model(model_name, device=device)
    plain = load_peft_lora(fresh, lora_dir).eval()
    prompt = tok("The history of the city", return_tensors="pt").to(device)
    with torch.no_grad():
        ids = plain.generate(**prompt, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
    sample = tok.decode(ids[0], skip_special_tokens=True)

    qp_model, _ = load_model(model_name, device=device)
    qp = get_qpeft_model(qp_model, QuantumPEFTConfig(target_modules=targets, r=8, layers=1))
    qp_params = qp.get_nb_trainable_parameters()[0]
    lora8_params = make_lora_model(
        load_model(model_name, device=device)[0], targets, r=8
    ).get_nb_trainable_parameters()[0]
    t0 = time.perf_counter()
    # lambda starts at 0 on orthonormal columns: it needs a larger step than LoRA (see benchmarks/RESULTS.md)
    train(
        qp, tok, train_data, config=TrainConfig(max_steps=steps, batch_size=4, lr=3e-2, device=device, progress=False)
    )
    qp_s = time.perf_counter() - t0
    qp_ppl = evaluate(qp, eval_data, batch_size=4, max_tokens=2048)["ppl"]
    return dict(
        base_ppl=base_ppl,
        lora_params=lora_params,
        qpa_params=qpa_params,
        qpa_ppl=qpa_ppl,
        qpa_s=qpa_s,
        lora_dir=str(lora_dir),
        sample=sample,
        lora8_params=lora8_params,
        qp_params=qp_params,
        qp_ppl=qp_ppl,
        qp_s=qp_s,
        qpa_usage=qpa.method.usage if hasattr(qpa, "method") else None,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (for smoke tests)")
    parser.add_argument("--model", default="smollm2-135m", help="base model for the fine-tune part")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps of each fine-tune")
    parser.add_argument("--data", default=None, help="the shared data folder (default: ../shared/data)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="where the exported adapter goes (default: a temp dir)")
    return parser


def run(args) -> tuple[list, dict]:
    """The library parts (1-3), printing as they go; returns the executor rows and the fine-tune figures."""
    print("== QNN fit of a target distribution (3 qubits, 3 layers) through each executor ==")
    print(
        f"{'executor':24} {'gradient':16} {'steps':>5} {'TVD':>7} {'circuits':>9} {'shots':>10} "
        f"{'QPU s est':>9} {'time s':>7}"
    )
    rows = []
    for spec, gradient, shots, steps in RUNS:
        row = fit_distribution(spec, gradient, shots, max(3, steps // 5) if args.quick else steps)
        rows.append(row)
        qpu = "-" if row["qpu_s_estimated"] is None else f"{row['qpu_s_estimated']:.2f}"
        print(
            f"{spec:24} {gradient:16} {row['steps']:5d} {row['final_tvd']:7.4f} {row['circuits']:9d} "
            f"{row['shots']:10d} {qpu:>9} {row['seconds']:7.2f}"
        )
    print("TVD: total variation distance of the trained circuit's exact distribution from the target.")

    steps = max(2, args.steps // 10) if args.quick else args.steps
    out = args.out or tempfile.mkdtemp(prefix="qpeft-demo-")
    print(f"\n== {args.model}: QPA fine-tune on WikiText-2, {steps} steps, exact executor ({args.device}) ==")
    r = finetune(args.model, args.data or default_data_dir(), steps, args.device, out)
    print(
        f"trainable parameters: QPA {r['qpa_params']:,} vs LoRA r=4 {r['lora_params']:,} "
        f"({100 * r['qpa_params'] / r['lora_params']:.1f}%)"
    )
    print(
        f"perplexity (WikiText-2 test, 2,048 tokens): before {r['base_ppl']:.2f}, after QPA {r['qpa_ppl']:.2f} "
        f"({r['qpa_s']:.0f} s of training)"
    )
    print(f"exported LoRA adapter: {r['lora_dir']}")
    print(f"generated with transformers + peft from the export: {r['sample']!r}")
    print(f"\n== {args.model}: Quantum-PEFT (K=8, L=1), same data and steps ==")
    print(
        f"trainable parameters: Quantum-PEFT {r['qp_params']:,} vs LoRA r=8 {r['lora8_params']:,} "
        f"({r['lora8_params'] / r['qp_params']:.0f}x fewer)"
    )
    print(f"perplexity after Quantum-PEFT: {r['qp_ppl']:.2f} ({r['qp_s']:.0f} s of training)")
    r["steps"] = steps
    return rows, r


def main(argv=None):
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
