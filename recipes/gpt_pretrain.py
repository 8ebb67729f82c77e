"""Pretrain a GPT-2 language model from scratch on a text corpus, data-parallel with Accelerate.

With no arguments it trains nanoGPT's CPU model (4 layers, 4 heads, width 128, block 64, batch 12, 2000 steps)
on the bundled Tiny Shakespeare at the character level, and reaches a validation loss of about 1.88.

    python recipes/gpt_pretrain.py                                     # one process
    accelerate launch recipes/gpt_pretrain.py --model_size shakespeare # whatever `accelerate config` says
    torchrun --nproc_per_node 8 recipes/gpt_pretrain.py --model_size gpt2 --tokenizer gpt2 \\
        --dataset_name Skylion007/openwebtext --per_device_train_batch_size 16 --gradient_accumulation_steps 4
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 recipes/gpt_pretrain.py  # 2 CPU procs

Each of K processes holds a full replica of the model and takes a disjoint shard of every global batch;
DDP all-reduces (averages) the gradients, so every replica applies the same update. The global batch is
per_device_train_batch_size * gradient_accumulation_steps * K sequences of block_size tokens.

Self-contained on purpose: it needs torch, accelerate, transformers, datasets, tokenizers, numpy and tqdm,
and nothing from accel_dp, so you can copy this one file into your own project.
"""

from __future__ import annotations

import argparse
import hashlib
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

import numpy as np
import torch
import torch.nn.functional as F
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
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    PreTrainedTokenizerFast,
    get_cosine_with_min_lr_schedule_with_warmup,
)

# Model shapes. `nano` is nanoGPT's CPU configuration, `shakespeare` its shakespeare_char GPU one, `gpt2` GPT-2 124M.
MODEL_PRESETS = {
    "nano": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0),
    "shakespeare": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, dropout=0.0),
}
# Resolved next to this file, so it works from the repository and from an installed accel-dp alike.
BUNDLED_CORPUS = Path(__file__).resolve().parent.parent / "data" / "tinyshakespeare" / "input.txt"
CACHE_FORMAT_VERSION = 1


# Messages go through accelerate's logger, which prints on the main process only (one copy, not one per rank),
# above the progress bar rather than through it.
logger = get_logger(__name__)


class AboveProgressBar(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record))


def fail(message: str) -> None:
    """Stop on bad input with one line that says what is wrong and what to do; exit code 2, no traceback."""
    tqdm.write(f"error: {message}", file=sys.stderr)  # on its own line, under any progress bar
    raise SystemExit(2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    data = parser.add_argument_group("data")
    data.add_argument("--train_file", nargs="+", help="UTF-8 text file(s). Default: the bundled Tiny Shakespeare.")
    data.add_argument("--validation_file", nargs="+", help="UTF-8 text file(s); default: the train corpus' tail.")
    data.add_argument("--validation_split_fraction", type=float, default=0.1, help="Tail held out for validation.")
    data.add_argument("--dataset_name", help="A Hugging Face dataset (hub name or local folder) instead of files.")
    data.add_argument("--dataset_config_name")
    data.add_argument("--text_column", default="text")
    data.add_argument("--tokenizer", help="char (default), byte, or a Hugging Face tokenizer name or path.")
    data.add_argument("--cache_dir", help="Where tokenized corpora are cached (default ~/.cache/accel-dp/tokens).")

    model = parser.add_argument_group("model")
    model.add_argument("--model_size", choices=sorted(MODEL_PRESETS), default="nano")
    model.add_argument("--n_layer", type=int)
    model.add_argument("--n_head", type=int)
    model.add_argument("--n_embd", type=int)
    model.add_argument("--block_size", type=int, help="Context length in tokens.")
    model.add_argument("--dropout", type=float)
    model.add_argument("--model_name_or_path", help="Continue training a saved causal LM instead of a fresh one.")
    model.add_argument("--attn_implementation", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])

    train = parser.add_argument_group("training")
    train.add_argument("--per_device_train_batch_size", type=int, default=12)
    train.add_argument("--per_device_eval_batch_size", type=int, help="Default: the train batch size.")
    train.add_argument("--gradient_accumulation_steps", type=int, help="Default 1, or what --global_batch_size needs.")
    train.add_argument(
        "--global_batch_size",
        type=int,
        help="Sequences per optimizer step over all processes: sets the accumulation steps from the number of "
        "processes (nanoGPT's rule), so 1 GPU and 8 GPUs optimise the same objective.",
    )
    train.add_argument("--max_train_steps", type=int, default=2000, help="Optimizer steps.")
    train.add_argument("--learning_rate", type=float, default=1e-3)
    train.add_argument("--min_learning_rate", type=float, help="End of the cosine decay; default learning_rate/10.")
    train.add_argument("--num_warmup_steps", type=int, default=100)
    train.add_argument("--weight_decay", type=float, default=0.1)
    train.add_argument("--adam_beta1", type=float, default=0.9)
    train.add_argument("--adam_beta2", type=float, default=0.99)
    train.add_argument("--max_grad_norm", type=float, default=1.0, help="0 disables clipping.")
    train.add_argument("--mixed_precision", choices=["no", "fp16", "bf16", "fp8"], help="Default: accelerate's.")
    train.add_argument("--seed", type=int, default=1337)
    train.add_argument("--cpu", action="store_true", help="Train on CPU even if a GPU is present.")

    evaluation = parser.add_argument_group("evaluation and output")
    evaluation.add_argument("--eval_every", type=int, default=250, help="Optimizer steps between evaluations.")
    evaluation.add_argument("--eval_iters", type=int, default=20, help="Validation batches per evaluation.")
    evaluation.add_argument("--log_every", type=int, default=10, help="Optimizer steps between log lines.")
    evaluation.add_argument("--output_dir", help="Default: runs/gpt-pretrain-<date>-<time>.")
    evaluation.add_argument("--overwrite_output_dir", action="store_true")
    evaluation.add_argument("--sample_tokens", type=int, default=200, help="Tokens to generate at the end; 0: none.")
    evaluation.add_argument("--prompt", default="\n", help="Prompt of the generated sample.")
    evaluation.add_argument(
        "--report_to",
        default="none",
        choices=["none", "tensorboard", "wandb", "all"],
        help="Log metrics and the config to these trackers (wandb honours WANDB_MODE, e.g. offline).",
    )
    evaluation.add_argument(
        "--tracker_project", default="accel-dp", help="wandb project; tensorboard subfolder of output_dir."
    )
    checkpoints = parser.add_argument_group("checkpoints and failures")
    checkpoints.add_argument("--checkpointing_steps", help="Save a resumable checkpoint every N optimizer steps.")
    checkpoints.add_argument("--checkpoints_total_limit", type=int, help="Keep only the newest K checkpoints.")
    checkpoints.add_argument(
        "--resume_from_checkpoint",
        help="A checkpoint folder, or `latest`: the newest in <output_dir>/checkpoints (a fresh start if none yet).",
    )
    checkpoints.add_argument(
        "--nonfinite_skip_limit",
        type=int,
        default=0,
        help="Skip up to N optimizer steps whose gradient norm is NaN or inf (default 0: stop at the first).",
    )
    checkpoints.add_argument(
        "--ddp_timeout",
        type=int,
        default=600,
        help="Seconds a collective waits for a silent process before all stop (raise it for very slow data prep).",
    )
    comm = parser.add_argument_group("data-parallel communication (several processes; docs/data_parallel.md)")
    comm.add_argument(
        "--ddp_comm_hook",
        choices=["none", "fp16", "bf16", "powersgd"],
        default="none",
        help="How DDP all-reduces gradients: none (plain fp32), fp16/bf16 (cast to 16 bits: half the bytes; bf16 "
        "needs GPUs with NCCL), powersgd (low-rank approximation with error feedback).",
    )
    comm.add_argument("--powersgd_rank", type=int, help="PowerSGD's matrix approximation rank (default 1).")
    comm.add_argument(
        "--powersgd_start_iter",
        type=int,
        help="Optimizer steps of plain all-reduce before PowerSGD compresses (default 10, at least 2).",
    )
    comm.add_argument(
        "--local_sgd_steps",
        type=int,
        help="Local SGD: no gradient all-reduce; each process steps alone and the parameters are averaged every K "
        "optimizer steps (and before each evaluation, checkpoint and the save).",
    )
    args = parser.parse_args(argv)

    if args.checkpointing_steps is not None:
        if args.checkpointing_steps == "epoch":
            fail(
                "--checkpointing_steps epoch: gpt-pretrain samples windows with replacement and has no epochs; give a number of optimizer steps"
            )
        if not args.checkpointing_steps.isdigit():
            fail(
                f"--checkpointing_steps must be a positive number of optimizer steps, got '{args.checkpointing_steps}'"
            )
        args.checkpointing_steps = int(args.checkpointing_steps)

    positive = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                "global_batch_size", "max_train_steps", "eval_every", "eval_iters", "log_every",
                "checkpointing_steps", "checkpoints_total_limit", "ddp_timeout")  # fmt: skip
    for name in positive:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            fail(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.nonfinite_skip_limit < 0:
        fail(f"--nonfinite_skip_limit must be >= 0, got {args.nonfinite_skip_limit}")
    check_communication_args(args)
    if not 0.0 < args.validation_split_fraction < 1.0:
        fail(f"--validation_split_fraction must be between 0 and 1, got {args.validation_split_fraction}")
    if args.dataset_name and (args.train_file or args.validation_file):
        fail("give either --train_file/--validation_file or --dataset_name, not both")
    if args.model_name_or_path and any(
        getattr(args, k) is not None for k in ("n_layer", "n_head", "n_embd", "dropout")
    ):
        fail("--n_layer/--n_head/--n_embd/--dropout shape a new model: drop them with --model_name_or_path")
    return args


# ----------------------------------------------------------------------------------------------------------------
# Data-parallel communication: plain all-reduce (default), a compressing DDP hook, or Local SGD. The same code is in
# both recipes; docs/data_parallel.md measures what each costs.
# ----------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------
# Data: read the corpus, build or load the tokenizer, tokenize once into a cached token file (like nanoGPT's
# train.bin), and serve windows of block_size + 1 tokens from a memory map.
# ----------------------------------------------------------------------------------------------------------------


def read_text_files(paths: list[str]) -> list[str]:
    texts = []
    for path in paths:
        if not os.path.isfile(path):
            fail(f"data file not found: {path} (check --train_file / --validation_file)")
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            fail(f"{path} is not UTF-8 text (byte {err.start}): convert it, e.g. `iconv -t UTF-8 {path}`")
        if not text.strip():
            fail(f"data file is empty: {path}")
        texts.append(text)
    return texts


def fingerprint(name_or_path: str) -> list:
    """A hub name as it is; a local file or folder by every file's path, size and modification time, so that
    editing it makes a new cache entry."""
    path = Path(name_or_path)
    if not path.exists():
        return [name_or_path]
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime] for p in files]


def corpus_sources(args) -> dict:
    """What identifies the corpus in the cache key: files by path, size and modification time; hub data by name."""
    if args.dataset_name:
        return {"dataset": [fingerprint(args.dataset_name), args.dataset_config_name, args.text_column]}
    train_files = args.train_file or [str(BUNDLED_CORPUS)]
    if not args.train_file and not BUNDLED_CORPUS.is_file():
        fail(f"no --train_file given and the bundled corpus is not at {BUNDLED_CORPUS}: pass --train_file FILE")

    def describe(paths):
        for p in paths:
            if not os.path.isfile(p):
                fail(f"data file not found: {p} (check --train_file / --validation_file)")
        return [[os.path.abspath(p), os.path.getsize(p), os.path.getmtime(p)] for p in paths]

    return {"train": describe(train_files), "validation": describe(args.validation_file or [])}


def load_documents(args) -> tuple[list[str], list[str] | None]:
    """The train documents and, if the data has them, the validation documents (else None: hold out a tail)."""
    if args.dataset_name:
        from datasets import load_dataset

        raw = load_dataset(args.dataset_name, args.dataset_config_name)
        if "train" not in raw:
            fail(f"dataset {args.dataset_name} has no 'train' split (it has {list(raw)})")
        if args.text_column not in raw["train"].column_names:
            fail(
                f"dataset has no column {args.text_column!r}; choose one of {raw['train'].column_names} with --text_column"
            )
        validation = next((raw[s][args.text_column] for s in ("validation", "test") if s in raw), None)
        return raw["train"][args.text_column], validation
    validation = read_text_files(args.validation_file) if args.validation_file else None
    return read_text_files(args.train_file or [str(BUNDLED_CORPUS)]), validation


def build_tokenizer(spec: str, documents: list[str]):
    """`char`: one token per character of the corpus; `byte`: one per UTF-8 byte; else a Hugging Face tokenizer.

    char and byte are built as `tokenizers` objects, so they save and load with `from_pretrained` like any other."""
    if spec not in ("char", "byte"):
        return AutoTokenizer.from_pretrained(spec)
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    every_character = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    if spec == "char":
        alphabet = sorted(set().union(*map(set, documents)))
        tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
        tokenizer.pre_tokenizer = every_character
        tokenizer.decoder = decoders.Fuse()
    else:
        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
        tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False), every_character]
        )
        tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def encode_documents(tokenizer, documents: list[str], dtype) -> np.ndarray:
    """Tokenize line by line in batches (fast, bounded memory); documents are separated by EOS if there is one."""
    pieces = []
    for document in documents:
        lines = document.splitlines(keepends=True)
        for start in range(0, len(lines), 20_000):
            ids = tokenizer(lines[start : start + 20_000], add_special_tokens=False)["input_ids"]
            pieces.append(np.fromiter((i for line in ids for i in line), dtype=dtype))
        if tokenizer.eos_token_id is not None and len(documents) > 1:
            pieces.append(np.array([tokenizer.eos_token_id], dtype=dtype))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)


def prepare_token_cache(args, accelerator) -> tuple[Path, dict]:
    """Tokenize the corpus once into <cache>/<key>/{train,val}.bin plus the tokenizer; later runs reuse it.

    The key covers the corpus and the tokenizer, so a change to either makes a new entry. The entry is built in
    a temporary folder and renamed into place, so an interrupted build never leaves a half-written cache."""
    tokenizer_spec = args.tokenizer or (args.model_name_or_path if args.model_name_or_path else "char")
    key_source = {
        "v": CACHE_FORMAT_VERSION,
        "tokenizer": fingerprint(tokenizer_spec) if tokenizer_spec not in ("char", "byte") else tokenizer_spec,
        "data": corpus_sources(args),
        "validation_split_fraction": args.validation_split_fraction if not args.validation_file else None,
    }
    key = hashlib.sha256(json.dumps(key_source, sort_keys=True).encode()).hexdigest()[:16]
    cache_root = Path(args.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "accel-dp", "tokens"))
    entry = cache_root / key

    # One process per machine tokenizes; the others wait and then read its files.
    with accelerator.local_main_process_first():
        if not (entry / "meta.json").is_file():
            train_docs, val_docs = load_documents(args)
            tokenizer = build_tokenizer(tokenizer_spec, list(train_docs) + list(val_docs or []))
            dtype = np.uint16 if len(tokenizer) <= 2**16 else np.uint32
            train_ids = encode_documents(tokenizer, train_docs, dtype)
            if val_docs is not None:
                val_ids = encode_documents(tokenizer, val_docs, dtype)
            else:  # nanoGPT's split: the last fraction of the token stream is held out
                split = int(len(train_ids) * (1 - args.validation_split_fraction))
                train_ids, val_ids = train_ids[:split], train_ids[split:]
            staging = cache_root / f"{key}.tmp-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            train_ids.tofile(staging / "train.bin")
            val_ids.tofile(staging / "val.bin")
            tokenizer.save_pretrained(staging / "tokenizer")
            meta = {
                "dtype": np.dtype(dtype).name,
                "train_tokens": len(train_ids),
                "val_tokens": len(val_ids),
                "vocab_size": len(tokenizer),
                "source": key_source,
            }
            (staging / "meta.json").write_text(json.dumps(meta, indent=1))
            try:
                staging.rename(entry)
            except OSError:  # another machine sharing this file system won the race: use its entry
                shutil.rmtree(staging, ignore_errors=True)
    return entry, json.loads((entry / "meta.json").read_text())


class TokenWindows(torch.utils.data.Dataset):
    """Windows of block_size + 1 tokens; sample i starts at starts[i] (or at token i if starts is None).

    Inputs are the first block_size tokens and targets the same shifted by one, so every position is trained."""

    def __init__(self, tokens: np.ndarray, block_size: int, starts: np.ndarray | None = None):
        self.tokens, self.block_size, self.starts = tokens, block_size, starts

    def __len__(self):
        return len(self.starts) if self.starts is not None else len(self.tokens) - self.block_size

    def __getitem__(self, index):
        start = int(self.starts[index]) if self.starts is not None else index
        window = torch.from_numpy(self.tokens[start : start + self.block_size + 1].astype(np.int64))
        return window[:-1], window[1:]


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: accelerate's save_state (model, optimizer, schedule, every rank's RNG) plus the step reached, written
# aside and renamed into place, so a kill at any moment leaves the previous checkpoint whole and `latest` never
# names a partial one. Old checkpoints are pruned only after a new one is complete.
# ----------------------------------------------------------------------------------------------------------------


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
        fail(f"{path} is not a gpt-pretrain checkpoint (no training_state.json): give a checkpoint folder or `latest`")
    return path


def check_checkpoint(path: Path, accelerator) -> dict:
    """Read a checkpoint's own state and check, on every rank, that its files load; one clear error otherwise.
    (accelerate's load_state would skip an unreadable RNG file silently, and resume inexactly.)"""
    problem, state = None, {}
    try:
        state = json.loads((path / "training_state.json").read_text())
        if state.get("world_size", accelerator.num_processes) != accelerator.num_processes:
            problem = (
                f"{path} was written by {state['world_size']} process(es) and this run has {accelerator.num_processes}: "
                "resume with the same number (each process's RNG state is restored)"
            )
        else:
            load(path / f"random_states_{accelerator.process_index}.pkl")  # weights_only=True
            load(path / "optimizer.bin", map_location="cpu")
            own_optimizer = path / f"optimizer_rank_{accelerator.process_index}.bin"  # Local SGD's, if any
            if own_optimizer.exists():
                load(own_optimizer, map_location="cpu")
            load(path / "scheduler.bin")
            load_file(path / "model.safetensors")
    except Exception as e:  # a truncated or overwritten file: say which checkpoint, suggest an older one
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        problem = f"checkpoint {path} is corrupted or incomplete ({type(e).__name__}: {first}); resume from an earlier one in {path.parent}"
    problems = [p for p in gather_object([problem]) if p]
    if problems:
        fail(problems[0])
    return state


def save_checkpoint(
    accelerator, output_dir: Path, step: int, skipped_steps: int, window_loss, keep: int | None, own_optimizer=None
) -> Path:
    """`window_loss`: this rank's losses not yet logged. `own_optimizer`: each rank's optimizer, saved by each rank
    (Local SGD, where the replicas' moments differ; save_state keeps rank 0's only)."""
    window_losses = gather_object([window_loss.tolist()])  # a collective: before the main process's part
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
        state = {"step": step, "world_size": accelerator.num_processes, "skipped_steps": skipped_steps,
                 "window_loss": window_losses}  # fmt: skip
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
            store.set(f"gpt_pretrain/alive/{rank}", "1")
            time.sleep(3)
            lost = [r for r in range(world) if not store.check([f"gpt_pretrain/alive/{r}"])]
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


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


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


def main(argv: list[str] | None = None) -> dict:
    start_time = time.perf_counter()
    args = parse_args(argv)

    # On a machine without a GPU, several processes (torchrun, or accelerate launch --multi_gpu) must run on CPU
    # over gloo; without cpu=True accelerate would silently run N unsynchronised single-process copies.
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
            "`accel-dp run gpt-pretrain --cpu --procs N` (or unset MASTER_ADDR to run one process)"
        )
    # nanoGPT's rule: a fixed global batch is reached with fewer accumulation steps on more processes.
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
    mixed_precision = args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if mixed_precision in ("fp16", "fp8") and (use_cpu or not torch.cuda.is_available()):
        fail(
            f"{mixed_precision} does nothing on CPU (accelerate ignores fp16, fp8 needs a GPU): use --mixed_precision bf16 or no"
        )
    trackers = trackers_for(args.report_to)
    accelerator = Accelerator(
        cpu=use_cpu,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=trackers or None,
        project_dir=args.output_dir or "runs",  # where tensorboard logs; set to the output folder below
        # The LR schedule below counts optimizer steps; accelerate's default would step it once per process.
        step_scheduler_with_optimizer=False,
        # A collective waiting on a silent process fails after this long instead of hanging (see run_failing_fast).
        # ddp_kwargs: the gradient communication hook of --ddp_comm_hook (none: DDP's plain all-reduce).
        kwargs_handlers=[
            InitProcessGroupKwargs(timeout=timedelta(seconds=args.ddp_timeout)),
            ddp_kwargs(args, on_cpu=use_cpu),
        ],
    )
    if accelerator.num_processes != world_size_env:
        fail(
            f"launched for {world_size_env} processes but running as {accelerator.num_processes}: on CPU launch with "
            "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N` or `accel-dp run gpt-pretrain "
            "--cpu --procs N`"
        )
    check_parallel_mode(args, accelerator)
    is_main = accelerator.is_main_process
    logger.logger.setLevel(logging.INFO)
    if not logger.logger.handlers:
        logger.logger.addHandler(AboveProgressBar())
    if not is_main:  # one copy of the libraries' chatter, not one per process
        transformers.utils.logging.set_verbosity_error()

    # The output folder: never write into a previous run's results unless asked to.
    if args.output_dir is None:
        stamp = [datetime.now().strftime("%Y%m%d-%H%M%S")]
        broadcast_object_list(stamp)  # every rank must agree on the folder
        args.output_dir = os.path.join("runs", f"gpt-pretrain-{stamp[0]}")
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        fail(f"--output_dir {output_dir} is a file: choose a folder")
    if (
        output_dir.is_dir()
        and any(output_dir.iterdir())
        and not (args.overwrite_output_dir or args.resume_from_checkpoint)
    ):
        fail(
            f"--output_dir {output_dir} already holds files: choose a new folder, pass --overwrite_output_dir, "
            "or continue it with --resume_from_checkpoint latest"
        )
    resume_from = find_checkpoint(args.resume_from_checkpoint, output_dir) if args.resume_from_checkpoint else None
    resume_state = check_checkpoint(resume_from, accelerator) if resume_from else None  # before any work

    # ---------------------------------------------------------------------------------------------- data
    cache_entry, meta = prepare_token_cache(args, accelerator)
    tokenizer = AutoTokenizer.from_pretrained(cache_entry / "tokenizer")
    train_tokens = np.memmap(cache_entry / "train.bin", dtype=meta["dtype"], mode="r")
    val_tokens = np.memmap(cache_entry / "val.bin", dtype=meta["dtype"], mode="r")

    # ---------------------------------------------------------------------------------------------- model
    set_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's at prepare)
    if args.model_name_or_path:
        model = AutoModelForCausalLM.from_pretrained(
            args.model_name_or_path, attn_implementation=args.attn_implementation
        )
        max_positions = getattr(model.config, "n_positions", None) or model.config.max_position_embeddings
        block_size = args.block_size or max_positions
        if block_size > max_positions:
            fail(
                f"--block_size {block_size} exceeds the model's {max_positions} positions: use at most {max_positions}"
            )
        if len(tokenizer) > model.config.vocab_size:
            fail(
                f"the tokenizer has {len(tokenizer)} tokens but the model only {model.config.vocab_size}: "
                "pass the model's own tokenizer with --tokenizer"
            )
    else:
        shape = {k: v for k, v in MODEL_PRESETS[args.model_size].items()}
        shape.update({k: getattr(args, k) for k in shape if getattr(args, k) is not None})
        if shape["n_embd"] % shape["n_head"]:
            fail(f"--n_embd {shape['n_embd']} must be divisible by --n_head {shape['n_head']}")
        block_size = shape["block_size"]
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=block_size,
            n_embd=shape["n_embd"],
            n_layer=shape["n_layer"],
            n_head=shape["n_head"],
            resid_pdrop=shape["dropout"],
            embd_pdrop=shape["dropout"],
            attn_pdrop=shape["dropout"],
            # GPT-2's tanh GELU as one fused kernel: the same function as the default "gelu_new", which transformers
            # computes in five Python-level ops (about 10 % of a CPU step for the nano model, by profile_gpt.py).
            activation_function="gelu_pytorch_tanh",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        model = AutoModelForCausalLM.from_config(config, attn_implementation=args.attn_implementation)
    if block_size < 1:
        fail(f"--block_size must be a positive integer, got {block_size}")
    num_parameters = sum(p.numel() for p in model.parameters())
    # Training FLOPs per token (forward + backward): 6 per weight a token meets (position embeddings are a lookup,
    # the tied token embeddings are also the output layer's matmul), plus attention's 12 x layers x width x context
    # (PaLM, appendix B; nanoGPT's estimate_mfu).
    position_parameters = sum(p.numel() for n, p in model.named_parameters() if "wpe" in n or "position" in n)
    n_layer = getattr(model.config, "n_layer", None) or model.config.num_hidden_layers
    width = getattr(model.config, "n_embd", None) or model.config.hidden_size
    flops_per_token = 6 * (num_parameters - position_parameters) + 12 * n_layer * width * block_size
    for name, tokens in (("training", train_tokens), ("validation", val_tokens)):
        if len(tokens) <= block_size:
            fail(
                f"the {name} data has {len(tokens)} tokens, fewer than one block of {block_size} + 1: "
                "give more text or a smaller --block_size"
            )

    # Created only now that the data and the model are known to be good: bad input leaves nothing behind.
    accelerator.wait_for_everyone()
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        if resume_from is None:
            (output_dir / "metrics.jsonl").unlink(missing_ok=True)
    # One tracker run per job (accelerate runs trackers on the main process only), with the full config.
    if trackers:
        accelerator.project_configuration.set_directories(str(output_dir))  # tensorboard logs go under output_dir
        run_config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}
        accelerator.init_trackers(
            args.tracker_project,
            config={**run_config, "world_size": accelerator.num_processes},
            init_kwargs={"wandb": {"dir": str(output_dir), "name": output_dir.name}},
        )

    # Training samples: windows at random offsets drawn with replacement (nanoGPT's sampling), from one seeded
    # generator, so the sequence of global batches is the same whatever the number of processes. accelerate
    # gives rank k the batches k, k+K, k+2K, ...: K processes at batch B see exactly what one process sees at K*B.
    global_batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    train_windows = TokenWindows(train_tokens, block_size)
    # The loaders get generators of their own: a DataLoader without one draws from the global RNG (which dropout
    # uses) each time it starts, and a resumed run starts its loader at another moment than the original.
    data_generator = torch.Generator().manual_seed(args.seed)
    sampler = torch.utils.data.RandomSampler(
        train_windows, replacement=True, num_samples=args.max_train_steps * global_batch_size, generator=data_generator
    )
    train_loader = torch.utils.data.DataLoader(
        train_windows, batch_size=args.per_device_train_batch_size, sampler=sampler, generator=data_generator
    )
    # Validation: a fixed, evenly spaced set of eval_iters batches, shared out among the processes.
    eval_batch_size = args.per_device_eval_batch_size or args.per_device_train_batch_size
    starts = np.linspace(0, len(val_tokens) - block_size - 1, num=args.eval_iters * eval_batch_size).astype(np.int64)
    val_loader = torch.utils.data.DataLoader(
        TokenWindows(val_tokens, block_size, starts), batch_size=eval_batch_size, generator=torch.Generator()
    )

    # ---------------------------------------------------------------------------------------------- optimizer
    # Weight decay on matrices (2-D weights) only; biases and LayerNorm parameters are not decayed.
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in parameters if p.dim() >= 2], "weight_decay": args.weight_decay},
            {"params": [p for p in parameters if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
    )
    min_lr = args.min_learning_rate if args.min_learning_rate is not None else args.learning_rate / 10
    lr_scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=args.num_warmup_steps, num_training_steps=args.max_train_steps, min_lr=min_lr
    )

    # ---------------------------------------------------------------------------------------------- prepare
    model, optimizer, train_loader, val_loader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_loader, val_loader, lr_scheduler
    )

    @torch.no_grad()
    def evaluate() -> float:
        """Mean loss over the fixed validation windows, gathered from all processes (no duplicates)."""
        if local_sgd is not None:  # evaluate one model, the replicas' average (a sync between the every-K ones)
            local_sgd._sync_and_avg_model_params()
        model.eval()
        losses = []
        for inputs, targets in val_loader:
            logits = model(input_ids=inputs).logits
            per_token = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
            losses.append(accelerator.gather_for_metrics(per_token.view_as(targets).mean(dim=1)))
        model.train()
        return torch.cat(losses).mean().item()

    def log(record: dict) -> None:
        """A record in output_dir/metrics.jsonl and in the trackers (main process only)."""
        if is_main:
            with open(output_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    # ---------------------------------------------------------------------------------------------- loop
    tokens_per_step = global_batch_size * block_size
    logger.info(
        f"gpt-pretrain: {accelerator.num_processes} process(es) on {accelerator.device}, "
        f"{num_parameters / 1e6:.2f}M parameters, vocabulary {len(tokenizer)}, "
        f"global batch {global_batch_size} x {block_size} tokens, {args.max_train_steps} steps"
    )
    # A `with`, so that every way out (an error, preemption) closes the bar: a later run in this process starts clean.
    bar = dict(total=args.max_train_steps, disable=not is_main, desc="train", mininterval=1.0, dynamic_ncols=True)
    with tqdm(**bar) as progress:
        model.train()
        completed_steps, skipped_steps = 0, 0
        # The loss is logged as the mean over the steps since the last log: their summed losses and their number,
        # kept on the device (reading them with .item() every step would synchronise for nothing).
        window_loss = torch.zeros(2, device=accelerator.device)
        step_loss = torch.zeros((), device=accelerator.device)  # the current optimizer step's, over its micro-batches
        train_batches = train_loader
        if resume_from is not None:
            # Weights, optimizer, schedule and RNG come back as they were; the data continues where it stopped,
            # because the sampler replays the same seeded stream and the batches already trained on are skipped.
            state = resume_state
            accelerator.load_state(str(resume_from))
            completed_steps, skipped_steps = state["step"], state.get("skipped_steps", 0)
            if "window_loss" in state:  # this rank's part of the losses the interrupted run had not logged yet
                window_loss = torch.tensor(state["window_loss"][accelerator.process_index], device=accelerator.device)
            train_batches = accelerator.skip_first_batches(
                train_loader, completed_steps * args.gradient_accumulation_steps
            )
            progress.update(completed_steps)
            if is_main:  # forget what the interrupted run logged after its checkpoint
                kept = [
                    r
                    for r in map(json.loads, (output_dir / "metrics.jsonl").read_text().splitlines())
                    if r["step"] <= completed_steps
                ]
                (output_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
                logger.info(f"gpt-pretrain: resumed from {resume_from} at step {completed_steps}")
        train_loss = eval_loss = float("nan")
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
        train_start = interval_start = time.perf_counter()
        first_step, eval_time = completed_steps, 0.0  # this run's share, for its throughput
        peak = peak_tflops(accelerator)
        for inputs, targets in train_batches:
            with accelerator.accumulate(model):
                logits = model(input_ids=inputs).logits
                loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
                step_loss += loss.detach() / args.gradient_accumulation_steps
                accelerator.backward(loss)  # divides by the accumulation steps; all-reduces only at the boundary
                finite = True
                if accelerator.sync_gradients:
                    # The norm of the averaged gradient is the same on every rank, so all ranks decide alike.
                    # (fp16's loss scaler skips overflowing steps by itself and lowers its scale.)
                    grad_norm = accelerator.clip_grad_norm_(
                        model.parameters(), args.max_grad_norm if args.max_grad_norm > 0 else math.inf
                    )
                    finite = bool(torch.isfinite(grad_norm)) or accelerator.scaler is not None
                if finite:
                    optimizer.step()  # a no-op on accumulation micro-steps
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            if not finite:
                # A NaN or inf gradient: the weights are still those of the last good step. Skip it if allowed, else
                # stop before anything (a checkpoint, the final model) is written from a broken state.
                skipped_steps += 1
                latest = output_dir / "checkpoints" / "latest"
                if skipped_steps > args.nonfinite_skip_limit:
                    stop(
                        f"gradient norm is {float(grad_norm)} at optimizer step {completed_steps + 1}; stopped without saving "
                        f"(last checkpoint: {latest.read_text().strip() if latest.is_file() else 'none'}). Lower "
                        "--learning_rate, check the data, or allow skips with --nonfinite_skip_limit N"
                    )
                log({"step": completed_steps + 1, "skipped_nonfinite_step": skipped_steps})
                logger.info(f"step {completed_steps + 1}: gradient norm {float(grad_norm)}, step skipped")
            else:
                window_loss[0] += step_loss
                window_loss[1] += 1
            step_loss.zero_()
            # One optimizer step is done (or skipped): the schedule advances once, whatever the number of processes.
            lr_scheduler.step()
            completed_steps += 1
            progress.update(1)
            if local_sgd is not None:
                local_sgd.step()  # every K-th optimizer step: average the replicas' parameters
            if completed_steps % args.log_every == 0 or completed_steps == args.max_train_steps:
                # Summed over the processes: each process's loss is its shard's mean, so the mean over processes and
                # steps is the mean loss of the global batches since the last log (skipped steps left out).
                loss_sum, steps = accelerator.reduce(window_loss, reduction="sum").tolist()
                window_loss.zero_()
                if steps:  # (none when every step since the last log was skipped)
                    train_loss = loss_sum / steps
                if steps and not math.isfinite(train_loss):
                    stop(
                        f"the training loss became {train_loss} at step {completed_steps}: lower --learning_rate "
                        "or use --mixed_precision bf16 instead of fp16"
                    )
                now = time.perf_counter()
                steps_in_interval = completed_steps % args.log_every or args.log_every
                tokens_per_second = steps_in_interval * tokens_per_step / (now - interval_start)
                record = {
                    "step": completed_steps,
                    **({"loss": train_loss} if steps else {}),
                    "lr": lr_scheduler.get_last_lr()[0],
                    "tokens_per_second": tokens_per_second,
                    "tflops": tokens_per_second * flops_per_token / 1e12,  # all processes together
                    "elapsed_s": now - start_time,
                }
                if peak:  # model FLOPs utilisation: the share of the devices' peak that trains the model
                    record["mfu"] = record["tflops"] / (peak * accelerator.num_processes)
                interval_start = now
                log(record)
                progress.set_postfix(loss=f"{train_loss:.4f}", lr=f"{record['lr']:.2e}", refresh=False)
                logger.info(
                    f"step {completed_steps:>6} | loss {train_loss:.4f} | lr {record['lr']:.3e} | "
                    f"{record['tokens_per_second']:,.0f} tok/s | {record['tflops']:.3g} TFLOP/s | {record['elapsed_s']:.1f}s"
                )
            if completed_steps % args.eval_every == 0 or completed_steps == args.max_train_steps:
                eval_start = time.perf_counter()
                eval_loss = evaluate()
                log({"step": completed_steps, "eval_loss": eval_loss, "elapsed_s": time.perf_counter() - start_time})
                logger.info(f"step {completed_steps:>6} | val loss {eval_loss:.4f}")
                interval_start += time.perf_counter() - eval_start  # evaluation time is not training throughput
                eval_time += time.perf_counter() - eval_start
            if completed_steps >= args.max_train_steps:
                break  # the end of training saves the model itself (a signal now lets it finish)
            # A signal on any rank: every rank checkpoints, then exits. Asked at log steps only, where the loop syncs
            # anyway: check_trigger is a collective, and one more per step costs data parallelism a few percent.
            preempted = completed_steps % args.log_every == 0 and accelerator.check_trigger()
            if preempted or (args.checkpointing_steps and completed_steps % args.checkpointing_steps == 0):
                if local_sgd is not None:  # rank 0's model is what is saved: make it the replicas' average
                    local_sgd._sync_and_avg_model_params()
                save_checkpoint(accelerator, output_dir, completed_steps, skipped_steps, window_loss, args.checkpoints_total_limit,
                                own_optimizer=optimizer if local_sgd is not None else None)  # fmt: skip
            if preempted:
                logger.info(
                    f"gpt-pretrain: preempted ({preemption.get('signal', 'a signal to another rank')}) at step "
                    f"{completed_steps}: checkpoint written, exit status {PREEMPTED_EXIT_CODE}; run the same command "
                    "with --resume_from_checkpoint latest to continue"
                )
                accelerator.end_training()
                raise SystemExit(PREEMPTED_EXIT_CODE)
    if local_sgd is not None:
        local_sgd.__exit__(None, None, None)  # a last average: the saved model is the replicas' mean
    train_runtime = time.perf_counter() - train_start - eval_time  # training only
    tokens_per_second = (completed_steps - first_step) * tokens_per_step / train_runtime

    # ---------------------------------------------------------------------------------------------- save
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    # get_state_dict gathers the full weights when FSDP or ZeRO-3 shard them across processes.
    state_dict = accelerator.get_state_dict(model)
    unwrapped.save_pretrained(
        output_dir, is_main_process=is_main, save_function=accelerator.save, state_dict=state_dict
    )
    results = {
        "world_size": accelerator.num_processes,
        "optimizer_steps": completed_steps,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "global_batch_size": global_batch_size,
        "block_size": block_size,
        "train_tokens_seen": completed_steps * tokens_per_step,
        "num_parameters": num_parameters,
        "train_loss": train_loss,
        "eval_loss": eval_loss,
        "train_runtime_s": train_runtime,  # this run's training, evaluation excluded
        "eval_runtime_s": eval_time,
        "tokens_per_second": tokens_per_second,
        "flops_per_token": flops_per_token,
        "tflops": tokens_per_second * flops_per_token / 1e12,
        "peak_tflops_per_device": peak,
        "mfu": tokens_per_second * flops_per_token / 1e12 / (peak * accelerator.num_processes) if peak else None,
        "peak_memory_gib": peak_memory_gib(accelerator),  # rank 0's: GPU memory on GPU, RSS on CPU
        "mixed_precision": accelerator.mixed_precision,
        "ddp_comm_hook": args.ddp_comm_hook,
        "local_sgd_steps": args.local_sgd_steps,
        "total_runtime_s": time.perf_counter() - start_time,
    }
    if is_main:
        tokenizer.save_pretrained(output_dir)
        (output_dir / "all_results.json").write_text(json.dumps(results, indent=2) + "\n")
        logger.info(
            f"gpt-pretrain: final val loss {eval_loss:.4f}, train loss {train_loss:.4f}, "
            f"{results['tokens_per_second']:,.0f} tok/s, {results['tflops']:.3g} TFLOP/s"
            + (f" (MFU {results['mfu']:.1%})" if results["mfu"] is not None else "")
            + f", peak memory {results['peak_memory_gib']:.2f} GiB, {train_runtime:.1f}s training; saved to {output_dir}"
        )
        if args.sample_tokens > 0:
            # A short sample from the trained model, so you can see what it learned.
            unwrapped.eval()
            prompt = tokenizer(args.prompt, return_tensors="pt", add_special_tokens=False).to(accelerator.device)
            room = block_size - prompt["input_ids"].shape[1]  # the model has no positions beyond block_size
            with torch.no_grad(), accelerator.autocast():
                generated = unwrapped.generate(
                    **prompt,
                    max_new_tokens=max(1, min(args.sample_tokens, room)),
                    do_sample=True,
                    top_k=200,
                    temperature=0.8,
                    pad_token_id=tokenizer.eos_token_id or 0,
                )
            sample = tokenizer.decode(generated[0], skip_special_tokens=True)
            (output_dir / "sample.txt").write_text(sample)
            print("---- sample ----\n" + sample + "\n----------------", flush=True)
    accelerator.end_training()
    return results


if __name__ == "__main__":
    run_failing_fast(main)
