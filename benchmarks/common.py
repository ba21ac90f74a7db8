"""Shared bits of the adapter benchmarks (qpa_*.py, qpeft_*.py): options, data, training, timing, output.

Every benchmark trains the methods it compares with the same loop (qpeft_core.train.train), the same data
order, seed, batch size and LR schedule; only the adapter and its learning rate differ.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qpeft_core.train import TokenData, TrainConfig, evaluate, lm_blocks, lm_lines, read_texts, train  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def parser(doc: str) -> argparse.ArgumentParser:
    """Options every benchmark has: --data, --device, --append-results."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder (default: %(default)s)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--append-results", action="store_true", help="append a section to benchmarks/RESULTS.md")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice); 1 wastes least on a machine busier than its cores",
    )
    return ap


def setup(args) -> None:
    """After parsing: thread count, quiet transformers."""
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet()


def quiet() -> None:
    """Silence transformers' weight-loading bars and reports, which would drown the tables."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def load_avg() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


# ---------------------------------------------------------------- data
def wikitext(tok, data: Path, n_train_blocks: int, eval_tokens: int, block: int = 128, heldout_blocks: int = 32):
    """WikiText-2 for causal LM runs, as a dict of TokenData:
    - train: the first n_train_blocks packed blocks of valid.txt (the train split is not in shared/data);
    - heldout: the last heldout_blocks blocks of valid.txt, never trained on, for choosing learning rates;
    - test: packed blocks of the start of test.txt covering eval_tokens targets (standard perplexity);
    - test_lines: test.txt one line per example, padded to `block`, padding in the loss (reference convention).
    """
    wiki = data / "wikitext-2"
    if not wiki.is_dir():
        raise FileNotFoundError(f"WikiText-2 not found at {wiki}; pass --data (the shared data folder)")
    valid = lm_blocks(read_texts(wiki / "valid.txt"), tok, block)
    if n_train_blocks + heldout_blocks > len(valid):
        raise ValueError(f"valid.txt has {len(valid)} blocks of {block}; fewer steps or a smaller batch")
    test = read_texts(wiki / "test.txt")
    return {
        "train": TokenData("lm", valid.input_ids[:n_train_blocks], valid.pad_id),
        "heldout": TokenData("lm", valid.input_ids[-heldout_blocks:], valid.pad_id),
        "test": lm_blocks(test, tok, block, max_tokens=eval_tokens + 2 * block),
        "test_lines": lm_lines(test, tok, block, pad_in_loss=True, skip_empty=False),
    }


def lm_metrics(model, data: dict, eval_tokens: int, batch_size: int = 4) -> dict:
    """Standard perplexity (padding excluded; the headline) over exactly eval_tokens targets of the packed
    test slice, and the reference-convention perplexity (padding in the loss) over the first lines of
    test.txt that hold eval_tokens real targets."""
    std = evaluate(model, data["test"], batch_size, max_tokens=eval_tokens)
    ref = evaluate(model, data["test_lines"], batch_size, max_tokens=eval_tokens)
    return {"ppl": std["ppl"], "ppl_ref": ref["ppl_ref"], "tokens": std["tokens"]}


# ---------------------------------------------------------------- training
def fit(
    model,
    tok,
    train_data,
    *,
    steps,
    batch_size,
    lr,
    seed,
    device,
    warmup=None,
    schedule="linear",
    lr_scale=None,
    eval_data=None,
    eval_every=0,
    eval_tokens=None,
) -> dict:
    """Train in place with the project's loop; returns wall time and the loss of the first/last tenth, and with
    eval_data, its standard perplexity (over eval_tokens targets) every eval_every steps and at the end, as
    "ppl": {step: ppl}. The evaluations' time is in train_s."""
    cfg = TrainConfig(
        max_steps=steps,
        batch_size=batch_size,
        lr=lr,
        lr_scale=lr_scale or {},
        warmup_steps=max(1, steps // 10) if warmup is None else warmup,
        schedule=schedule,
        eval_every=eval_every,
        eval_batch_size=4,  # lm_metrics' batch
        eval_max_tokens=eval_tokens,
        seed=seed,
        device=device,
        progress=False,
    )
    t0 = time.perf_counter()

    def progress(event):  # a line every 10% of the steps, to follow long runs in their log
        if event["event"] == "log" and event["step"] % max(1, steps // 10) == 0:
            elapsed = time.perf_counter() - t0
            ppl = f" ppl {event['eval_ppl']:.3f}" if "eval_ppl" in event else ""
            print(f"  step {event['step']}/{steps} loss {event['loss']:.4f}{ppl} {elapsed:.0f} s", flush=True)

    res = train(model, tok, train_data, eval_data, config=cfg, step_callback=progress)
    wall = time.perf_counter() - t0
    losses = [r["loss"] for r in res.history]
    tenth = max(1, len(losses) // 10)
    out = {
        "train_s": wall,
        "loss_first": statistics.fmean(losses[:tenth]),
        "loss_last": statistics.fmean(losses[-tenth:]),
    }
    if eval_data is not None:
        out["ppl"] = {r["step"]: r["eval_ppl"] for r in res.history if "eval_ppl" in r}
        # train_s holds the evaluations too; a step's own time, without them (median: the first steps warm up)
        out["step_s"] = statistics.median(r["step_s"] for r in res.history)
    return out


def adapter_params(model) -> int:
    """Trainable numbers of a PEFT or qpeft model (tied weights once)."""
    return model.get_nb_trainable_parameters()[0]


def mean_std(xs) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


# ---------------------------------------------------------------- QPA ablations (issue 16)
ABLATIONS = ("frozen", "constant", "random_p")


def qpa_ablate(peft, variant: str, seed: int):
    """A fresh QPA model (get_qpeft_model's) as one of the ablations, in place; "qpa" leaves it as it is.
    - frozen: the QNN's angles kept at their random init (theta.requires_grad False);
    - constant: the QNN's output replaced by the uniform distribution, no executor at all: p~ is then 0 for
      every state, so the mapping MLP sees the bits alone;
    - random_p: the QNN's output replaced by a fixed classical random distribution (Exp(1) entries normalised,
      the Porter-Thomas statistics of a deep random circuit; no executor): a QNN-free per-state code."""
    if variant == "qpa":
        return peft
    if variant not in ABLATIONS:
        raise ValueError(f"unknown QPA ablation {variant!r}; one of qpa, {', '.join(ABLATIONS)}")
    method = peft.method
    method.generator.theta.requires_grad_(False)
    if variant in ("constant", "random_p"):
        dim = 2**method.n_qubits
        if variant == "constant":
            fixed = torch.full((dim,), 1.0 / dim)
        else:
            g = torch.Generator().manual_seed(1000 + seed)
            fixed = -torch.log(torch.rand(dim, generator=g))
            fixed = fixed / fixed.sum()
        fixed = fixed.to(method.generator.theta.device)
        method.quantum_probs = lambda: fixed  # the executor never runs
    return peft


def ablation_tables(rows, variants, keys, gap, gap_col, digits: int, ref: str = "qpa"):
    """rows: one dict per variant and seed. Returns (summary, gaps, means): per variant, "mean ± std" over
    seeds of each key; if ref was run, per variant the mean ± std over seeds of gap(ref's value, the variant's
    value) for each key, under gap_col(key); and {(variant, key): mean}. The gaps are paired by seed because
    the same seed means the same initialisation and data order, so they are tighter than the spreads."""
    base = {r["seed"]: r for r in rows if r["variant"] == ref}
    summary, gaps, means = [], [], {}
    for v in variants:
        mine = {r["seed"]: r for r in rows if r["variant"] == v}
        row, g = {"variant": v}, {"variant": v}
        for k in keys:
            m, sd = mean_std([r[k] for r in mine.values()])
            means[(v, k)] = m
            row[k] = f"{m:.{digits}f} ± {sd:.{digits}f}"
            if base:
                m, sd = mean_std([gap(base[seed][k], r[k]) for seed, r in mine.items()])
                g[gap_col(k)] = f"{m:+.2f} ± {sd:.2f}"
        summary.append(row)
        if base:
            gaps.append(g)
    return summary, gaps, means


# ---------------------------------------------------------------- timing
def interleaved(fns: dict, repeats: int, warmup: int = 2) -> dict:
    """Median seconds of each callable, run in turns (a, b, a, b, ...) so that load changes hit all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[k].append(time.perf_counter() - t0)
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "all_s": v} for k, v in times.items()}


def ratios(t: dict, num: str, den: str) -> dict:
    """num / den from interleaved() times: of the medians (the headline), of the minima (the least disturbed
    runs), and the median of the per-round ratios (each round's two runs saw about the same load)."""
    pairs = [a / b for a, b in zip(t[num]["all_s"], t[den]["all_s"], strict=True)]
    return {
        "median_ratio": t[num]["median_s"] / t[den]["median_s"],
        "min_ratio": t[num]["min_s"] / t[den]["min_s"],
        "paired_median_ratio": statistics.median(pairs),
    }


# ---------------------------------------------------------------- output
def table(rows: list[dict], cols: list[str]) -> str:
    """A markdown table of rows (dicts) over cols; floats to 4 significant digits."""

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, int):
            return f"{v:,d}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def environment(device: str) -> dict:
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device if device != "cuda" else torch.cuda.get_device_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_avg_1_5_15": os.getloadavg(),
    }


# the columns lm_compare's rows share, after each benchmark's own
LM_COLUMNS = ["lr", "ppl_before", "ppl_after", "ppl_ref_before", "ppl_ref_after", "train_s", "s_per_step"]


def result_name(base: str, args, ap: argparse.ArgumentParser, keys: tuple[str, ...]) -> str:
    """base, plus the options in `keys` that differ from their defaults, so variant runs keep their own file:
    qpa_wikitext.json, qpa_wikitext_targets-lm_head_steps-160.json, ..."""
    parts = [f"{k}-{getattr(args, k)}".replace(",", "+") for k in keys if getattr(args, k) != ap.get_default(k)]
    return "_".join([base, *parts])


def save_json(name: str, payload: dict) -> Path:
    out = HERE / "results" / f"{name}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return out


def save_tune(name: str, payload: dict) -> Path:
    """LR sweeps accumulate: each invocation is appended to the file's "sweeps" list."""
    out = HERE / "results" / f"{name}.json"
    old = json.loads(out.read_text()) if out.exists() else {"sweeps": []}
    sweeps = old.get("sweeps", [old])
    return save_json(name, {"sweeps": [*sweeps, json.loads(json.dumps(payload, default=str))]})


def append_results(section: str) -> None:
    """Append a section to RESULTS.md (other benchmarks append to the same file: never rewrite it)."""
    with open(HERE / "RESULTS.md", "a") as f:
        f.write("\n" + section.strip() + "\n")


def command_line() -> str:
    return ".venv/bin/python " + " ".join([f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])


# ---------------------------------------------------------------- causal LM comparisons (WikiText-2)
def lm_args(ap: argparse.ArgumentParser, steps: int, targets: str, one_run: bool = True) -> None:
    """The model, data and horizon options; one_run adds --seed and the LR sweep's options (a benchmark over
    several seeds with rates from earlier sweeps has neither)."""
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--targets", default=targets, help="comma-separated module names, the same for every method")
    ap.add_argument("--steps", type=int, default=steps, help="optimizer steps per method")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--block", type=int, default=128, help="tokens per training example")
    ap.add_argument("--eval-tokens", type=int, default=4096, help="test targets evaluated")
    if not one_run:
        return
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--tune",
        default=None,
        help="comma-separated LRs: instead of the comparison, train every method "
        "--tune-steps steps at each and report held-out (valid.txt tail) perplexity; never the test set",
    )
    ap.add_argument("--tune-steps", type=int, default=25)
    ap.add_argument("--tune-methods", default=None, help="comma-separated method names to sweep (default: all)")


def lm_adapter_args(ap: argparse.ArgumentParser) -> None:
    """qpa_wikitext.py's LoRA baseline and QPA options, with the defaults its sweeps chose; lm_lora and lm_qpa
    build from them, so every WikiText-2 QPA benchmark adapts the same way."""
    ap.add_argument("--r", type=int, default=4, help="LoRA's rank (the baseline)")
    ap.add_argument(
        "--qpa-r", type=int, default=None, help="rank of the LoRA factors QPA generates (default: --r); alpha = 2 r"
    )
    # defaults from the sweeps in benchmarks/results/qpa_wikitext_tune.json (25 steps, held-out valid tail; QPA:
    # 3e-2 was best for the old seven-layer MLP, 2e-2 for one wide layer, where 3e-2 diverges)
    ap.add_argument("--lora-lr", type=float, default=1e-2)
    ap.add_argument("--qpa-lr", type=float, default=2e-2)
    ap.add_argument("--n-mlp", type=int, default=2048)
    ap.add_argument("--qnn-depth", type=int, default=8)
    ap.add_argument("--layout", choices=("target", "rows"), default="target", help="QPAConfig.layout")
    ap.add_argument(
        "--widths", default=None, help="mapping MLP hidden widths, e.g. 64,128,160 (default: one layer, --param-budget)"
    )
    ap.add_argument("--param-budget", type=float, default=0.5, help="QPAConfig.param_budget, when --widths is not set")
    ap.add_argument("--mapping", choices=("default", "reference"), default="default")
    ap.add_argument("--activation", default="gelu")
    ap.add_argument("--bit-features", choices=("index", "pairs", "triples", "random"), default="index")
    ap.add_argument(
        "--qpa-lr-scale", default="", help="QPA's per-parameter LR multipliers, e.g. gate=10 (TrainConfig.lr_scale)"
    )


def lm_lora(args, seed: int, r: int | None = None):
    """LoRA on args.targets of a fresh args.model, rank r (default --r), alpha 2 r."""
    from qpeft_core.train import load_model, make_lora_model

    r = r or args.r
    model, _ = load_model(args.model, device=args.device)
    return make_lora_model(model, args.targets.split(","), r=r, alpha=2 * r, seed=seed)


def lm_qpa(args, seed: int):
    """QPA on args.targets of a fresh args.model, configured by lm_adapter_args' options (exact simulator)."""
    from qpeft_core import QPAConfig, get_qpeft_model
    from qpeft_core.train import load_model

    qpa_r = args.qpa_r or args.r
    model, _ = load_model(args.model, device=args.device)
    cfg = QPAConfig(
        target_modules=args.targets.split(","),
        r=qpa_r,
        lora_alpha=2 * qpa_r,
        n_mlp=args.n_mlp,
        qnn_depth=args.qnn_depth,
        quantum_grad="per_step",
        seed=seed,
        layout=args.layout,
        mapping=args.mapping,
        activation=args.activation,
        bit_features=args.bit_features,
        param_budget=args.param_budget,
        **({"mapping_widths": [int(w) for w in args.widths.split(",")]} if args.widths else {}),
    )
    return get_qpeft_model(model, cfg)


def qpa_info(peft) -> dict:
    """What lm_qpa's configuration resolved to, for the result files and RESULTS.md."""
    m = peft.method
    return {
        "qubits": m.n_qubits,
        "states": m.generator.n_states,
        "widths": m.widths,
        "mapping": m.config.mapping,
        "layout": m.config.layout,
        "activation": m.config.activation,
    }


def parse_lr_scale(text: str | None) -> dict:
    """'gate=10,classifier=0.5' -> {"gate": 10.0, "classifier": 0.5} (TrainConfig.lr_scale)."""
    out = {}
    for item in filter(None, (text or "").split(",")):
        pattern, sep, mult = item.rpartition("=")
        if not sep or not pattern:
            raise SystemExit(f"--*-lr-scale: {item!r} is not PATTERN=MULTIPLIER")
        out[pattern] = float(mult)
    return out


def lm_tune(args, builders: dict, lr_scales: dict | None = None) -> dict:
    """Each method at each LR in args.tune, args.tune_steps steps, held-out perplexity; returns the best LR each."""
    from qpeft_core.train import load_model

    lrs = [float(x) for x in args.tune.split(",")]
    names = list(builders)
    base, tok = load_model(args.model, device=args.device)
    data = wikitext(tok, args.data, args.tune_steps * args.batch_size, args.eval_tokens, args.block)
    base_ppl = evaluate(base, data["heldout"], 4)["ppl"]
    print(f"tune base model heldout_ppl={base_ppl:.3f}", flush=True)
    del base
    if args.tune_methods:
        builders = {k: v for k, v in builders.items() if k in args.tune_methods.split(",")}
    rows = []
    for name, build in builders.items():
        for lr in lrs:
            model = build()
            run = fit(
                model,
                tok,
                data["train"],
                steps=args.tune_steps,
                batch_size=args.batch_size,
                lr=lr,
                seed=args.seed,
                device=args.device,
                lr_scale=(lr_scales or {}).get(name),
            )
            try:
                ppl = evaluate(model, data["heldout"], 4)["ppl"]
            except ValueError:  # every NLL is NaN: the run diverged
                ppl = float("inf")
            rows.append({"method": name, "lr": lr, "heldout_ppl": ppl, **run})
            print(f"tune {name} lr={lr:g} heldout_ppl={ppl:.3f} train_s={run['train_s']:.0f}", flush=True)
            del model
    best = {n: min((r for r in rows if r["method"] == n), key=lambda r: r["heldout_ppl"])["lr"] for n in builders}
    best = {n: best.get(n) for n in names}  # None: not swept
    return {"rows": rows, "best": best, "base_heldout_ppl": base_ppl}


def lm_compare(args, builders: dict, lrs: dict, lr_scales: dict | None = None) -> dict:
    """Base model, then each method: build, train args.steps steps at its LR, evaluate on the test slice."""
    from qpeft_core.train import load_model

    base, tok = load_model(args.model, device=args.device)
    data = wikitext(tok, args.data, args.steps * args.batch_size, args.eval_tokens, args.block)
    t0 = time.perf_counter()
    before = lm_metrics(base, data, args.eval_tokens)
    eval_s = time.perf_counter() - t0
    print(f"base: ppl={before['ppl']:.3f} ppl_ref={before['ppl_ref']:.4f} ({eval_s:.0f} s, load {load_avg()})")
    del base
    rows = []
    for name, build in builders.items():
        model = build()
        params = adapter_params(model)
        run = fit(
            model,
            tok,
            data["train"],
            steps=args.steps,
            batch_size=args.batch_size,
            lr=lrs[name],
            seed=args.seed,
            device=args.device,
            lr_scale=(lr_scales or {}).get(name),
        )
        after = lm_metrics(model, data, args.eval_tokens)
        rows.append(
            {
                "method": name,
                "trainable": params,
                "lr": lrs[name],
                "lr_scale": (lr_scales or {}).get(name) or "",
                "ppl_before": before["ppl"],
                "ppl_after": after["ppl"],
                "ppl_ref_before": before["ppl_ref"],
                "ppl_ref_after": after["ppl_ref"],
                **run,
                "s_per_step": run["train_s"] / args.steps,
                "load_avg": load_avg(),
            }
        )
        print(
            f"{name}: params={params:,d} ppl={after['ppl']:.3f} ppl_ref={after['ppl_ref']:.4f} "
            f"train_s={run['train_s']:.0f} (load {load_avg()})",
            flush=True,
        )
        del model
    return {"rows": rows, "eval_tokens": before["tokens"], "train_tokens": args.steps * args.batch_size * args.block}


# ---------------------------------------------------------------- step timing
def step_args(ap: argparse.ArgumentParser) -> None:
    """The options of the *_step.py benchmarks: one model, one batch, timed repeats after warmup."""
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--targets", default="q_proj,v_proj", help="comma-separated module names, the same for both")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--block", type=int, default=128)


def lm_batch(tok, data: Path, batch_size: int, block: int, device: str) -> dict:
    """One fixed training batch: the first batch_size packed blocks of WikiText-2 valid.txt."""
    blocks = lm_blocks(read_texts(data / "wikitext-2" / "valid.txt"), tok, block, max_tokens=batch_size * block)
    return {k: v.to(device) for k, v in blocks.batch(range(batch_size)).items()}


def train_step(model, batch: dict, lr: float = 1e-3):
    """A callable doing one full optimizer step on `batch`, as the training loop does it: forward, backward,
    the model's before_optimizer_step hook (QPA's per-step quantum gradient), AdamW step, zero_grad."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    hook = getattr(model, "before_optimizer_step", None)
    model.train()

    def step():
        out = model(**batch)
        out.loss.backward()
        if callable(hook):
            hook()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step
