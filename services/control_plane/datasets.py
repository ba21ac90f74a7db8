"""Uploaded data sets: the format from the file's name (or the uploader's word), checked line by line on
disk, with counts and per-column statistics that carry no cell of the file.

A file is accepted when the trainer's loaders (qpeft_core.train.data) can read it as that format: UTF-8
text; csv/tsv with a header of distinct column names and every row as wide as the header; jsonl with one
JSON object per non-blank line."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from qpeft_core.train.data import NotJSONObject, json_objects

FORMATS = ("text", "tsv", "csv", "jsonl")
SUFFIXES = {"text": ".txt", "tsv": ".tsv", "csv": ".csv", "jsonl": ".jsonl"}
_BY_SUFFIX = {".txt": "text", ".text": "text", ".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


class InvalidDataset(ValueError):
    """Why a file is not a data set of its format; the message names a row or column, never content."""


@dataclass
class Column:
    name: str
    non_empty: int = 0
    integers: int = 0  # values that read as an integer (a class label)
    max_chars: int = 0

    def add(self, value) -> None:
        text = value if isinstance(value, str) else json.dumps(value)
        if text.strip():
            self.non_empty += 1
        self.max_chars = max(self.max_chars, len(text))
        if isinstance(value, bool):
            return
        try:
            int(value)
            self.integers += 1
        except (TypeError, ValueError):
            pass


@dataclass
class Inspection:
    rows: int = 0
    empty_rows: int = 0
    max_chars: int = 0
    columns: dict[str, Column] | None = None


def detect_format(file_name: str, given: str | None) -> str:
    """The uploader's `format`, else the file name's suffix; plain text when neither says."""
    return given or _BY_SUFFIX.get(Path(file_name).suffix.lower(), "text")


def inspect(path: Path, fmt: str) -> Inspection:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            result = {"text": _text, "jsonl": _jsonl}.get(fmt, _table)(f, fmt)
    except UnicodeDecodeError:
        raise InvalidDataset("not UTF-8 text; save the file as UTF-8") from None
    except csv.Error as e:  # the csv module's messages describe the format, not the data
        raise InvalidDataset(f"not valid {fmt}: {e}") from None
    if result.rows - result.empty_rows == 0:
        raise InvalidDataset("no data: the file has no non-empty row")
    return result


def _text(f, _fmt) -> Inspection:
    out = Inspection()
    for line in f:
        _no_nul(line, out.rows)
        text = line.rstrip("\r\n")
        out.rows += 1
        out.empty_rows += not text.strip()
        out.max_chars = max(out.max_chars, len(text))
    return out


def _table(f, fmt: str) -> Inspection:
    # the loaders' dialects: TSV without quoting (SST-2 sentences hold bare quotes), CSV with it
    reader = csv.reader(f, delimiter="\t" if fmt == "tsv" else ",", quoting=csv.QUOTE_NONE if fmt == "tsv" else 0)
    header = next(reader, None)
    if not header or not any(h.strip() for h in header):
        raise InvalidDataset(f"no header: a {fmt} data set starts with a row of column names")
    if len(set(header)) != len(header):
        raise InvalidDataset("the header repeats a column name; name every column once")
    out = Inspection(columns={h: Column(h) for h in header})
    for number, cells in enumerate(reader):
        _no_nul("".join(cells), number)
        if len(cells) != len(header):
            raise InvalidDataset(f"row {number}: {len(cells)} fields, the header has {len(header)}; fix that row")
        out.rows += 1
        out.empty_rows += not any(c.strip() for c in cells)
        for name, value in zip(header, cells, strict=True):
            out.columns[name].add(value)
        out.max_chars = max(out.max_chars, sum(map(len, cells)))
    return out


def _jsonl(f, _fmt) -> Inspection:
    out = Inspection(columns={})
    try:
        for line, row in json_objects(f):  # the loader's own reading, one line at a time
            out.rows += 1
            out.empty_rows += not row
            for name, value in row.items():
                out.columns.setdefault(name, Column(name)).add(value)
            out.max_chars = max(out.max_chars, len(line.rstrip("\r\n")))
    except NotJSONObject as e:
        raise InvalidDataset(str(e)) from None
    return out


def _no_nul(text: str, row: int) -> None:
    if "\x00" in text:
        raise InvalidDataset(f"row {row}: a NUL byte; a data set is text")
