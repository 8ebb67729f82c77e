"""GLUE's tasks and files for glue_bert.py: every source read into checked `datasets` tables.

load_splits(args, accelerator) returns {"train": Dataset, "validation": Dataset[, "validation_mm": Dataset]} with the
task's text columns and an integer label (a float for STS-B), checked against the task's label set. Sources, first
match wins: --train_file/--validation_file (CSV, TSV, JSON, JSON Lines), --data_dir (GLUE's original TSV download),
the copy bundled in data/glue/<TASK>, the Hub's nyu-mll/glue.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import datasets
from faults import fail
from messages import first_line

TASKS = {
    "cola": {"dir": "CoLA", "text": ("sentence",), "labels": ("unacceptable", "acceptable")},
    "sst2": {"dir": "SST-2", "text": ("sentence",), "labels": ("negative", "positive")},
    "mrpc": {"dir": "MRPC", "text": ("sentence1", "sentence2"), "labels": ("not_equivalent", "equivalent")},
    "stsb": {"dir": "STS-B", "text": ("sentence1", "sentence2"), "labels": None},
    "qqp": {"dir": "QQP", "text": ("question1", "question2"), "labels": ("not_duplicate", "duplicate")},
    "mnli": {"dir": "MNLI", "text": ("premise", "hypothesis"), "labels": ("entailment", "neutral", "contradiction")},
    "qnli": {"dir": "QNLI", "text": ("question", "sentence"), "labels": ("entailment", "not_entailment")},
    "rte": {"dir": "RTE", "text": ("sentence1", "sentence2"), "labels": ("entailment", "not_entailment")},
    "wnli": {"dir": "WNLI", "text": ("sentence1", "sentence2"), "labels": ("not_entailment", "entailment")},
}

# Where the text and the label sit in GLUE's original TSV files: header names, or column numbers for CoLA,
# whose files have no header. MNLI's gold_label is found by name because train and dev have different columns.
TSV_COLUMNS = {
    "cola": ({"sentence": 3}, 1),
    "sst2": ({"sentence": "sentence"}, "label"),
    "mrpc": ({"sentence1": "#1 String", "sentence2": "#2 String"}, "Quality"),
    "stsb": ({"sentence1": "sentence1", "sentence2": "sentence2"}, "score"),
    "qqp": ({"question1": "question1", "question2": "question2"}, "is_duplicate"),
    "mnli": ({"premise": "sentence1", "hypothesis": "sentence2"}, "gold_label"),
    "qnli": ({"question": "question", "sentence": "sentence"}, "label"),
    "rte": ({"sentence1": "sentence1", "sentence2": "sentence2"}, "label"),
    "wnli": ({"sentence1": "sentence1", "sentence2": "sentence2"}, "label"),
}
STSB_RANGE = (0.0, 5.0)
DEFAULT_TASK = "mrpc"


def normalize_labels(task: str, raw: list, where: str) -> list:
    """GLUE files spell labels as integers, floats (STS-B) or names (MNLI, QNLI, RTE): map to 0..n-1 or a float."""
    names = TASKS[task]["labels"]
    out = []
    for i, value in enumerate(raw):
        text = "" if value is None else str(value).strip()
        if text in ("", "nan"):  # (pandas reads an empty CSV cell as NaN)
            fail(f"{where}: example {i}: the label is empty")
        if names is None:  # regression
            try:
                score = float(text)
            except ValueError:
                fail(f"{where}: example {i}: STS-B score '{text}' is not a number")
            if not STSB_RANGE[0] <= score <= STSB_RANGE[1] or math.isnan(score):
                fail(f"{where}: example {i}: STS-B score {score} is outside [{STSB_RANGE[0]:g}, {STSB_RANGE[1]:g}]")
            out.append(score)
        elif text in names:
            out.append(names.index(text))
        else:
            try:
                number = float(text)
            except ValueError:
                number = math.nan
            if not number.is_integer() or not 0 <= number < len(names):
                fail(
                    f"{where}: example {i}: label '{text}' is not a {task} label (0..{len(names) - 1} or "
                    f"{', '.join(names)})"
                )
            out.append(int(number))
    return out


def read_glue_tsv(task: str, path: Path) -> datasets.Dataset:
    """Read one file of GLUE's original download. Quoting is off (sentences contain unbalanced quotes), MRPC's
    files start with a UTF-8 byte-order mark, and CoLA's have no header."""
    text_cols, label_col = TSV_COLUMNS[task]
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if task == "cola":
        header, first_line, index = None, 1, {c: c for c in [*text_cols.values(), label_col]}
    else:
        if not rows:
            fail(f"{path} is empty")
        header, rows, first_line = rows[0], rows[1:], 2
        wanted = [*text_cols.values(), label_col]
        missing = [c for c in wanted if c not in header]
        if missing:
            fail(
                f"{path}: missing column(s) {missing} of {task}'s GLUE TSV layout (expected {wanted}, found "
                f"{header}); pass CSV/JSON with --train_file/--validation_file for other layouts"
            )
        index = {c: header.index(c) for c in wanted}
    needed = max(index.values()) + 1
    columns = {name: [] for name in text_cols}
    raw_labels = []
    for n, row in enumerate(rows):
        if not row:
            continue
        if len(row) < needed:
            fail(f"{path}:{n + first_line}: {len(row)} tab-separated columns, {task}'s GLUE TSV layout needs {needed}")
        for name, col in text_cols.items():
            columns[name].append(row[index[col]])
        raw_labels.append(row[index[label_col]])
    if not raw_labels:
        fail(f"{path} has no examples")
    columns["label"] = normalize_labels(task, raw_labels, str(path))
    return datasets.Dataset.from_dict(columns)


def read_tsv_table(path: str) -> datasets.Dataset:
    """A tab-separated file with a header line, read as GLUE writes its files: quoting off (sentences start with and
    hold unbalanced quotes). A row with another number of fields than the header, or an empty label, is refused
    with its file and line."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        fail(f"{path} is empty")
    header, label = rows[0], rows[0].index("label") if "label" in rows[0] else None
    for line, row in enumerate(rows[1:], start=2):
        if row and len(row) != len(header):
            fail(f"{path}:{line}: {len(row)} tab-separated fields, but the header has {len(header)} ({header})")
        if row and label is not None and not row[label].strip():
            fail(f"{path}:{line}: the label is empty")
    body = [row for row in rows[1:] if row]
    return datasets.Dataset.from_dict({name: [row[i] for row in body] for i, name in enumerate(header)})


def from_table(task: str, ds: datasets.Dataset, where: str) -> datasets.Dataset:
    """A CSV/JSON or Hub table: find the task's text columns (or sentence1/sentence2) and check the labels."""
    text = TASKS[task]["text"]
    fallbacks = [text, ("sentence1", "sentence2")[: len(text)], ("sentence",) if len(text) == 1 else ()]
    found = next((cols for cols in fallbacks if cols and all(c in ds.column_names for c in cols)), None)
    if found is None or "label" not in ds.column_names:
        fail(f"{where}: needs columns {list(text)} (or {list(fallbacks[1])}) and 'label', found {ds.column_names}")
    if len(ds) == 0:  # (a header alone: training would run, then the evaluation would have nothing to score)
        fail(f"{where} has no examples, only a header: give at least one")
    columns = {name: ds[col] for name, col in zip(text, found, strict=True)}
    columns["label"] = normalize_labels(task, ds["label"], where)
    return datasets.Dataset.from_dict(columns)


def read_splits(args, accelerator) -> dict:
    task = args.task
    bundled = Path(__file__).resolve().parent.parent / "data" / "glue" / TASKS[task]["dir"]
    dev_files = (
        {"validation": "dev_matched.tsv", "validation_mm": "dev_mismatched.tsv"}
        if task == "mnli"
        else {"validation": "dev.tsv"}
    )
    if args.train_file:
        files = {"train": args.train_file, "validation": args.validation_file}
        for f in files.values():
            if not Path(f).is_file():
                fail(f"no such file: {f}")
        suffix = Path(args.train_file).suffix.lower()
        builder = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "json"}.get(suffix)
        if builder is None:
            fail(f"--train_file must end in .csv, .tsv, .json or .jsonl, got '{suffix}'")
        if builder == "tsv":  # as GLUE writes them: no quoting (the csv builder's pandas would pair up quotes)
            return {split: from_table(task, read_tsv_table(files[split]), files[split]) for split in files}
        with accelerator.main_process_first():  # the first process builds the cache, the others reuse it
            try:
                raw = datasets.load_dataset(builder, data_files=files)
            except Exception as e:  # a row with missing or extra fields: the parser's words name the line
                cause = e.__cause__ or e
                fail(f"{args.train_file} or {args.validation_file}: {str(cause).strip().splitlines()[-1][:200]}")
        return {split: from_table(task, raw[split], files[split]) for split in files}
    data_dir = Path(args.data_dir) if args.data_dir else bundled
    if args.data_dir or (bundled.is_dir() and not args.from_hub):
        names = {"train": "train.tsv", **dev_files}
        missing = [n for n in names.values() if not (data_dir / n).is_file()]
        if missing:
            fail(
                f"{data_dir} lacks {', '.join(missing)}; --data_dir is a folder of GLUE's original TSV files for {task}"
            )
        return {split: read_glue_tsv(task, data_dir / name) for split, name in names.items()}
    # No local copy (for example the recipe was copied out of the repository): GLUE from the Hub.
    hub_splits = (
        {"train": "train", "validation": "validation_matched", "validation_mm": "validation_mismatched"}
        if task == "mnli"
        else {"train": "train", "validation": "validation"}
    )
    with accelerator.main_process_first():
        try:
            raw = datasets.load_dataset("nyu-mll/glue", task)
        except Exception as e:  # offline, unreachable, or no such config: say what to do instead
            fail(
                f"no local {task} data ({bundled} does not exist) and the Hub's nyu-mll/glue failed ({first_line(e)}); "
                "pass --data_dir with GLUE's TSV files, or --train_file and --validation_file"
            )
    return {
        split: from_table(task, raw[hub_name], f"nyu-mll/glue {task} {hub_name}")
        for split, hub_name in hub_splits.items()
    }


def load_splits(args, accelerator) -> dict:
    """The task's splits, each cut to --max_train_samples or --max_eval_samples."""
    splits = read_splits(args, accelerator)
    for split, data in splits.items():
        limit = args.max_train_samples if split == "train" else args.max_eval_samples
        if limit:
            splits[split] = data.select(range(min(limit, len(data))))
    return splits
