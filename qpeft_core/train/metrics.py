"""Evaluation metrics: perplexity (two conventions) and classification accuracy.

Perplexity, standard (the headline): exp of the mean next-token NLL over real target tokens only; padding
is never a target. With `max_tokens` it is computed over exactly that many target tokens, so numbers from
different models and block sizes are over the same text.

Perplexity, reference (reported beside it): the QPA reference code's number. Every line is padded to the
maximum length, the labels are the padded inputs themselves, so the (easily predicted) padding positions
count in the loss, and the result is exp of the mean over batches of each batch's mean loss. It is much
lower than the standard number (GPT-2 on WikiText-2: about 1.6) and only comparable with itself.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .data import IGNORE, TokenData


def _logits(out):
    return out["logits"] if isinstance(out, dict) else out.logits


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position next-token NLL [B, T-1]; positions whose target is IGNORE are NaN."""
    logits, targets = logits[:, :-1].float(), labels[:, 1:]
    nll = F.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")
    return nll.masked_fill(targets == IGNORE, float("nan"))


def reference_batch_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over all positions, padding included: HF's loss with labels=input_ids."""
    return F.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:])


@torch.no_grad()
def evaluate(model, data: TokenData, batch_size: int = 8, max_tokens: int | None = None, max_batches=None) -> dict:
    """Metrics of `model` on `data` in eval mode (restores the previous mode).

    lm:  loss, ppl (standard), tokens (targets counted), loss_ref, ppl_ref (reference convention).
    cls: loss (mean cross-entropy), accuracy, examples.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll_sum, tokens, ref_sum, n_batches, correct = 0.0, 0, 0.0, 0, 0
    for start in range(0, len(data), batch_size):
        if max_batches is not None and n_batches >= max_batches:
            break
        if max_tokens is not None and tokens >= max_tokens:
            break
        batch = {k: v.to(device) for k, v in data.batch(range(start, min(start + batch_size, len(data)))).items()}
        logits = _logits(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]))
        n_batches += 1
        if data.kind == "cls":
            nll_sum += F.cross_entropy(logits.float(), batch["labels"], reduction="sum").item()
            correct += (logits.argmax(-1) == batch["labels"]).sum().item()
            tokens += len(batch["labels"])
            continue
        # padding is never a standard target, even when the data trains on it (pad_in_loss)
        labels = batch["labels"].masked_fill(batch["attention_mask"] == 0, IGNORE)
        nll = token_nll(logits, labels).flatten()
        nll = nll[~nll.isnan()].double()
        if max_tokens is not None:
            nll = nll[: max_tokens - tokens]  # row-major, so the cut falls on the same tokens for any batch size
        nll_sum += nll.sum().item()
        tokens += nll.numel()
        ref_sum += reference_batch_loss(logits, batch["input_ids"]).item()
    model.train(was_training)
    if tokens == 0:
        raise ValueError("evaluation data produced no targets; check the eval file and max_length")
    if data.kind == "cls":
        return {"loss": nll_sum / tokens, "accuracy": correct / tokens, "examples": tokens}
    loss, loss_ref = nll_sum / tokens, ref_sum / n_batches
    return {"loss": loss, "ppl": math.exp(loss), "tokens": tokens, "loss_ref": loss_ref, "ppl_ref": math.exp(loss_ref)}


def perplexity(model, data: TokenData, batch_size: int = 8, max_tokens=None, convention: str = "standard") -> float:
    """Perplexity of a causal LM; convention 'standard' (padding excluded) or 'reference' (padding included)."""
    if convention not in ("standard", "reference"):
        raise ValueError(f"convention={convention!r}; use 'standard' or 'reference'")
    m = evaluate(model, data, batch_size, max_tokens)
    return m["ppl"] if convention == "standard" else m["ppl_ref"]


def accuracy(model, data: TokenData, batch_size: int = 32) -> float:
    return evaluate(model, data, batch_size)["accuracy"]
