"""Records: rows of a JSONL or CSV file, split into train and test, each with a stable id.

A record is a row of named string columns plus where it came from. Tasks turn records into text
with templates (`configs.tasks`); trajectories name their record by id. Files are read whole
(records are small text), checked line by line, and every problem is reported as one line naming
the file, the line and the field.
"""

from __future__ import annotations

import csv
import json
import os
import random
from dataclasses import dataclass, field

from gfnlm.configs import UserError
from gfnlm.configs.tasks import DATA_DIR


class RecordError(UserError, ValueError):
    """A data file that cannot be used; the message names the file, the line and the field."""


@dataclass(frozen=True)
class Record:
    id: int
    """Position in the task's record list (train records first, then validation, then test)."""
    fields: dict[str, str]
    """Column name -> value (as text)."""
    split: str
    """'train', 'validation' or 'test'."""
    where: str
    """file:line it came from."""


@dataclass
class RecordSet:
    records: list[Record]
    train_ids: list[int] = field(default_factory=list)
    test_ids: list[int] = field(default_factory=list)
    validation_ids: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Record:
        return self.records[i]


def resolve_data_path(path: str) -> str:
    """A data file: as given (relative to the working directory), else in gfnlm's shipped data, else
    relative to gfnlm's checkout (so presets can name ../shared/data/... from any directory)."""
    if os.path.isfile(path):
        return path
    repo = os.path.dirname(os.path.dirname(DATA_DIR))
    for root in (DATA_DIR, repo):
        candidate = os.path.normpath(os.path.join(root, path))
        if not os.path.isabs(path) and os.path.isfile(candidate):
            return candidate
    if os.path.isdir(path):
        raise RecordError(f"{path}: is a directory; expected a .jsonl, .json or .csv file")
    hint = ""
    if "shared/data/" in path.replace(os.sep, "/"):  # the authors' sets, which gfnlm does not ship
        hint = ("; the authors' SUBJ and arithmetic files are not shipped with gfnlm: docs/tasks.md (\"Where the data "
                "comes from\") says where they come from, and the arithmetic preset generates its own")
    raise RecordError(f"{path}: no such data file (looked in the working directory, in {DATA_DIR} and under {repo}){hint}")


def _cell(value, path: str, line: int, name: str) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
        raise RecordError(f"{path}:{line}: field '{name}': expected text or a number, got {json.dumps(value)}")
    return str(value)


def _fields(obj: dict, columns: list[str], path: str, line: int, extra: bool) -> dict[str, str]:
    """The named columns of a JSON object (checked), and with `extra` its other text or number fields."""
    row = {k: _cell(v, path, line, k) for k, v in obj.items() if k in columns}
    if extra:
        row.update({k: str(v) for k, v in obj.items() if k not in columns and isinstance(v, (str, int, float, bool))})
    return row


def _json_array(path: str, text: str, columns: list[str], extra: bool = False) -> list[tuple[int, dict[str, str]]]:
    """Rows of a file holding one JSON array of objects, each with the line its object starts on."""
    decoder = json.JSONDecoder()
    rows, pos = [], text.index("[") + 1

    def skip(p: int) -> int:
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    def fail(p: int, what: str):
        line = text.count("\n", 0, p) + 1
        raise RecordError(f"{path}:{line}: not valid JSON ({what} at column {p - text.rfind(chr(10), 0, p)})")

    pos = skip(pos)
    if pos < len(text) and text[pos] == "]":
        return rows
    while True:
        line = text.count("\n", 0, pos) + 1
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            fail(e.pos, e.msg)
        if not isinstance(obj, dict):
            raise RecordError(f"{path}:{line}: expected a JSON object of columns, got {type(obj).__name__}")
        rows.append((line, _fields(obj, columns, path, line, extra)))
        pos = skip(pos)
        if pos < len(text) and text[pos] == ",":
            pos = skip(pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            if text[skip(pos + 1):].strip():
                fail(skip(pos + 1), "extra data after the array")
            return rows
        fail(pos, "expected ',' or ']'")


def read_rows(path: str, columns: list[str], checks: dict | None = None,
              extra: bool = False) -> list[tuple[int, dict[str, str]]]:
    """(line number, {column: text}) for every row; each row must have every named column, non-empty;
    with `extra` a JSON row keeps its other text or number fields too (a CSV row keeps every column).
    A file ending in .json may hold one JSON array of objects instead of one object per line.
    `checks` maps a column to a function of its text returning what was expected when the value is
    wrong (None when it is right)."""
    path = resolve_data_path(path)
    rows: list[tuple[int, dict[str, str]]] = []
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: a BOM (Excel's UTF-8 CSV) is dropped
            if path.endswith(".csv"):
                reader = csv.DictReader(f)
                if reader.fieldnames is None:
                    raise RecordError(f"{path}:1: empty file; expected a header row naming the columns")
                missing = [c for c in columns if c not in reader.fieldnames]
                if missing:
                    raise RecordError(f"{path}:1: no column '{missing[0]}' in the header "
                                      f"({', '.join(reader.fieldnames)}); the task's templates need {', '.join(columns)}")
                for row in reader:
                    line = reader.line_num
                    if None in row:
                        raise RecordError(f"{path}:{line}: more cells than the header has columns")
                    rows.append((line, {k: v for k, v in row.items()}))
            elif path.endswith(".json") and f.read(4096).lstrip().startswith("["):
                f.seek(0)
                rows = _json_array(path, f.read(), columns, extra)
            elif path.endswith(".jsonl") or path.endswith(".json"):
                f.seek(0)
                for line, text in enumerate(f, 1):
                    if not text.strip():
                        continue
                    try:
                        obj = json.loads(text)
                    except json.JSONDecodeError as e:
                        raise RecordError(f"{path}:{line}: not valid JSON ({e.msg} at column {e.colno})") from None
                    if not isinstance(obj, dict):
                        raise RecordError(f"{path}:{line}: expected a JSON object of columns, got {type(obj).__name__}")
                    rows.append((line, _fields(obj, columns, path, line, extra)))
            else:
                raise RecordError(f"{path}: unknown format; expected a .jsonl, .json or .csv file")
    except UnicodeDecodeError as e:
        raise RecordError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for line, row in rows:
        for c in columns:
            if c not in row or row[c] is None:
                raise RecordError(f"{path}:{line}: field '{c}' missing (the task's templates use {', '.join(columns)})")
            if not str(row[c]).strip():
                raise RecordError(f"{path}:{line}: field '{c}' is empty")
        for c, check in (checks or {}).items():
            if c in row and row[c] is not None:
                expected = check(row[c])
                if expected:
                    raise RecordError(f"{path}:{line}: field '{c}': expected {expected}, got {row[c]!r}")
    if not rows:
        raise RecordError(f"{path}: holds no records")
    return rows


def is_integer(text: str) -> str | None:
    """A record check: the text is an integer (what the column must hold otherwise)."""
    try:
        int(text.strip())
        return None
    except ValueError:
        return "an integer"


def one_of(*values: str):
    """A record check: the text is one of the values."""
    def check(text: str) -> str | None:
        return None if text.strip() in values else "one of " + ", ".join(values)
    return check


def load_records(data_cfg, columns: list[str], checks: dict | None = None, extra: bool = False) -> RecordSet:
    """Train and test records of a task's `data` section: files read, split and subset (seeded);
    `extra`: the records keep their other fields too (see `read_rows`)."""
    train_path = resolve_data_path(data_cfg.train)
    train = [(f"{train_path}:{line}", row) for line, row in read_rows(train_path, columns, checks, extra)]
    rng = random.Random(data_cfg.seed)
    if data_cfg.test:
        test_path = resolve_data_path(data_cfg.test)
        test = [(f"{test_path}:{line}", row) for line, row in read_rows(test_path, columns, checks, extra)]
    elif data_cfg.test_fraction > 0:
        order = list(range(len(train)))
        rng.shuffle(order)
        k = max(1, round(len(train) * data_cfg.test_fraction))
        held = set(order[:k])
        test = [train[i] for i in sorted(held)]
        train = [r for i, r in enumerate(train) if i not in held]
    else:
        test = []
    validation = []
    if data_cfg.validation_fraction > 0:
        order = list(range(len(train)))
        rng.shuffle(order)
        k = max(1, round(len(train) * data_cfg.validation_fraction))
        if k >= len(train):
            raise RecordError(f"{train_path}: task.data.validation_fraction {data_cfg.validation_fraction} holds out "
                              f"{k} of its {len(train)} training records, leaving none to train on; use a smaller fraction")
        held = set(order[:k])
        validation = [train[i] for i in sorted(held)]
        train = [r for i, r in enumerate(train) if i not in held]
    if data_cfg.subset is not None:
        if data_cfg.subset > len(train):
            raise RecordError(f"{train_path}: task.data.subset {data_cfg.subset} is more than its {len(train)} training "
                              f"records; use at most {len(train)}, or leave it unset")
        if data_cfg.subset < len(train):
            keep = sorted(rng.sample(range(len(train)), data_cfg.subset))
            train = [train[i] for i in keep]
    records = [Record(i, row, "train", where) for i, (where, row) in enumerate(train)]
    for split, rows in (("validation", validation), ("test", test)):
        records += [Record(len(records) + i, row, split, where) for i, (where, row) in enumerate(rows)]
    ids = lambda split: [r.id for r in records if r.split == split]  # noqa: E731
    return RecordSet(records, ids("train"), ids("test"), ids("validation"))


def inline_records(texts: list[str], column: str = "text") -> RecordSet:
    """Records from a config's inline list (the random-number prompts): train and test alike."""
    records = [Record(i, {column: t}, "train", f"config:{i}") for i, t in enumerate(texts)]
    ids = [r.id for r in records]
    return RecordSet(records, ids, list(ids))
