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
    model, tok, train_data, *, steps, batch_size, lr, seed, device, warmup=None, schedule="linear", lr_scale=None
) -> dict:
    """Train in place with the project's loop; returns wall time and the loss of the first/last tenth."""
    cfg = TrainConfig(
        max_steps=steps,
        batch_size=batch_size,
        lr=lr,
        lr_scale=lr_scale or {},
        warmup_steps=max(1, steps // 10) if warmup is None else warmup,
        schedule=schedule,
        seed=seed,
        device=device,
        progress=False,
    )
    t0 = time.perf_counter()

    def progress(event):  # a line every 10% of the steps, to follow long runs in their log
        if event["event"] == "log" and event["step"] % max(1, steps // 10) == 0:
            elapsed = time.perf_counter() - t0
            print(f"  step {event['step']}/{steps} loss {event['loss']:.4f} {elapsed:.0f} s", flush=True)

    res = train(model, tok, train_data, config=cfg, step_callback=progress)
    wall = time.perf_counter() - t0
    losses = [r["loss"] for r in res.history]
    tenth = max(1, len(losses) // 10)
    return {
        "train_s": wall,
        "loss_first": statistics.fmean(losses[:tenth]),
        "loss_last": statistics.fmean(losses[-tenth:]),
    }


def adapter_params(model) -> int:
    """Trainable numbers of a PEFT or qpeft model (tied weights once)."""
    return model.get_nb_trainable_parameters()[0]


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
def lm_args(ap: argparse.ArgumentParser, steps: int, targets: str) -> None:
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--targets", default=targets, help="comma-separated module names, the same for every method")
    ap.add_argument("--steps", type=int, default=steps, help="optimizer steps per method")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--block", type=int, default=128, help="tokens per training example")
    ap.add_argument("--eval-tokens", type=int, default=4096, help="test targets evaluated")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--tune",
        default=None,
        help="comma-separated LRs: instead of the comparison, train every method "
        "--tune-steps steps at each and report held-out (valid.txt tail) perplexity; never the test set",
    )
    ap.add_argument("--tune-steps", type=int, default=25)
    ap.add_argument("--tune-methods", default=None, help="comma-separated method names to sweep (default: all)")


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
