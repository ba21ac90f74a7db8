"""QPA circuit simulation: ours against PennyLane, Qiskit Aer and plain torch, forward and forward+backward.

    .venv/bin/python benchmarks/qnn_sim.py [--n 10 14 18 20] [--layers 8] [--repeats 5] [--device cpu]
        [--dtype float32] [--threads N] [--max-seconds-per-case 30] [--append-results]

Workload: `qpa_ansatz(n, L)` (RY on every qubit + CNOT ladder, L blocks), one parameter set, loss =
dot(probabilities, v) for a fixed random v. Implementations, all in the same run:
- ours: `qpeft_core.quantum.simulator.probabilities` + its adjoint backward;
- torch-naive: `qpeft_core.quantum.naive.naive_probabilities`, one torch op per gate, autograd;
- pl-default-backprop: PennyLane default.qubit, torch interface, diff_method="backprop";
- pl-lightning-adjoint: PennyLane lightning.qubit, diff_method="adjoint"; adjoint does not take
  qml.probs, so the loss is expval(SparseHamiltonian(diag(v))), the exact same number;
- aer-statevector: Qiskit Aer statevector on `to_qiskit(ansatz)`; its gradient is parameter shift, the
  2 n L shifted circuits (+ the unshifted one) in one batched run.
Our wire q is PennyLane's wire n-1-q, so every implementation's probability vector has our index order;
the first (untimed) run of each is checked against ours. Times are medians over --repeats (ms). A case
whose estimated run time (scaled from the next smaller n: 2^dn, and n for parameter shift) does not fit
--max-seconds-per-case is skipped with the reason printed. Memory: "graph" = bytes of the tensors the
torch autograd graph saves (unique storages), for the torch-based implementations; "rss" = peak rise of
the process RSS during one forward+backward, sampled every millisecond, for the others. Ours runs in this
process, each anchor in a process of its own (Aer and lightning bring their own OpenMP pools, whose
spinning threads would stall torch's); ours is also timed at chunk sizes 2..6 (`fuse`). --threads N pins
torch and OpenMP threads everywhere; the default leaves them as they are.

Floor estimate, from the arithmetic and bytes the gates need (minimal algorithm):
- flops: an RY touches every amplitude pair once (4 mul + 2 add per pair): 3 flops per amplitude per
  qubit, so the forward is F = 3 n 2^n L; the CNOTs are a permutation (no flops). The adjoint backward
  un-computes psi and lambda (2 F) and takes one inner product per angle (2 flops per amplitude per
  qubit), so forward+backward = 11 n 2^n L flops.
- bytes: per block, the fused RY layer reads and writes the state once and the permutation moves it once:
  4 s 2^n per block (s = bytes per real amplitude) forward, twice that backward (psi and lambda):
  12 s 2^n L forward+backward.
- floor = max(flops / GEMM rate, bytes / copy rate), with this machine's best float GEMM GFLOP/s (small,
  in-cache, and large sizes, measured at start) and its memory-copy GB/s (read + write) at the state's
  size, at least 1 MiB (below that, call overhead dominates the copy). Both rates are the best of
  repeated calls: what the machine can do, not what it did under load.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qpeft_core.quantum import simulator  # noqa: E402
from qpeft_core.quantum.ansatz import qpa_ansatz, to_qiskit  # noqa: E402
from qpeft_core.quantum.naive import naive_probabilities  # noqa: E402

ROOT = Path(__file__).resolve().parent
ANCHORS = ("torch-naive", "pl-default-backprop", "pl-lightning-adjoint", "aer-statevector")
# max abs error relative to the largest entry; lightning's expval comes back as float32 even with
# c_dtype=complex128 (errors ~3e-8), hence the float64 bound
TOL = {torch.float32: 2e-3, torch.float64: 1e-6}


# ---------------------------------------------------------------- implementations
# Each maker returns (fwd, fwd_bwd, torch_based): fwd(thetas) -> probabilities (or the loss, for
# lightning's expval) as numpy; fwd_bwd(thetas) -> (loss, gradient) as numpy. thetas: torch [P] tensor.


def make_ours(ansatz, v, fuse):
    def fwd(th):
        with torch.no_grad():
            return simulator.probabilities(ansatz, th[None], fuse)[0]

    def fwd_bwd(th):
        t = th.detach().requires_grad_(True)
        loss = simulator.probabilities(ansatz, t[None], fuse)[0] @ v
        loss.backward()
        return loss.detach(), t.grad

    return fwd, fwd_bwd, True


def make_naive(ansatz, v):
    def fwd(th):
        with torch.no_grad():
            return naive_probabilities(ansatz, th[None])[0]

    def fwd_bwd(th):
        t = th.detach().requires_grad_(True)
        loss = naive_probabilities(ansatz, t[None])[0] @ v
        loss.backward()
        return loss.detach(), t.grad

    return fwd, fwd_bwd, True


def _pl_ops(qml, ansatz, params):
    n = ansatz.n_qubits
    for g in ansatz.gates:
        wires = [n - 1 - q for q in g.wires]  # PennyLane's wire 0 is the most significant bit
        if g.name == "ry":
            qml.RY(params[g.param], wires=wires[0])
        elif g.name == "cx":
            qml.CNOT(wires=wires)
        else:
            qml.CZ(wires=wires)


def make_pl_default(ansatz, v):
    import pennylane as qml

    @qml.qnode(qml.device("default.qubit", wires=ansatz.n_qubits), interface="torch", diff_method="backprop")
    def probs(params):
        _pl_ops(qml, ansatz, params)
        return qml.probs(wires=range(ansatz.n_qubits))

    def fwd(th):
        with torch.no_grad():
            return probs(th)

    def fwd_bwd(th):
        t = th.detach().requires_grad_(True)
        loss = probs(t) @ v.to(torch.float64)  # default.qubit computes in complex128 whatever the input dtype
        loss.backward()
        return loss.detach(), t.grad

    return fwd, fwd_bwd, True


def make_pl_lightning(ansatz, v):
    import pennylane as qml
    import scipy.sparse as sp

    n = ansatz.n_qubits
    c_dtype = np.complex64 if v.dtype == torch.float32 else np.complex128
    dev = qml.device("lightning.qubit", wires=n, c_dtype=c_dtype)
    ham = qml.SparseHamiltonian(sp.csr_matrix(sp.diags(v.double().cpu().numpy())), wires=range(n))

    @qml.qnode(dev, interface="torch", diff_method="adjoint")
    def loss_fn(params):
        _pl_ops(qml, ansatz, params)
        return qml.expval(ham)

    def fwd(th):
        with torch.no_grad():
            return loss_fn(th.cpu())

    def fwd_bwd(th):
        t = th.detach().cpu().requires_grad_(True)
        loss = loss_fn(t)
        loss.backward()
        return loss.detach(), t.grad

    return fwd, fwd_bwd, False


def make_aer(ansatz, v):
    from qiskit_aer import AerSimulator

    qc, theta = to_qiskit(ansatz)
    qc.save_probabilities()
    threads = int(os.environ.get("OMP_NUM_THREADS", "0"))  # 0: Aer's default, all cores
    precision = "single" if v.dtype == torch.float32 else "double"
    sim = AerSimulator(method="statevector", precision=precision, max_parallel_threads=threads)
    vn = v.double().cpu().numpy()

    def run(points):  # [K, P] angle sets -> [K, 2^n] probabilities, one batched job
        binds = [{theta[i]: list(points[:, i]) for i in range(points.shape[1])}]
        res = sim.run(qc, parameter_binds=binds).result()
        return np.stack([np.asarray(res.data(k)["probabilities"]) for k in range(points.shape[0])])

    def fwd(th):
        return run(th.double().cpu().numpy()[None])[0]

    def fwd_bwd(th):
        x = th.double().cpu().numpy()
        shift = np.eye(x.size) * (np.pi / 2)
        losses = run(np.concatenate([x[None], x + shift, x - shift])) @ vn
        P = x.size
        return losses[0], (losses[1 : P + 1] - losses[P + 1 :]) / 2

    return fwd, fwd_bwd, False


# ---------------------------------------------------------------- measurement helpers


def _np(x):
    return x.detach().double().cpu().numpy() if torch.is_tensor(x) else np.asarray(x, dtype=np.float64)


def max_rel_err(a, ref):
    a, ref = _np(a).ravel(), _np(ref).ravel()
    return float(np.abs(a - ref).max() / max(np.abs(ref).max(), 1e-30))


def timed(fn, arg, repeats, sync):
    """(median, min) of `repeats` calls, in ms."""
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn(arg)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, min(times) * 1e3


def graph_bytes(fn, th):
    """Bytes of the unique storages the autograd graph saves while fn(th) runs."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(th)
    return sum(seen.values())


def rss_peak_delta(fn, arg):
    """Peak rise of the process RSS while fn(arg) runs, sampled every millisecond (Linux /proc)."""

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    base, peak, done = rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    th = threading.Thread(target=sample)
    th.start()
    try:
        fn(arg)
    finally:
        done.set()
        th.join()
    return max(peak[0], rss()) - base


def best_seconds(fn, sync, seconds):
    """Fastest of repeated calls within `seconds`: the machine's capability, not its current noise."""
    fn()
    best, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def gemm_gflops(size, dtype, device, sync, seconds=0.5):
    a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
    return 2 * size**3 / best_seconds(lambda: a @ b, sync, seconds) / 1e9


def copy_gbs(nbytes, dtype, device, sync, seconds=0.5):
    """Memory-copy rate, counting the bytes read and written."""
    x = torch.randn(max(1, nbytes // (torch.finfo(dtype).bits // 8)), dtype=dtype, device=device)
    y = torch.empty_like(x)
    return 2 * x.numel() * x.element_size() / best_seconds(lambda: y.copy_(x), sync, seconds) / 1e9


def floor_ms(n, L, elem, gflops, gbs):
    flops = 11 * n * 2**n * L
    nbytes = 12 * elem * 2**n * L
    return max(flops / gflops / 1e6, nbytes / gbs / 1e6), flops, nbytes


# ---------------------------------------------------------------- runs


def run_impl(name, args, refs):
    """Check and time one implementation at every n; `refs` holds ours' outputs (filled when name is ours)."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    makers = {
        "ours": lambda a, v: make_ours(a, v, args.fuse),
        "torch-naive": make_naive,
        "pl-default-backprop": make_pl_default,
        "pl-lightning-adjoint": make_pl_lightning,
        "aer-statevector": make_aer,
    }
    budget, rows, last = args.max_seconds_per_case, [], {}
    for n in args.n:
        ansatz = qpa_ansatz(n, args.layers)
        gen = torch.Generator().manual_seed(n)  # the same v and angles in every process
        v = torch.randn(ansatz.dim, generator=gen, dtype=torch.float64).to(device, dtype)
        thetas = (torch.rand(ansatz.n_params, generator=gen, dtype=torch.float64) * 2 * math.pi).to(device, dtype)
        row = {"n": n, "impl": name}
        rows.append(row)
        try:
            fwd, fwd_bwd, torch_based = makers[name](ansatz, v)
        except ImportError as e:
            row["skipped"] = f"not installed: {e.name}"
            print(f"  n={n} {name}: skipped ({row['skipped']})", flush=True)
            continue
        for mode, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
            scale = n if (name, mode) == ("aer-statevector", "fwd_bwd") else 1  # 2 n L shifted circuits
            if (name, mode) in last:
                n0, ms0, s0, mem0 = last[(name, mode)]
                est, mem = ms0 / 1e3 * 2 ** (n - n0) * scale / s0, mem0 * 2 ** (n - n0)
                if 2 * est > budget:  # the check run and one timed run must fit
                    row[f"{mode}_skipped"] = f"~{est:.0f} s per run (from n={n0}) > budget {budget:.0f} s / 2"
                elif mem > args.max_mem_gb * 2**30:
                    row[f"{mode}_skipped"] = f"~{mem / 2**30:.1f} GiB (from n={n0}) > --max-mem-gb"
                if f"{mode}_skipped" in row:
                    print(f"  n={n} {name} {mode}: skipped, {row[f'{mode}_skipped']}", flush=True)
                    continue
            sync()
            t0 = time.perf_counter()
            out = fn(thetas)  # first run: the correctness check, untimed
            sync()
            first = time.perf_counter() - t0
            if name == "ours":
                refs[(n, mode)] = out
            elif (n, "fwd_bwd") in refs:
                ref = refs.get((n, mode))
                if mode == "fwd_bwd":
                    err = max(max_rel_err(out[0], ref[0]), max_rel_err(out[1], ref[1]))
                else:  # lightning's forward is the loss itself
                    err = max_rel_err(out, refs[(n, "fwd_bwd")][0] if np.ndim(_np(out)) == 0 else ref)
                row[f"{mode}_err"] = err
                if err > TOL[dtype]:
                    raise SystemExit(f"n={n} {name} {mode} disagrees with ours: max rel error {err:.2e}")
            reps = max(1, min(args.repeats, int(budget / max(first, 1e-9)) - 1))
            row[mode + "_ms"], row[mode + "_min_ms"] = timed(fn, thetas, reps, sync)
            row[mode + "_repeats"] = reps
            if mode == "fwd_bwd":
                measure = graph_bytes if torch_based else rss_peak_delta
                row["mem_bytes"], row["mem_kind"] = measure(fwd_bwd, thetas), "graph" if torch_based else "rss"
            last[(name, mode)] = (n, row[mode + "_ms"], scale, row.get("mem_bytes", 0))
        fb = f"{row['fwd_bwd_ms']:.2f} ms" if "fwd_bwd_ms" in row else "skipped"
        print(f"  n={n} {name}: fwd {row.get('fwd_ms', float('nan')):.2f} ms, fwd+bwd {fb}", flush=True)
    return rows


def fuse_sweep(args, sync):
    """Our fwd+bwd median (ms) for each chunk size 2..6: how DEFAULT_FUSE was chosen."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    out = {}
    for n in args.n:
        ansatz = qpa_ansatz(n, args.layers)
        v = torch.randn(ansatz.dim, dtype=dtype, device=device)
        thetas = torch.rand(ansatz.n_params, dtype=dtype, device=device) * 2 * math.pi
        out[n] = {}
        for fuse in range(2, 7):
            fb = make_ours(ansatz, v, fuse)[1]
            fb(thetas)
            out[n][fuse] = timed(fb, thetas, args.repeats, sync)[0]
        best = min(out[n], key=out[n].get)
        print(f"  fuse sweep n={n}: " + ", ".join(f"{f}: {ms:.2f}" for f, ms in out[n].items()) + f" ms; best {best}")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[10, 14, 18, 20])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--fuse", type=int, default=simulator.DEFAULT_FUSE)
    ap.add_argument("--threads", type=int, help="torch and OpenMP threads for every implementation (default: as is)")
    ap.add_argument("--max-seconds-per-case", type=float, default=30.0)
    ap.add_argument("--max-mem-gb", type=float, default=4.0, help="skip a case whose memory would exceed this")
    ap.add_argument("--impls", nargs="+", default=list(ANCHORS), help="anchors to run; ours always runs")
    ap.add_argument("--out", default=str(ROOT / "results" / "qnn_sim.json"))
    ap.add_argument("--append-results", action="store_true", help="append a ## qnn_sim section to RESULTS.md")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one anchor, refs and rows via files
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:  # OMP_NUM_THREADS reaches the workers' lightning and Aer before they load OpenMP
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if args.worker:
        rows = run_impl(args.worker, args, torch.load(args.out + ".refs", weights_only=False))
        Path(args.out + f".{args.worker}.rows").write_text(json.dumps(rows))
        return
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    elem = torch.finfo(dtype).bits // 8
    L, budget = args.layers, args.max_seconds_per_case
    print(f"qnn_sim: QPA L={L}, loss=dot(probs, v), batch 1, {args.dtype}, device={device}, fuse={args.fuse}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}")
    print(f"torch threads {torch.get_num_threads()}; median of {args.repeats} runs, budget {budget:.0f} s per case")

    rates = {"gemm_gflops": {s: gemm_gflops(s, dtype, device, sync) for s in (256, 2048)}}
    # memory rate for n: copy at the state's size, at least 1 MiB (below that, call overhead dominates)
    sizes = {"1MiB": 1 << 20, "256MiB": 256 << 20} | {f"state_n{n}": elem << n for n in args.n if elem << n > 1 << 20}
    rates["copy_gbs"] = {k: copy_gbs(b, dtype, device, sync) for k, b in sizes.items()}
    peak = max(rates["gemm_gflops"].values())
    gemm_txt = ", ".join(f"{s}x{s}: {r:.0f}" for s, r in rates["gemm_gflops"].items())
    print(f"GEMM GFLOP/s ({args.dtype}): {gemm_txt}")
    print("copy GB/s (read+write): " + ", ".join(f"{k}: {r:.0f}" for k, r in rates["copy_gbs"].items()))

    # Each anchor runs in its own process: Aer and lightning bring their own OpenMP thread pools, whose
    # spinning threads otherwise stall torch's on a small machine (seconds per call on 2 cores).
    refs = {}
    cases = run_impl("ours", args, refs)
    sweep = fuse_sweep(args, sync)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(refs, args.out + ".refs")
    for name in (a for a in args.impls if a != "ours"):
        sys.stdout.flush()
        cmd = [sys.executable, __file__, *sys.argv[1:], "--worker", name, "--out", args.out]
        if subprocess.run(cmd).returncode:
            raise SystemExit(f"{name} failed")
        rows_file = Path(args.out + f".{name}.rows")
        cases += json.loads(rows_file.read_text())
        rows_file.unlink()
    Path(args.out + ".refs").unlink()
    floors = {}
    for n in args.n:
        bw = rates["copy_gbs"].get(f"state_n{n}", rates["copy_gbs"]["1MiB"])
        fl, flops, nbytes = floor_ms(n, L, elem, peak, bw)
        floors[n] = {"floor_ms": fl, "flops": flops, "bytes": nbytes}

    # ratios to the fastest anchor, per n and mode
    print()
    header = f"{'n':>3} {'implementation':<22} {'fwd ms':>10} {'fwd+bwd ms':>11} {'x fastest':>10} {'memory':>16}"
    print(header)
    print("-" * len(header))
    summary = {}
    for n in args.n:
        rows = [r for r in cases if r["n"] == n]
        for mode in ("fwd", "fwd_bwd"):
            timed_anchors = [r for r in rows if r["impl"] in ANCHORS and mode + "_ms" in r]
            best = min(timed_anchors, key=lambda r: r[mode + "_ms"], default=None)
            for r in rows:
                if best and mode + "_ms" in r:
                    r[mode + "_vs_fastest_anchor"] = r[mode + "_ms"] / best[mode + "_ms"]
            if best:
                summary.setdefault(n, {})[mode] = (best["impl"], best[mode + "_ms"])
        for r in rows:
            mem = f"{r['mem_bytes'] / 2**20:.1f} MiB {r['mem_kind']}" if "mem_bytes" in r else "-"
            fwd, fb = (f"{r[k]:.2f}" if k in r else "skip" for k in ("fwd_ms", "fwd_bwd_ms"))
            ratio = f"{r['fwd_bwd_vs_fastest_anchor']:.2f}" if "fwd_bwd_vs_fastest_anchor" in r else "-"
            print(f"{n:>3} {r['impl']:<22} {fwd:>10} {fb:>11} {ratio:>10} {mem:>16}")
    print("\nx fastest = fwd+bwd time / the fastest anchor's fwd+bwd time at that n")
    print("\nfloor (max of flops / GEMM rate, bytes / copy rate; see the docstring):")
    for n in args.n:
        ours = next((r for r in cases if r["n"] == n and r["impl"] == "ours" and "fwd_bwd_ms" in r), None)
        f = floors[n]
        if ours:
            f["ours_over_floor"] = ours["fwd_bwd_ms"] / f["floor_ms"]
        print(
            f"  n={n}: {f['flops'] / 1e6:.1f} MFLOP, {f['bytes'] / 2**20:.1f} MiB -> floor {f['floor_ms']:.3f} ms; "
            f"ours fwd+bwd / floor = {f.get('ours_over_floor', float('nan')):.1f}"
        )

    result = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["benchmarks/qnn_sim.py", *sys.argv[1:]]),
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "platform": platform.platform(),
        },
        "args": vars(args),
        "rates": rates,
        "floors": floors,
        "fuse_sweep_fwd_bwd_ms": sweep,
        "cases": cases,
    }
    n_key = 18 if 18 in args.n else args.n[-1]
    ours = next((r for r in cases if r["n"] == n_key and r["impl"] == "ours"), {})
    name, ms = summary.get(n_key, {}).get("fwd_bwd", ("none", float("nan")))
    ours_ms = ours.get("fwd_bwd_ms", float("nan"))
    result["summary"] = (
        f"qnn_sim n={n_key} fwd_bwd_ms={ours_ms:.2f} fastest_anchor={name} anchor_ms={ms:.2f} "
        f"speedup={ms / ours_ms:.2f}"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"\nwrote {out}")
    if args.append_results:
        append_results(result)
    print(result["summary"])


def append_results(result):
    """Append a `## qnn_sim` section to benchmarks/RESULTS.md (other benchmarks append to the same file)."""
    lines = [
        "## qnn_sim",
        "",
        f"`.venv/bin/python {result['command']}` ({result['date']}, {result['machine']['cpus']} CPUs, "
        f"{result['machine']['torch_threads']} torch threads, torch {result['machine']['torch']}; "
        "shared machine, timings noisy)",
        "",
        "| n | implementation | fwd ms | fwd+bwd ms | fwd+bwd / fastest anchor | memory |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(result["cases"], key=lambda r: r["n"]):
        fwd, fb = (f"{r[k]:.2f}" if k in r else "skipped" for k in ("fwd_ms", "fwd_bwd_ms"))
        mem = f"{r['mem_bytes'] / 2**20:.1f} MiB ({r['mem_kind']})" if "mem_bytes" in r else "-"
        ratio = f"{r['fwd_bwd_vs_fastest_anchor']:.2f}" if "fwd_bwd_vs_fastest_anchor" in r else "-"
        lines.append(f"| {r['n']} | {r['impl']} | {fwd} | {fb} | {ratio} | {mem} |")
    g = result["rates"]["gemm_gflops"]
    lines += [
        "",
        "Memory: graph = bytes the torch autograd graph saves; rss = peak RSS rise during one fwd+bwd.",
        "Skipped: "
        + (
            "; ".join(
                f"n={r['n']} {r['impl']} {k[:-8]}: {v}"
                for r in result["cases"]
                for k, v in r.items()
                if k.endswith("skipped")
            )
            or "none"
        )
        + ".",
        "",
        "Each anchor runs in its own process: Aer and lightning bring their own OpenMP thread pools, which",
        "otherwise stall torch's. On a small shared machine, a busy core stalls every multi-threaded region",
        "(single calls of ~1 s were seen with 2 threads), so only numbers from one run compare; `--threads 1`",
        "gives the steadiest ones.",
        "",
        "Floor (minimal algorithm): fwd+bwd needs 11 n 2^n L flops (3 per amplitude per qubit per RY layer,",
        "forward; twice that to un-compute psi and lambda; 2 for each angle's inner product) and moves",
        "12 s 2^n L bytes (each block: one read+write of the state for the fused RY layer and one for the",
        "permutation, forward; twice that backward). floor = max(flops / best GEMM rate, bytes / copy rate at",
        f"the state's size); measured GEMM GFLOP/s {', '.join(f'{k}: {v:.0f}' for k, v in g.items())}, copy GB/s "
        f"{', '.join(f'{k}: {v:.0f}' for k, v in result['rates']['copy_gbs'].items())}.",
        "",
        "| n | MFLOP | MiB moved | floor ms | ours fwd+bwd / floor |",
        "|---|---|---|---|---|",
    ]
    for n, f in result["floors"].items():
        ratio = f"{f['ours_over_floor']:.1f}" if "ours_over_floor" in f else "-"
        lines.append(f"| {n} | {f['flops'] / 1e6:.1f} | {f['bytes'] / 2**20:.1f} | {f['floor_ms']:.3f} | {ratio} |")
    sweep = result["fuse_sweep_fwd_bwd_ms"]
    lines += ["", "Ours, fwd+bwd ms by chunk size (`fuse`, qubits per Kronecker GEMM):", ""]
    lines += ["| n | " + " | ".join(f"fuse {f}" for f in next(iter(sweep.values()))) + " |"]
    lines += ["|---" * (1 + len(next(iter(sweep.values())))) + "|"]
    lines += [f"| {n} | " + " | ".join(f"{ms:.2f}" for ms in row.values()) + " |" for n, row in sweep.items()]
    lines += ["", f"`{result['summary']}`"]
    section = "\n".join(lines) + "\n"
    with open(ROOT / "RESULTS.md", "a") as f:
        f.write("\n" + section)
    print(f"appended to {ROOT / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
