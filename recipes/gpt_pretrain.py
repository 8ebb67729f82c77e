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

The file reads top to bottom: arguments, data, model, optimizer, the training step, evaluation, main() (prepare,
loop, save), and at the end the run kit, the plumbing (checkpoints, preemption, metering) that glue_bert.py carries
too. Self-contained on purpose: it needs torch, accelerate, transformers, datasets, tokenizers, numpy and tqdm, and
nothing from accel_dp, so you can copy this one file into your own project.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import itertools
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import NamedTuple, NoReturn

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
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    PreTrainedTokenizerFast,
    get_cosine_with_min_lr_schedule_with_warmup,
)

RECIPE = "gpt-pretrain"
# Model shapes. `nano` is nanoGPT's CPU configuration, `shakespeare` its shakespeare_char GPU one, `gpt2` GPT-2 124M.
MODEL_PRESETS = {
    "nano": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0),
    "shakespeare": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, dropout=0.0),
}
# Resolved next to this file, so it works from the repository and from an installed accel-dp alike.
BUNDLED_CORPUS = Path(__file__).resolve().parent.parent / "data" / "tinyshakespeare" / "input.txt"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    data = parser.add_argument_group("data")
    data.add_argument("--train_file", nargs="+", help="UTF-8 text file(s). Default: the bundled Tiny Shakespeare.")
    data.add_argument("--validation_file", nargs="+", help="UTF-8 text file(s); default: the train corpus' tail.")
    data.add_argument("--validation_split_fraction", type=float, default=0.1, help="Tail held out for validation.")
    data.add_argument("--dataset_name", help="A Hugging Face dataset (hub name or local folder) instead of files.")
    data.add_argument("--dataset_config_name")
    data.add_argument("--text_column", default="text")
    data.add_argument("--tokenizer", help="char (default), byte, bpe:N (trained here), or a Hugging Face tokenizer.")
    data.add_argument("--cache_dir", help="Where tokenized corpora are cached (default ~/.cache/accel-dp/tokens).")
    data.add_argument("--prepare_only", action="store_true", help="Tokenize the corpus into the cache, then stop.")

    model = parser.add_argument_group("model")
    model.add_argument("--model_size", choices=sorted(MODEL_PRESETS), default="nano")
    model.add_argument("--n_layer", type=int)
    model.add_argument("--n_head", type=int)
    model.add_argument("--n_embd", type=int)
    model.add_argument("--block_size", type=int, help="Context length in tokens.")
    model.add_argument("--dropout", type=float)
    model.add_argument("--model_name_or_path", help="Continue training a saved causal LM instead of a fresh one.")
    model.add_argument("--attn_implementation", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])

    optimizer = parser.add_argument_group("optimizer")
    optimizer.add_argument("--learning_rate", type=float, default=1e-3)
    optimizer.add_argument("--min_learning_rate", type=float, help="End of the cosine decay; default learning_rate/10.")
    optimizer.add_argument("--num_warmup_steps", type=int, default=100)
    optimizer.add_argument("--weight_decay", type=float, default=0.1)
    optimizer.add_argument("--adam_beta1", type=float, default=0.9)
    optimizer.add_argument("--adam_beta2", type=float, default=0.99)

    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--eval_every", type=int, default=250, help="Optimizer steps between evaluations.")
    evaluation.add_argument("--eval_iters", type=int, default=20, help="Validation batches per evaluation.")
    evaluation.add_argument("--per_device_eval_batch_size", type=int, help="Default: the train batch size.")
    evaluation.add_argument("--sample_tokens", type=int, default=200, help="Tokens to generate at the end; 0: none.")
    evaluation.add_argument("--prompt", default="\n", help="Prompt of the generated sample.")
    add_run_arguments(parser)  # the run kit's: batches, precision, output, checkpoints, communication
    parser.set_defaults(per_device_train_batch_size=12, max_train_steps=2000, seed=1337)
    args = parser.parse_args(argv)

    check_run_arguments(args, has_epochs=False)
    for name in ("per_device_eval_batch_size", "eval_every", "eval_iters"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            fail(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if not 0.0 < args.validation_split_fraction < 1.0:
        fail(f"--validation_split_fraction must be between 0 and 1, got {args.validation_split_fraction}")
    if args.dataset_name and (args.train_file or args.validation_file):
        fail("give either --train_file/--validation_file or --dataset_name, not both")
    if args.model_name_or_path and any(
        getattr(args, k) is not None for k in ("n_layer", "n_head", "n_embd", "dropout")
    ):
        fail("--n_layer/--n_head/--n_embd/--dropout shape a new model: drop them with --model_name_or_path")
    return args


# ---------------------------------------------------------------------------------------------------------------------
# Data: the corpus is read in pieces and tokenized, piece by piece, into a cached token file (like nanoGPT's train.bin),
# so that memory stays bounded whatever the corpus' size; training serves windows of block_size + 1 tokens from a
# memory map. `--prepare_only` (or `accel-dp prepare gpt-pretrain`) builds the cache and stops.
# ---------------------------------------------------------------------------------------------------------------------

CACHE_FORMAT_VERSION = 3
PIECE_BYTES = 8 * 2**20  # text read, tokenized and written at a time: it bounds the memory, not the corpus
CHUNK_CHARS = 2**14  # text per item given to the Rust tokenizer (see chunks)
EOS = "<|endoftext|>"  # the document separator of a BPE trained here (GPT-2's name for it)
# A corpus is read as batches of items: a piece of text, or None where a document ends (EOS, if the tokenizer has one).


def file_batches(paths: list[str]) -> Iterator[list[str | None]]:
    """Each UTF-8 text file in pieces of about PIECE_BYTES, cut at line ends; each file is a document."""
    for path in paths:
        offset, rest, seen_text = 0, b"", False
        with open(path, "rb") as f:
            while True:
                read = f.read(PIECE_BYTES)
                block, final = rest + read, not read
                if not block:
                    break
                cut = len(block) if final else block.rfind(b"\n") + 1
                if not cut and len(block) < 2 * PIECE_BYTES:  # in a line: read on, and cut at its end
                    rest = block
                    continue
                cut = cut or utf8_end(block)  # a line longer than a piece is cut between two characters
                try:
                    piece = block[:cut].decode("utf-8")
                except UnicodeDecodeError as err:
                    at = offset + err.start
                    fail(f"{path} is not UTF-8 text (byte {at}): convert it, e.g. `iconv -t UTF-8 {path}`")
                seen_text = seen_text or bool(piece.strip())
                yield [piece]
                offset, rest = offset + cut, block[cut:]
                if final:
                    break
        if not seen_text:
            fail(f"data file is empty: {path}")
        yield [None]


def utf8_end(block: bytes) -> int:
    """The end of the last whole character in a block of UTF-8 bytes."""
    start = len(block)
    while start and block[start - 1] & 0xC0 == 0x80:  # continuation bytes: back to the last character's lead byte
        start -= 1
    if not start or block[start - 1] < 0x80:  # it ends with an ASCII character
        return len(block)
    lead = block[start - 1]
    length = 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
    return len(block) if len(block) - (start - 1) >= length else start - 1


def dataset_batches(args, split: str) -> Iterator[list[str | None]]:
    """A `datasets` split (hub name, or a local folder of text, JSON Lines or Parquet files) streamed in batches of
    documents: never loaded whole."""
    from datasets import load_dataset

    for batch in load_dataset(args.dataset_name, args.dataset_config_name, split=split, streaming=True).iter(1024):
        if args.text_column not in batch:
            fail(f"dataset has no column {args.text_column!r}; choose one of {sorted(batch)} with --text_column")
        yield [item for text in batch[args.text_column] if text for item in (text, None)]


def corpus(args) -> tuple[Callable, Callable | None]:
    """The training split and the validation split (None: the tail of the training tokens is held out), each a
    function that returns a fresh iterator of batches."""
    if not args.dataset_name:
        train, validation = args.train_file or [str(BUNDLED_CORPUS)], args.validation_file
        return (lambda: file_batches(train)), ((lambda: file_batches(validation)) if validation else None)
    from datasets import get_dataset_split_names

    try:
        splits = get_dataset_split_names(args.dataset_name, args.dataset_config_name)
    except Exception as e:
        fail(f"cannot open dataset {args.dataset_name}: {(str(e).strip().splitlines() or [type(e).__name__])[0]}")
    if "train" not in splits:
        fail(f"dataset {args.dataset_name} has no 'train' split (it has {splits})")
    held_out = next((s for s in ("validation", "test") if s in splits), None)
    return (lambda: dataset_batches(args, "train")), ((lambda: dataset_batches(args, held_out)) if held_out else None)


def text_of(batches: Iterator[list[str | None]]) -> Iterator[str]:
    return (item for batch in batches for item in batch if item)


def chunks(text: str) -> Iterator[str]:
    """The text in items of about CHUNK_CHARS characters, each cut after a newline where there is one. The Rust
    tokenizer spreads a batch's items over every core, and its trainer buffers 256 items: small ones keep both
    the cores busy and the memory small (8 MB pieces held 2 GB in the trainer's buffer)."""
    start = 0
    while start < len(text):
        end = text.find("\n", start + CHUNK_CHARS) + 1 or len(text)
        yield text[start:end]
        start = end


def build_tokenizer(spec: str, text: Callable):
    """`char`: one token per character of the corpus; `byte`: one per UTF-8 byte; `bpe:N`: a byte-level BPE of N
    tokens, trained here, offline, on the training text; else a Hugging Face tokenizer by name or path. `text`
    returns an iterator of the text to learn from. All come back as PreTrainedTokenizerFast: they save and load with
    `from_pretrained` like any other."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    if spec.startswith("bpe:"):
        size = spec.removeprefix("bpe:")
        if not size.isdigit() or int(size) <= 256:
            fail(f"--tokenizer {spec}: give a vocabulary size above the 256 bytes, e.g. bpe:8192")
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        trainer = trainers.BpeTrainer(vocab_size=int(size), special_tokens=[EOS], initial_alphabet=alphabet)
        tokenizer.train_from_iterator((chunk for piece in text() for chunk in chunks(piece)), trainer)
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS)
    if spec not in ("char", "byte"):
        return AutoTokenizer.from_pretrained(spec)
    every_character = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    if spec == "char":
        codes = np.zeros(0, dtype=np.uint32)
        for piece in text():
            codes = np.union1d(codes, np.unique(np.frombuffer(piece.encode("utf-32-le"), dtype=np.uint32)))
        tokenizer = Tokenizer(models.BPE(vocab={chr(c): i for i, c in enumerate(codes)}, merges=[]))
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


class TokenFile:
    """Tokens appended to a .bin file, batch by batch. char and byte are applied with numpy, a whole piece at once:
    their ids are a character's or a byte's rank in the vocabulary, a lookup. Other tokenizers encode the batch's
    chunks in one call of the Rust tokenizer's batch encoding, which runs on every core."""

    def __init__(self, path: Path, tokenizer, kind: str, dtype):
        self.file, self.tokenizer, self.kind, self.dtype = open(path, "wb"), tokenizer, kind, dtype
        self.tokens = self.bytes = 0
        if kind == "char":
            self.codes = np.array(sorted(ord(c) for c in tokenizer.get_vocab()), dtype=np.uint32)
        elif kind == "byte":  # each byte's id, read off the tokenizer itself, on text whose bytes cover them all
            sample = "".join(map(chr, [*range(0x800), *range(0x800, 0xD800, 0x40), *range(0x10000, 0x110000, 0x1000)]))
            self.table = np.zeros(256, dtype=dtype)
            self.table[np.frombuffer(sample.encode(), dtype=np.uint8)] = tokenizer(sample)["input_ids"]

    def write(self, batch: list[str | None]) -> None:
        text = "".join(item for item in batch if item)
        if self.kind == "char":  # (no end-of-document token)
            ids = np.searchsorted(self.codes, np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32))
        elif self.kind == "byte":
            ids = self.table[np.frombuffer(text.encode(), dtype=np.uint8)]
        else:
            chunked = [[None] if item is None else list(chunks(item)) for item in batch]  # None: end of a document
            texts = [chunk for items in chunked for chunk in items if chunk is not None]
            encodings = iter(self.tokenizer.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False))
            eos = [] if self.tokenizer.eos_token_id is None else [self.tokenizer.eos_token_id]
            pieces = [eos if chunk is None else next(encodings).ids for items in chunked for chunk in items]
            ids = np.concatenate([np.zeros(0, self.dtype), *(np.array(piece, dtype=self.dtype) for piece in pieces)])
        self.file.write(np.asarray(ids, dtype=self.dtype).tobytes())
        self.tokens, self.bytes = self.tokens + len(ids), self.bytes + len(text.encode())


def token_cache_key(args) -> tuple[str, dict]:
    """What a cache entry depends on: the corpus (files by path, size and modification time; datasets by name), the
    tokenizer, and the held-out fraction. A change to any of them makes a new entry."""
    spec = args.tokenizer or args.model_name_or_path or "char"
    if args.dataset_name:
        data = {"dataset": [fingerprint(args.dataset_name), args.dataset_config_name, args.text_column]}
    else:
        if not args.train_file and not BUNDLED_CORPUS.is_file():
            fail(f"no --train_file given and the bundled corpus is not at {BUNDLED_CORPUS}: pass --train_file FILE")
        data = {}
        for split, paths in (("train", args.train_file or [str(BUNDLED_CORPUS)]), ("validation", args.validation_file)):
            for path in paths or []:
                if not os.path.isfile(path):
                    fail(f"data file not found: {path} (check --train_file / --validation_file)")
            data[split] = [[os.path.abspath(p), os.path.getsize(p), os.path.getmtime(p)] for p in paths or []]
    source = {
        "v": CACHE_FORMAT_VERSION,
        "tokenizer": spec if spec in ("char", "byte") or spec.startswith("bpe:") else fingerprint(spec),
        "data": data,
        "validation_split_fraction": None if args.validation_file else args.validation_split_fraction,
    }
    return hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:16], source


def fingerprint(name_or_path: str) -> list:
    """A hub name as it is; a local file or folder by every file's path, size and modification time."""
    path = Path(name_or_path)
    if not path.exists():
        return [name_or_path]
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime] for p in files]


def prepare_token_cache(args, accelerator) -> tuple[Path, dict]:
    """Tokenize the corpus once into <cache>/<key>/{train,val}.bin plus the tokenizer; later runs reuse the entry.

    One process per machine (the local main) builds it, in a folder of its own renamed into place when whole: an
    interrupted build never leaves a half-written entry. A lock file keeps machines sharing the file system from
    building it twice; machines that do not share one each build their own. The other processes wait for the
    finished entry on the file system, with progress in the log, not in a collective that a large corpus would
    time out."""
    key, source = token_cache_key(args)
    root = Path(args.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "accel-dp", "tokens"))
    entry, started, next_note = root / key, time.time(), time.time() + 30
    while not (entry / "meta.json").is_file():
        if accelerator.is_local_main_process and claim(root / f"{key}.lock"):
            build_token_cache(args, source, root, key)
            continue
        failed = root / f"{key}.failed"
        if failed.is_file() and failed.stat().st_mtime >= started:  # the builder has said why; leave as it did
            raise SystemExit(int(failed.read_text() or FAILED_EXIT_CODE))
        if time.time() > next_note:
            written = sum(p.stat().st_size for p in root.glob(f"{key}.tmp-*/*.bin"))
            logger.info(f"{RECIPE}: waiting for the token cache {entry}: {written / 2**20:,.0f} MiB written so far")
            next_note += 30
        time.sleep(0.5)
    return entry, json.loads((entry / "meta.json").read_text())


def claim(lock: Path) -> bool:
    """Take a cache entry's lock file: a new one, or one left by a builder that is gone: a process of this machine
    that no longer runs, or one of another machine that has not beaten (touched it) for a minute."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        host, pid = lock.read_text().split(":")
        gone = (
            not psutil.pid_exists(int(pid)) if host == socket.gethostname() else time.time() - lock.stat().st_mtime > 60
        )
    except (OSError, ValueError):  # no lock, or one being written (a second later, it is whole)
        gone = lock.exists() and time.time() - lock.stat().st_mtime > 60
    if gone:
        lock.unlink(missing_ok=True)
        for staging in lock.parent.glob(f"{lock.stem}.tmp-*"):  # what the builder that is gone left half-written
            shutil.rmtree(staging, ignore_errors=True)
    try:
        with lock.open("x") as f:
            f.write(f"{socket.gethostname()}:{os.getpid()}")
    except FileExistsError:
        return False
    return True


def build_token_cache(args, source: dict, root: Path, key: str) -> None:
    """Tokenize into a staging folder and rename it into place, touching the lock file every 10 s as a heartbeat."""
    lock, staging = root / f"{key}.lock", root / f"{key}.tmp-{socket.gethostname()}-{os.getpid()}"
    (root / f"{key}.failed").unlink(missing_ok=True)
    done = threading.Event()

    def heartbeat() -> None:
        while not done.wait(10):
            lock.touch()

    threading.Thread(target=heartbeat, daemon=True).start()
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        meta = tokenize_corpus(args, staging)
        (staging / "meta.json").write_text(json.dumps({**meta, "source": source}, indent=1))
        try:
            staging.rename(root / key)
        except OSError:  # another machine sharing this file system finished first: use its entry
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException as error:  # bad data, or a kill: no half-written entry; the waiting processes learn why
        shutil.rmtree(staging, ignore_errors=True)
        code = error.code if isinstance(error, SystemExit) and isinstance(error.code, int) else FAILED_EXIT_CODE
        (root / f"{key}.failed").write_text(str(code))
        raise
    finally:
        done.set()
        lock.unlink(missing_ok=True)


def tokenize_corpus(args, folder: Path) -> dict:
    """The tokenizer into folder/tokenizer, and the corpus into folder/train.bin and val.bin, a batch at a time."""
    train, validation = corpus(args)
    spec = args.tokenizer or args.model_name_or_path or "char"
    splits = (train, validation) if spec == "char" else (train,)  # char's vocabulary: all the corpus' characters
    tokenizer = build_tokenizer(spec, lambda: itertools.chain.from_iterable(text_of(s()) for s in splits if s))
    tokenizer.save_pretrained(folder / "tokenizer")
    dtype = np.uint16 if len(tokenizer) <= 2**16 else np.uint32
    marks = {}  # (tokens, text bytes) after each batch: where a token boundary falls in the text
    for name, batches in (("train", train), ("val", validation)):
        if batches is None:
            continue
        tokens, marks[name] = TokenFile(folder / f"{name}.bin", tokenizer, spec, dtype), [(0, 0)]
        with tqdm(desc=f"tokenizing {name}", unit="B", unit_scale=True, mininterval=2.0) as progress:
            for batch in batches():
                tokens.write(batch)
                progress.update(tokens.bytes - marks[name][-1][1])
                marks[name].append((tokens.tokens, tokens.bytes))
        tokens.file.close()
    if validation is None:  # nanoGPT's split: the last fraction of the token stream is held out
        total, total_bytes = marks["train"][-1]
        split = int(total * (1 - args.validation_split_fraction))
        move_tail(folder / "train.bin", folder / "val.bin", split * np.dtype(dtype).itemsize)
        split_bytes = round(float(np.interp(split, *zip(*marks["train"], strict=True))))
        marks = {"train": [(split, split_bytes)], "val": [(total - split, total_bytes - split_bytes)]}
    return {
        "dtype": np.dtype(dtype).name,
        "train_tokens": marks["train"][-1][0],
        "val_tokens": marks["val"][-1][0],
        "val_bytes": marks["val"][-1][1],  # the text the validation tokens stand for: for bits per byte
        "vocab_size": len(tokenizer),
    }


def move_tail(source: Path, target: Path, offset: int) -> None:
    """Move the bytes of `source` from `offset` on into `target`, a block at a time, and cut them off `source`."""
    with open(source, "rb") as f, open(target, "wb") as out:
        f.seek(offset)
        while block := f.read(PIECE_BYTES):
            out.write(block)
    os.truncate(source, offset)


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


def make_loaders(args, train_tokens, val_tokens, block_size: int, global_batch_size: int):
    """Training windows at random offsets, drawn with replacement (nanoGPT's sampling) from one seeded generator, so
    the sequence of global batches is the same whatever the number of processes: accelerate gives rank k the batches
    k, k+K, k+2K, ..., and K processes at batch B see exactly what one process sees at K*B. Validation: a fixed,
    evenly spaced set of eval_iters batches, shared out among the processes.

    Each loader has a generator of its own: a DataLoader without one draws from the global RNG (which dropout uses)
    each time it starts, and a resumed run starts its loader at another moment than the original."""
    train_windows = TokenWindows(train_tokens, block_size)
    data_generator = torch.Generator().manual_seed(args.seed)
    sampler = torch.utils.data.RandomSampler(
        train_windows, replacement=True, num_samples=args.max_train_steps * global_batch_size, generator=data_generator
    )
    train_loader = torch.utils.data.DataLoader(
        train_windows, batch_size=args.per_device_train_batch_size, sampler=sampler, generator=data_generator
    )
    eval_batch_size = args.per_device_eval_batch_size or args.per_device_train_batch_size
    starts = np.linspace(0, len(val_tokens) - block_size - 1, num=args.eval_iters * eval_batch_size).astype(np.int64)
    val_loader = torch.utils.data.DataLoader(
        TokenWindows(val_tokens, block_size, starts), batch_size=eval_batch_size, generator=torch.Generator()
    )
    return train_loader, val_loader


# ---------------------------------------------------------------------------------------------------------------------
# Model and optimizer
# ---------------------------------------------------------------------------------------------------------------------


def build_model(args, tokenizer) -> tuple[torch.nn.Module, int]:
    """A fresh GPT-2 of the preset shape (flags override it), or a saved causal LM to go on training; and the context
    length it trains on."""
    if args.model_name_or_path:
        # fp32 master weights, whatever the checkpoint holds (transformers keeps a bf16 one in bf16 by default, which
        # fp16's loss scaler cannot unscale, and in which AdamW's small updates round away): --mixed_precision casts.
        model = AutoModelForCausalLM.from_pretrained(
            args.model_name_or_path, attn_implementation=args.attn_implementation, dtype=torch.float32
        )
        max_positions = getattr(model.config, "n_positions", None) or model.config.max_position_embeddings
        block_size = args.block_size or max_positions
        if block_size > max_positions:
            fail(
                f"--block_size {block_size} exceeds the model's {max_positions} positions: use at most {max_positions}"
            )
        if len(tokenizer) > model.config.vocab_size:
            fail(
                f"the tokenizer has {len(tokenizer)} tokens but the model only {model.config.vocab_size}: pass the "
                "model's own tokenizer with --tokenizer"
            )
        return model, block_size
    shape = dict(MODEL_PRESETS[args.model_size])
    shape.update({k: getattr(args, k) for k in shape if getattr(args, k) is not None})
    if shape["n_embd"] % shape["n_head"]:
        fail(f"--n_embd {shape['n_embd']} must be divisible by --n_head {shape['n_head']}")
    if shape["block_size"] < 1:
        fail(f"--block_size must be a positive integer, got {shape['block_size']}")
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=shape["block_size"],
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
    return AutoModelForCausalLM.from_config(config, attn_implementation=args.attn_implementation), shape["block_size"]


def model_shape(model) -> tuple[int, int, int]:
    config = model.config
    layers = getattr(config, "n_layer", None) or config.num_hidden_layers
    width = getattr(config, "n_embd", None) or config.hidden_size
    heads = getattr(config, "n_head", None) or config.num_attention_heads
    return layers, width, heads


def training_flops_per_token(model, block_size: int) -> float:
    """Forward + backward: 6 per weight a token meets (position embeddings are a lookup, the tied token embeddings
    are also the output layer's matmul), plus attention's 12 x layers x width x context (PaLM, appendix B; nanoGPT's
    estimate_mfu)."""
    parameters = sum(p.numel() for p in model.parameters())
    positions = sum(p.numel() for n, p in model.named_parameters() if "wpe" in n or "position" in n)
    layers, width, _ = model_shape(model)
    return 6 * (parameters - positions) + 12 * layers * width * block_size


def training_memory(args, model, block_size: int, accelerator) -> dict[str, float]:
    """Bytes one process needs, roughly: fp32 weights, gradients and AdamW's two moments (16 per parameter, shared out
    under FSDP or DeepSpeed); the activations kept for the backward, about 17 x width values per token and layer
    (Korthikanti et al. 2022), plus 2 x heads x context for attention that is materialised (eager; sdpa's kernels
    are linear in the context, also on CPU); the logits in fp32, kept for the loss and its gradient. Measured on CPU
    (4 x 128, batch 4 x 4096): 0.58 GiB estimated, 0.67 GiB of peak RSS above the model's."""
    layers, width, heads = model_shape(model)
    tokens = args.per_device_train_batch_size * block_size
    value_bytes = 2 if accelerator.mixed_precision in ("bf16", "fp16") else 4
    values = 17 * width + (2 * heads * block_size if args.attn_implementation == "eager" else 0)
    shards = accelerator.num_processes if accelerator.distributed_type.name in ("FSDP", "DEEPSPEED") else 1
    return {
        "weights, gradients and optimizer": 16 * sum(p.numel() for p in model.parameters()) / shards,
        "activations": tokens * layers * values * value_bytes,
        "logits": 3 * tokens * model.config.vocab_size * 4,
    }


def make_optimizer(args, model):
    """AdamW with weight decay on matrices (2-D weights) only, not on biases and LayerNorm parameters; a cosine
    schedule with linear warmup to --min_learning_rate, counted in optimizer steps."""
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
    return optimizer, lr_scheduler


# ---------------------------------------------------------------------------------------------------------------------
# Training step and evaluation
# ---------------------------------------------------------------------------------------------------------------------


def train_step(
    accelerator, model, optimizer, micro_batches, max_grad_norm: float, flops_per_token: float
) -> Step | None:
    """One optimizer step over its micro-batches: forward, backward (accelerate's accumulate skips DDP's all-reduce
    on all but the last), then clipping and the step unless the gradient is NaN or inf. None when the data has run
    out. benchmarks/overhead.py times this very function."""
    loss_sum, sequences, tokens, finite, grad_norm = 0.0, 0, 0, True, None
    for inputs, targets in micro_batches:
        with accelerator.accumulate(model):
            logits = model(input_ids=inputs).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
            accelerator.backward(loss)  # divided by the accumulation steps
            finite, grad_norm = optimizer_step(accelerator, model, optimizer, max_grad_norm)
        loss_sum = loss_sum + loss.detach() * len(inputs)  # the mean over sequences is what a log step reports
        sequences, tokens = sequences + len(inputs), tokens + inputs.numel()
    if not sequences:
        return None
    return Step(loss_sum, sequences, tokens, tokens * flops_per_token, grad_norm, finite)


@torch.no_grad()
def evaluate(accelerator, model, val_loader) -> float:
    """Mean loss over the fixed validation windows, gathered from all processes (no duplicates)."""
    model.eval()
    losses = []
    for inputs, targets in val_loader:
        logits = model(input_ids=inputs).logits
        per_token = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
        losses.append(accelerator.gather_for_metrics(per_token.view_as(targets).mean(dim=1)))
    model.train()
    return torch.cat(losses).mean().item()


@torch.no_grad()
def generate_sample(accelerator, model, tokenizer, prompt: str, max_tokens: int, block_size: int) -> str:
    """A short sample from the trained model, so you can see what it learned. When FSDP or DeepSpeed shard the
    weights, every process must take part in each forward (synced_gpus keeps them in step); else rank 0 alone."""
    sharded = accelerator.distributed_type.name in ("FSDP", "DEEPSPEED")
    if max_tokens < 1 or not (sharded or accelerator.is_main_process):
        return ""
    model = accelerator.unwrap_model(model)
    model.eval()
    encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(accelerator.device)
    room = block_size - encoded["input_ids"].shape[1]  # the model has no positions beyond block_size
    with accelerator.autocast():
        generated = model.generate(
            **encoded,
            max_new_tokens=max(1, min(max_tokens, room)),
            do_sample=True,
            top_k=200,
            temperature=0.8,
            pad_token_id=tokenizer.eos_token_id or 0,
            synced_gpus=sharded and accelerator.num_processes > 1,
        )
    return tokenizer.decode(generated[0], skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------------------------------
# main: set up, prepare, train, save
# ---------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    start_time = time.perf_counter()
    args = parse_args(argv)
    accelerator = start_accelerator(args)  # checks how this process was launched
    output_dir = output_folder(args, accelerator, RECIPE)
    checkpointer = Checkpointer(accelerator, args, output_dir)  # a checkpoint to resume from is checked now
    accumulation = accelerator.gradient_accumulation_steps  # (resuming, the checkpoint's global batch may set it)

    # ------------------------------------------------------------------------------------------------------- data
    cache_entry, meta = prepare_token_cache(args, accelerator)
    if args.prepare_only:
        tokens = f"{meta['train_tokens']:,} training and {meta['val_tokens']:,} validation tokens"
        logger.info(f"{RECIPE}: prepared {tokens} in {cache_entry}")
        return {"token_cache": str(cache_entry), **{k: v for k, v in meta.items() if k != "source"}}
    tokenizer = AutoTokenizer.from_pretrained(cache_entry / "tokenizer")
    train_tokens = np.memmap(cache_entry / "train.bin", dtype=meta["dtype"], mode="r")
    val_tokens = np.memmap(cache_entry / "val.bin", dtype=meta["dtype"], mode="r")

    # ------------------------------------------------------------------------------------------------------ model
    set_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's at prepare)
    model, block_size = build_model(args, tokenizer)
    for name, tokens in (("training", train_tokens), ("validation", val_tokens)):
        if len(tokens) <= block_size:
            fail(
                f"the {name} data has {len(tokens)} tokens, fewer than one block of {block_size} + 1: give more text "
                "or a smaller --block_size"
            )
    check_memory(
        accelerator,
        training_memory(args, model, block_size, accelerator),
        "--block_size, --per_device_train_batch_size (--gradient_accumulation_steps keeps the global batch) or the "
        "model size (--model_size, --n_layer, --n_embd)",
    )
    global_batch_size = args.per_device_train_batch_size * accumulation * accelerator.num_processes
    train_loader, val_loader = make_loaders(args, train_tokens, val_tokens, block_size, global_batch_size)
    optimizer, lr_scheduler = make_optimizer(args, model)
    flops_per_token = training_flops_per_token(model, block_size)
    num_parameters = sum(p.numel() for p in model.parameters())

    # ---------------------------------------------------------------------------------------------------- prepare
    model, optimizer, train_loader, val_loader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_loader, val_loader, lr_scheduler
    )
    log = RunLog(accelerator, args, output_dir, checkpointer.resumed_step)  # creates the output folder
    meter, guard = Meter(accelerator, "tokens", start_time), Guard(accelerator, args, log)
    local_sgd = LocalSGD(accelerator, model, args.local_sgd_steps)
    checkpointer.restore(optimizer, meter, guard, local_sgd)
    first_step = checkpointer.resumed_step or 0
    # A resumed run's sampler replays the same seeded stream, and the batches already trained on are skipped.
    train_batches = iter(
        accelerator.skip_first_batches(train_loader, first_step * accumulation) if first_step else train_loader
    )
    logger.info(
        f"{RECIPE}: {accelerator.num_processes} process(es) on {accelerator.device}, {num_parameters / 1e6:.2f}M "
        f"parameters, vocabulary {len(tokenizer)}, global batch {global_batch_size} x {block_size} tokens "
        f"({accumulation} accumulation step(s)), {args.max_train_steps} steps"
    )

    # ------------------------------------------------------------------------------------------------------- loop
    eval_loss = float("nan")
    bar = dict(total=args.max_train_steps, initial=first_step, disable=not accelerator.is_main_process, desc="train")
    with tqdm(**bar, mininterval=1.0, dynamic_ncols=True) as progress, local_sgd:
        model.train()
        for step in range(first_step + 1, args.max_train_steps + 1):
            micro_batches = itertools.islice(train_batches, accumulation)
            result = train_step(accelerator, model, optimizer, micro_batches, args.max_grad_norm, flops_per_token)
            guard.check(step, result)  # a NaN or inf gradient: the step is skipped, or the run stops
            meter.add(result)
            lr_scheduler.step()  # once per optimizer step, applied or skipped (docs/data_parallel.md)
            local_sgd.step(step)  # every K-th step: average the replicas
            progress.update(1)
            if step % args.log_every == 0 or step == args.max_train_steps:
                record = {**meter.record(step), "lr": lr_scheduler.get_last_lr()[0]}
                log(
                    record,
                    f"step {step:>6} | loss {record.get('loss', float('nan')):.4f} | lr {record['lr']:.3e} | "
                    f"{record['tokens_per_second']:,.0f} tok/s | {record['tflops']:.3g} TFLOP/s",
                )
                progress.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}", refresh=False)
            if step % args.eval_every == 0 or step == args.max_train_steps:
                with meter.paused("eval"):
                    local_sgd.average()  # one model to evaluate: the replicas' mean
                    eval_loss = evaluate(accelerator, model, val_loader)
                # Bits per byte of validation text: comparable across tokenizers (a token is 1 byte or several).
                bits_per_byte = eval_loss * meta["val_tokens"] / meta["val_bytes"] / math.log(2)
                record = {"step": step, "eval_loss": eval_loss, "eval_bits_per_byte": bits_per_byte}
                log(record, f"step {step:>6} | val loss {eval_loss:.4f} ({bits_per_byte:.4f} bits per byte)")
            if step == args.max_train_steps:
                break  # the end of training saves the model itself (a signal now lets it finish)
            checkpointer.save(step)  # every --checkpointing_steps
            guard.stop_if_preempted(step, checkpointer)  # after a signal: every process checkpoints, exits 75

    # ------------------------------------------------------------------------------------------------------- save
    summary = meter.summary()
    save_model(accelerator, model, tokenizer, output_dir)
    sample = generate_sample(accelerator, model, tokenizer, args.prompt, args.sample_tokens, block_size)
    results = {
        "world_size": accelerator.num_processes,
        "optimizer_steps": args.max_train_steps,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": accumulation,
        "global_batch_size": global_batch_size,
        "block_size": block_size,
        "train_tokens_seen": args.max_train_steps * global_batch_size * block_size,
        "num_parameters": num_parameters,
        "flops_per_token": flops_per_token,
        **summary,
        "train_loss": meter.last_loss,  # the last log step's: the mean over the steps since the one before
        "eval_loss": eval_loss,
        "eval_bits_per_byte": eval_loss * meta["val_tokens"] / meta["val_bytes"] / math.log(2),
        "mixed_precision": accelerator.mixed_precision,
        "ddp_comm_hook": args.ddp_comm_hook,
        "local_sgd_steps": args.local_sgd_steps,
        "total_runtime_s": time.perf_counter() - start_time,
    }
    if accelerator.is_main_process:
        (output_dir / "all_results.json").write_text(json.dumps(results, indent=2) + "\n")
        if sample:
            (output_dir / "sample.txt").write_text(sample)
            print("---- sample ----\n" + sample + "\n----------------", flush=True)
        mfu = f" (MFU {results['mfu']:.1%})" if results["mfu"] is not None else ""
        logger.info(
            f"{RECIPE}: final val loss {eval_loss:.4f}, {results['tokens_per_second']:,.0f} tok/s, "
            f"{results['tflops']:.3g} TFLOP/s{mfu}, peak memory {results['peak_memory_gib']:.2f} GiB, "
            f"{results['train_runtime_s']:.1f}s training; saved to {output_dir}"
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
