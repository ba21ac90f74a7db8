"""Datasets: local files in, token ids out, batches in a seeded order that can be resumed mid-epoch.

Three shapes of data, all held as a `TokenData`:
- packed causal LM: all text tokenised as one stream and cut into fixed-length blocks (no padding at all);
- one example per line (the QPA reference convention): each line truncated and padded to `max_length`;
  padding is excluded from the loss unless `pad_in_loss=True` (what the reference code trains on);
- sequence classification: (text, integer label) pairs, e.g. SST-2's `sentence<TAB>label` TSV.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE = -100  # the label value HF models leave out of the loss


def _check(path, name: str | None = None) -> Path:
    path = Path(path)
    if not path.is_file():  # `name` when given: a server's path is no business of whoever named the data
        raise FileNotFoundError(f"data {name or str(path)!r} does not exist or is not a file; pass a local file")
    return path


# Messages about a file's content name the data set, a row and a column, never a cell or a line: the data
# may be a tenant's, and a job's errors are shown through the API.


def _rows(path: Path, name: str) -> list[dict]:
    """Rows of a .jsonl / .csv / .tsv file as dicts (header row required for csv/tsv)."""
    try:
        if path.suffix == ".jsonl":
            return _json_rows(path, name)
        delimiter = "\t" if path.suffix == ".tsv" else ","
        with open(path, encoding="utf-8", newline="") as f:
            # QUOTE_NONE for TSV: SST-2 sentences contain bare double quotes that are not field quoting
            reader = csv.DictReader(
                f, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
            )
            return list(reader)
    except UnicodeDecodeError:
        raise ValueError(f"data set {name!r} is not UTF-8 text; save it as UTF-8") from None
    except csv.Error as e:  # csv's messages describe the format ("field larger than field limit"), not data
        raise ValueError(f"data set {name!r} is not valid {path.suffix[1:]}: {e}") from None


class NotJSONObject(ValueError):
    pass


def json_objects(lines):
    """(line, object) for each non-blank line of a JSONL file; NotJSONObject names the first other line."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict):
            raise NotJSONObject(f"line {number}: not a JSON object; write one object per line")
        yield line, row


def _json_rows(path: Path, name: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        try:
            return [row for _, row in json_objects(f)]
        except NotJSONObject as e:
            raise ValueError(f"data set {name!r} {e}") from None


def _column(rows: list[dict], name: str, field: str | None, what: str, default=("text", "sentence")) -> str:
    if not rows:
        raise ValueError(f"data set {name!r} has no data rows; pass a file with a header and at least one row")
    columns = list(rows[0].keys())
    if field is None:
        field = next((c for c in default if c in columns), None)
    if field not in columns:
        wanted = f"column {field!r}" if field else f"column named {' or '.join(map(repr, default))}"
        raise KeyError(f"data set {name!r} has no {what} {wanted}; pass {what}_field naming a column of its header")
    return field


def read_texts(path, text_field: str | None = None, name: str | None = None) -> list[str]:
    """Texts from .txt (one per line, as in the file), .jsonl, .csv or .tsv (column `text_field`,
    default 'text' or 'sentence'). `name` labels the data set in errors (default: the file's name)."""
    path = _check(path, name)
    name = name or path.name
    if path.suffix not in (".jsonl", ".csv", ".tsv"):
        try:
            with open(path, encoding="utf-8") as f:
                return [line.rstrip("\n") for line in f]
        except UnicodeDecodeError:
            raise ValueError(f"data set {name!r} is not UTF-8 text; save it as UTF-8") from None
    rows = _rows(path, name)
    field = _column(rows, name, text_field, "text")
    return [str(r[field]) for r in rows]


def read_labeled(path, text_field: str | None = None, label_field: str = "label", limit=None, seed: int = 0, name=None):
    """(text, int label) pairs from a .tsv/.csv/.jsonl with a header, e.g. SST-2 (sentence<TAB>label).

    `limit` keeps a seeded random subset of that many rows, in file order, so a subset is the same on
    every machine and every run with the same seed. `name` labels the data set in errors."""
    path = _check(path, name)
    name = name or path.name
    if path.suffix not in (".jsonl", ".csv", ".tsv"):
        raise ValueError(f"data set {name!r}: classification data must be .tsv, .csv or .jsonl with a label column")
    rows = _rows(path, name)
    tfield = _column(rows, name, text_field, "text")
    lfield = _column(rows, name, label_field, "label", default=())
    numbers = range(len(rows))  # data-row numbers in the file, for messages
    if limit is not None and limit < len(rows):
        numbers = sorted(random.Random(seed).sample(range(len(rows)), limit))
    out = []
    for i in numbers:
        r = rows[i]
        try:
            out.append((str(r[tfield]), int(r[lfield])))
        except (TypeError, ValueError):
            raise ValueError(
                f"data set {name!r} row {i}: the label in column {lfield!r} is not an integer; "
                "labels are class numbers 0, 1, ..."
            ) from None
    return out


@dataclass
class TokenData:
    """Tokenised examples. kind 'lm': labels are the inputs themselves; kind 'cls': one int label each."""

    kind: str
    input_ids: list[list[int]]
    pad_id: int
    labels: list[int] | None = None  # cls only
    pad_to: int | None = None  # pad every batch to this length (the reference's padding='max_length')
    pad_in_loss: bool = False  # lm only: padding positions are targets too (the reference convention)

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, indices) -> dict[str, torch.Tensor]:
        seqs = [self.input_ids[i] for i in indices]
        width = self.pad_to or max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[row, : len(s)] = 1
        out = {"input_ids": ids, "attention_mask": mask}
        if self.kind == "cls":
            out["labels"] = torch.tensor([self.labels[i] for i in indices], dtype=torch.long)
        else:
            out["labels"] = ids.clone() if self.pad_in_loss else ids.masked_fill(mask == 0, IGNORE)
        return out


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
    return pad


def lm_blocks(texts: list[str], tokenizer, block_size: int, max_tokens: int | None = None) -> TokenData:
    """Packed causal LM data: the texts as one token stream (newline-joined, like the file they came from),
    cut into blocks of `block_size`; the incomplete last block is dropped. `max_tokens` caps the stream."""
    stream: list[int] = []
    for ids in tokenizer([t + "\n" for t in texts], add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        if max_tokens is not None and len(stream) >= max_tokens:
            break
    stream = stream[:max_tokens] if max_tokens is not None else stream
    n = len(stream) // block_size
    if n == 0:
        raise ValueError(
            f"only {len(stream)} tokens, fewer than block_size={block_size}; use more text or a smaller block"
        )
    return TokenData("lm", [stream[i * block_size : (i + 1) * block_size] for i in range(n)], _pad_id(tokenizer))


def lm_lines(texts: list[str], tokenizer, max_length: int, pad_in_loss: bool = False, skip_empty: bool = True):
    """One example per line, truncated and padded to `max_length` (the QPA reference convention).
    The reference keeps empty lines (all-padding rows) and counts padding in the loss: pass
    skip_empty=False, pad_in_loss=True to reproduce it exactly."""
    texts = [t for t in texts if t.strip()] if skip_empty else texts
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    return TokenData("lm", ids, _pad_id(tokenizer), pad_to=max_length, pad_in_loss=pad_in_loss)


def cls_examples(pairs, tokenizer, max_length: int = 128) -> TokenData:
    """Sequence classification: (text, label) pairs, padded per batch to the longest example."""
    ids = tokenizer([t for t, _ in pairs], truncation=True, max_length=max_length)["input_ids"]
    return TokenData("cls", ids, _pad_id(tokenizer), labels=[label for _, label in pairs])


def load_data(
    path,
    tokenizer,
    task: str = "causal_lm",
    mode: str = "packed",
    max_length: int = 128,
    text_field: str | None = None,
    label_field: str = "label",
    limit: int | None = None,
    seed: int = 0,
    max_tokens: int | None = None,
    pad_in_loss: bool = False,
    name: str | None = None,
) -> TokenData:
    """One call from a file to a TokenData. task 'causal_lm' with mode 'packed' (blocks of max_length) or
    'lines' (one padded example per line); task 'seq_cls' reads (text, label) rows. `limit` keeps a seeded
    subset of lines/rows. `name` labels the data set in errors (default: the file's name)."""
    if task == "seq_cls":
        return cls_examples(read_labeled(path, text_field, label_field, limit, seed, name), tokenizer, max_length)
    if task != "causal_lm":
        raise ValueError(f"task={task!r} is not supported; use 'causal_lm' or 'seq_cls'")
    texts = read_texts(path, text_field, name)
    if limit is not None and limit < len(texts):
        texts = [texts[i] for i in sorted(random.Random(seed).sample(range(len(texts)), limit))]
    if mode == "packed":
        return lm_blocks(texts, tokenizer, max_length, max_tokens)
    if mode == "lines":
        return lm_lines(texts, tokenizer, max_length, pad_in_loss)
    raise ValueError(f"mode={mode!r} is not supported; use 'packed' or 'lines'")


class Batches:
    """Batches of example indices in a seeded order, with a resumable position (epoch, index).

    Each epoch's order depends only on (seed, epoch), never on the global RNG, so a run resumed from a
    checkpoint sees exactly the batches the uninterrupted run would have. With several data-parallel
    processes every one draws the same permutation and takes its own stride of it."""

    def __init__(self, n, batch_size, seed=0, shuffle=True, drop_last=True, rank=0, world=1):
        self.n, self.batch_size, self.seed, self.shuffle, self.drop_last = n, batch_size, seed, shuffle, drop_last
        self.rank, self.world = rank, world
        per_rank = n // world
        self.per_epoch = per_rank // batch_size if drop_last else -(-per_rank // batch_size)
        if self.per_epoch == 0:
            raise ValueError(
                f"{n} examples give no full batch of batch_size={batch_size} on {world} process(es); "
                "lower batch_size or add data"
            )
        self.epoch, self.index = 0, 0
        self._order_epoch, self._order = None, None

    def _epoch_order(self) -> list[int]:
        if self._order_epoch != self.epoch:
            if self.shuffle:
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
                order = torch.randperm(self.n, generator=gen).tolist()
            else:
                order = list(range(self.n))
            # equal shares per process, or data-parallel ranks would disagree on the number of steps
            order = order[: self.n - self.n % self.world]
            self._order_epoch, self._order = self.epoch, order[self.rank :: self.world]
        return self._order

    def next(self) -> list[int]:
        if self.index >= self.per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        order = self._epoch_order()
        out = order[self.index * self.batch_size : (self.index + 1) * self.batch_size]
        self.index += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != self.n or state["seed"] != self.seed:
            raise ValueError(
                f"checkpoint was written for {state['n']} examples / seed {state['seed']}, "
                f"not {self.n} / {self.seed}: resume with the same data and seed"
            )
        self.epoch, self.index = state["epoch"], state["index"]
