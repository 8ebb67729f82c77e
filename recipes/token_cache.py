"""gpt-pretrain's token cache: a text corpus tokenized once into token files, like nanoGPT's prepare.py.

The corpus (UTF-8 text files, or a `datasets` dataset streamed from the Hub or a local folder) is read in pieces and
tokenized piece by piece into <cache_dir>/<key>/{train,val}.bin (uint16 or uint32 tokens) with its tokenizer, so
memory stays bounded whatever the corpus' size. The key hashes what the entry depends on (the files' paths, sizes and
times, the tokenizer, the held-out fraction): a later run with the same data reuses it.

    python recipes/token_cache.py --train_file corpus.txt --tokenizer bpe:8192   # build the cache, like prepare.py
    python recipes/gpt_pretrain.py --train_file corpus.txt --tokenizer bpe:8192  # finds it (or builds it first)

gpt_pretrain.py calls prepare_token_cache(args, builds) and add_data_arguments(parser); `--prepare_only` and
`accel-dp prepare gpt-pretrain` reach the same. Tokenizers: char, byte, bpe:N (a byte-level BPE trained here,
offline), or any Hugging Face tokenizer.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from accelerate import PartialState
from faults import BAD_INPUT_EXIT_CODE, FAILED_EXIT_CODE, INTERRUPTED_EXIT_CODE, before_leaving, fail, run_main
from heartbeat_lock import HeartbeatLock
from manifest import check_manifest, manifest_of
from messages import first_line, logger
from run_args import RecipeParser
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerFast

# Resolved next to this file, so it works from the repository and from an installed accel-dp alike.
BUNDLED_CORPUS = Path(__file__).resolve().parent.parent / "data" / "tinyshakespeare" / "input.txt"


class BadCorpus(Exception):
    """Bad data met while building an entry: the build cleans up, writes its failure marker, then fails with it."""


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--train_file", nargs="+", help="UTF-8 text file(s). Default: the bundled Tiny Shakespeare.")
    data.add_argument("--validation_file", nargs="+", help="UTF-8 text file(s); default: the train corpus' tail.")
    data.add_argument("--validation_split_fraction", type=float, default=0.1, help="Tail held out for validation.")
    data.add_argument("--dataset_name", help="A Hugging Face dataset (hub name or local folder) instead of files.")
    data.add_argument("--dataset_config_name")
    data.add_argument("--text_column", default="text")
    data.add_argument("--tokenizer", help="char (default), byte, bpe:N (trained here), or a Hugging Face tokenizer.")
    data.add_argument("--cache_dir", help="Where tokenized corpora are cached (default ~/.cache/accel-dp/tokens).")


def check_data_arguments(args: argparse.Namespace) -> None:
    if not 0.0 < args.validation_split_fraction < 1.0:
        fail(f"--validation_split_fraction must be between 0 and 1, got {args.validation_split_fraction}")
    if args.dataset_name and (args.train_file or args.validation_file):
        fail("give either --train_file/--validation_file or --dataset_name, not both")


def tokenizer_spec(args: argparse.Namespace) -> str:
    """--tokenizer, else the model's own (--model_name_or_path, when continuing a saved model), else char."""
    return args.tokenizer or getattr(args, "model_name_or_path", None) or "char"


CACHE_FORMAT_VERSION = 4  # 4: meta.json holds the token files' manifest
PIECE_BYTES = 8 * 2**20  # text read, tokenized and written at a time: it bounds the memory, not the corpus
CHUNK_CHARS = 2**14  # text per item given to the Rust tokenizer (see chunks)
ABANDONED_AFTER_S = 300  # a process waiting on an entry that nobody builds gives up after this
# The token files' SHA-256 is checked on every run up to this size (about 1 s per GB, docs/benchmarks.md); past it,
# their sizes only, and `python recipes/token_cache.py` with the same flags checks it whole.
DIGEST_LIMIT_BYTES = 2 * 2**30
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
                # Cut after the last line end; in a line longer than a piece, before its last space (a byte-level
                # BPE starts a word with its space: the same tokens as the whole text); else read on, up to 2 pieces.
                cut = len(block) if final else block.rfind(b"\n") + 1 or max(block.rfind(b" "), 0)
                if not cut and len(block) < 2 * PIECE_BYTES:
                    rest = block
                    continue
                cut = cut or utf8_end(block)  # a line longer than a piece is cut between two characters
                try:
                    piece = block[:cut].decode("utf-8")
                except UnicodeDecodeError as err:
                    at = offset + err.start
                    message = f"{path} is not UTF-8 text (byte {at}): convert it, e.g. `iconv -t UTF-8 {path}`"
                    raise BadCorpus(message) from None
                seen_text = seen_text or bool(piece.strip())
                yield [piece]
                offset, rest = offset + cut, block[cut:]
                if final:
                    break
        if not seen_text:
            raise BadCorpus(f"data file is empty: {path}")
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
            raise BadCorpus(
                f"dataset has no column {args.text_column!r}; choose one of {sorted(batch)} with --text_column"
            )
        texts = [text for text in batch[args.text_column] if text is not None]
        if any(not isinstance(text, str) for text in texts):
            kind = next(type(text).__name__ for text in texts if not isinstance(text, str))
            raise BadCorpus(
                f"dataset column {args.text_column!r} holds {kind} values, not text: choose a text column with "
                f"--text_column (it has {sorted(batch)})"
            )
        yield [item for text in texts if text for item in (text, None)]


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
        raise BadCorpus(f"cannot open dataset {args.dataset_name}: {first_line(e, 300)}") from None
    if "train" not in splits:
        raise BadCorpus(f"dataset {args.dataset_name} has no 'train' split (it has {splits})")
    held_out = next((s for s in ("validation", "test") if s in splits), None)
    return (lambda: dataset_batches(args, "train")), ((lambda: dataset_batches(args, held_out)) if held_out else None)


def text_of(batches: Iterator[list[str | None]]) -> Iterator[str]:
    return (item for batch in batches for item in batch if item)


def chunks(text: str) -> Iterator[str]:
    """The text in items of CHUNK_CHARS to 2 x CHUNK_CHARS characters: cut after a newline where there is one, else
    before a space (a byte-level BPE starts a word with its space), else (text without either) at 2 x CHUNK_CHARS.
    The Rust tokenizer spreads a batch's items over every core, and its trainer buffers 256 items: small ones keep
    both the cores busy and the memory small (8 MB pieces held 2 GB in the trainer's buffer; a 20 MB line cut only
    at newlines, 2.9 GB)."""
    start = 0
    while start < len(text):
        limit = start + 2 * CHUNK_CHARS
        end = text.find("\n", start + CHUNK_CHARS, limit) + 1 or max(text.find(" ", start + CHUNK_CHARS, limit), 0)
        end = end or min(limit, len(text))
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
            raise BadCorpus(f"--tokenizer {spec}: give a vocabulary size above the 256 bytes, e.g. bpe:8192")
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        trainer = trainers.BpeTrainer(  # (its progress bars print only blank lines into a log file)
            vocab_size=int(size), special_tokens=[EOS], initial_alphabet=alphabet, show_progress=False
        )
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
    spec = tokenizer_spec(args)
    if args.dataset_name:
        data = {"dataset": [fingerprint(args.dataset_name), args.dataset_config_name, args.text_column]}
    else:
        if not args.train_file and not BUNDLED_CORPUS.is_file():
            fail(f"no --train_file given and the bundled corpus is not at {BUNDLED_CORPUS}: pass --train_file FILE")
        data = {}
        for split, paths in (("train", args.train_file or [str(BUNDLED_CORPUS)]), ("validation", args.validation_file)):
            for path in paths or []:
                if os.path.isdir(path):
                    fail(
                        f"{path} is a folder: give the text files in it (--train_file {path}/*.txt), or "
                        f"--dataset_name {path} for a folder of text, JSON Lines or Parquet files"
                    )
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


def prepare_token_cache(args, builds: bool) -> tuple[Path, dict]:
    """Tokenize the corpus once into <cache>/<key>/{train,val}.bin plus the tokenizer; later runs reuse the entry.

    One process per machine (`builds`: the local main) builds it, in a folder of its own renamed into place when
    whole: an interrupted build never leaves a half-written entry. A lock file keeps machines sharing the file system
    from building it twice; machines that do not share one each build their own. The other processes wait for the
    finished entry on the file system, with progress in the log, not in a collective that a large corpus would
    time out."""
    key, source = token_cache_key(args)
    root = Path(args.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "accel-dp", "tokens"))
    entry, started, next_note = root / key, time.time(), time.time() + 30
    made_root = not root.exists()  # (removed again if bad data leaves it empty)
    try:  # on every process alike, making nothing (a built entry may be read from a read-only cache)
        if not (entry / "meta.json").is_file():
            existing = next(p for p in (root, *root.parents) if p.exists())
            with tempfile.TemporaryFile(dir=existing):  # (os.access says yes to root, also on a read-only file system)
                pass
            if builds:
                root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        fail(f"--cache_dir {root} cannot be written to ({error.strerror}): choose another folder with --cache_dir")
    lock, unbuilt_since = HeartbeatLock(root / f"{key}.lock"), time.time()
    while not (entry / "meta.json").is_file():
        if builds and lock.claim():
            build_token_cache(args, source, root, key, lock, made_root)
            continue
        failed = root / f"{key}.failed"
        if failed.is_file() and failed.stat().st_mtime >= started:  # the builder has said why; leave as it did
            raise SystemExit(int(failed.read_text() or FAILED_EXIT_CODE))
        builder = lock.holder()
        if builder is not None and not builder.gone:  # a live builder's heartbeat: wait as long as it works
            unbuilt_since = time.time()
        elif time.time() - unbuilt_since > ABANDONED_AFTER_S:
            fail(
                f"no process has built the token cache {entry} for {ABANDONED_AFTER_S} s (lock {lock.path}: "
                f"{'none' if builder is None else 'stale, from ' + builder.who}): build it first with "
                "`accel-dp prepare gpt-pretrain -- <the same data flags>`, or remove the lock if its builder is gone"
            )
        if time.time() > next_note:
            written = sum(p.stat().st_size for p in root.glob(f"{key}.tmp-*/*.bin"))
            holder = "no builder yet" if builder is None else f"builder {builder.who}"
            logger.info(
                f"waiting {time.time() - started:,.0f} s for the token cache {entry} (lock {lock.path}, {holder}): "
                f"{written / 2**20:,.0f} MiB written so far"
            )
            next_note += 30
        time.sleep(0.5)
    meta = checked_entry(entry, digests=builds)
    return entry, {**meta, "built_here": (entry / "meta.json").stat().st_mtime >= started}


def describe_entry(entry: Path, meta: dict) -> str:
    """An entry in one line: built now or found built, its tokens, and its real vocabulary (a BPE stops short of the
    size asked for when the corpus has no more pairs to merge)."""
    how = "built" if meta.get("built_here") else "reused (built earlier)"
    spec = str(meta.get("source", {}).get("tokenizer"))
    asked = spec.removeprefix("bpe:")
    short = asked.isdigit() and spec.startswith("bpe:") and int(asked) > meta["vocab_size"]
    note = f" ({spec} asked for {int(asked):,}: the corpus has no more pairs to merge)" if short else ""
    return (
        f"token cache {entry} {how}: {meta['train_tokens']:,} training and {meta['val_tokens']:,} validation tokens, "
        f"vocabulary {meta['vocab_size']:,}{note}"
    )


def checked_entry(entry: Path, digests: bool, digest_limit: float = DIGEST_LIMIT_BYTES) -> dict:
    """The entry's meta.json, once its token files are checked against it: their sizes always, and (`digests`: one
    process per machine) their SHA-256 when the entry holds at most DIGEST_LIMIT_BYTES. A damaged entry is refused
    with what to delete, never trained on."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        files = meta["files"]
        whole = sum(size for size, _ in files.values())
        check_manifest(entry, files, digests=digests and whole <= digest_limit)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        fail(
            f"the token cache {entry} is damaged or from an older version ({type(error).__name__}: "
            f"{first_line(error)}): delete that folder and run again, and it is rebuilt"
        )
    return meta


def build_token_cache(args, source: dict, root: Path, key: str, lock: HeartbeatLock, made_root: bool) -> None:
    """Tokenize into a staging folder and rename it into place, holding the entry's lock (claimed) throughout. A build
    that fails leaves nothing behind: its failure marker (<key>.failed, which tells the processes waiting on this
    machine to leave with the builder's code) lasts until this process leaves, and a cache folder it made is removed
    again if empty."""
    staging, marker = root / f"{key}.tmp-{socket.gethostname()}-{os.getpid()}", root / f"{key}.failed"
    marker.unlink(missing_ok=True)
    try:
        for abandoned in root.glob(f"{key}.tmp-*"):  # what a builder that is gone left half-written
            shutil.rmtree(abandoned, ignore_errors=True)
        staging.mkdir(parents=True)
        meta = tokenize_corpus(args, staging)
        meta["files"] = manifest_of(staging, [staging / "train.bin", staging / "val.bin"])
        (staging / "meta.json").write_text(json.dumps({**meta, "source": source}, indent=1))
        try:
            staging.rename(root / key)
        except OSError:  # another machine sharing this file system finished first: use its entry
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException as error:  # bad data, Ctrl-C or a kill: no half-written entry; the waiting ones learn why
        shutil.rmtree(staging, ignore_errors=True)
        code = error.code if isinstance(error, SystemExit) and isinstance(error.code, int) else FAILED_EXIT_CODE
        code = {BadCorpus: BAD_INPUT_EXIT_CODE, KeyboardInterrupt: INTERRUPTED_EXIT_CODE}.get(type(error), code)
        marker.write_text(str(code))
        before_leaving(lambda: forget_failure(marker, root if made_root else None))
        if isinstance(error, BadCorpus):
            lock.release()
            fail(str(error))
        raise
    finally:
        lock.release()


def forget_failure(marker: Path, made_root: Path | None, linger_s: float = 1.0) -> None:
    """Remove a failed build's marker once the processes waiting for it (they look twice a second) have seen it, and
    the cache folder the build made if nothing else is in it."""
    time.sleep(linger_s)
    marker.unlink(missing_ok=True)
    if made_root is not None:
        with contextlib.suppress(OSError):  # (not empty: another build's files)
            made_root.rmdir()


def tokenize_corpus(args, folder: Path) -> dict:
    """The tokenizer into folder/tokenizer, and the corpus into folder/train.bin and val.bin, a batch at a time."""
    train, validation = corpus(args)
    spec = tokenizer_spec(args)
    splits = (train, validation) if spec == "char" else (train,)  # char's vocabulary: all the corpus' characters
    tokenizer = build_tokenizer(spec, lambda: itertools.chain.from_iterable(text_of(s()) for s in splits if s))
    tokenizer.save_pretrained(folder / "tokenizer")
    dtype = np.uint16 if len(tokenizer) <= 2**16 else np.uint32
    marks = {}  # (tokens, text bytes) after each batch: where a token boundary falls in the text
    for name, batches in (("train", train), ("val", validation)):
        if batches is None:
            continue
        tokens, marks[name] = TokenFile(folder / f"{name}.bin", tokenizer, spec, dtype), [(0, 0)]
        with tqdm(desc=f"tokenizing {name}", unit="B", unit_scale=True, mininterval=2.0, disable=None) as progress:
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


def main(argv: list[str] | None = None) -> dict:
    """Build the cache entry for these data flags (the training run's own) and say where it is."""
    parser = RecipeParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser)
    args = parser.parse_args(argv)
    check_data_arguments(args)
    PartialState()  # accelerate's logger (the wait's progress lines) needs it; one process, no Accelerator
    entry, meta = prepare_token_cache(args, builds=True)
    checked_entry(entry, digests=True, digest_limit=float("inf"))  # whatever its size
    print(describe_entry(entry, meta))
    return {"token_cache": str(entry), **{k: v for k, v in meta.items() if k != "source"}}


if __name__ == "__main__":
    run_main(main, "token-cache")
