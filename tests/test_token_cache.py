"""gpt-pretrain's data path for corpora bigger than memory: read and tokenized a piece at a time into the token cache,
the same tokens as the tokenizer gives the whole text; a prepare step (`accel-dp prepare`) that training then finds;
ranks that wait on the finished cache entry, never in a collective; no half-written entry; a BPE trained offline;
validation loss in bits per byte for any tokenizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import heartbeat_lock
import numpy as np
import pytest
import token_cache as token_cache_module
from conftest import (
    RECIPES_DIR,
    SHAKESPEARE,
    gpt_args,
    load_recipe,
    read_metrics,
    reset_accelerate_state,
    subprocess_env,
)
from typer.testing import CliRunner

from accel_dp.cli import app

UNICODE = "Héllo, wörld ✓ — naïve café\n\tend 🙂 ÆØÅ\n" * 40  # 1-, 2-, 3- and 4-byte characters


def entry_tokens(entry: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    meta = json.loads((entry / "meta.json").read_text())
    return (np.fromfile(entry / "train.bin", dtype=meta["dtype"]), np.fromfile(entry / "val.bin", dtype=meta["dtype"]),
            meta)  # fmt: skip


def build(recipe, tmp_path: Path, *flags: str) -> Path:
    args = recipe.parse_args(["--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out"), *flags])
    entry, _ = token_cache_module.prepare_token_cache(args, builds=True)
    return entry


@pytest.mark.parametrize("tokenizer", ["char", "byte", "bpe:300"])
def test_pieces_give_the_tokenizers_own_tokens_of_the_whole_text(tmp_path, monkeypatch, tokenizer):
    """Read in pieces of 64 bytes (cut between lines, or between characters, never inside one), two files, the
    tokens are what the saved tokenizer gives each whole file, and the tail held out is the last 10 % of them."""
    recipe = load_recipe("gpt_pretrain")
    monkeypatch.setattr(token_cache_module, "PIECE_BYTES", 64)
    one, two = tmp_path / "one.txt", tmp_path / "two.txt"
    one.write_text(UNICODE)
    # A line longer than a piece is cut between characters (never inside one); a BPE then sees two parts, as it would
    # a line longer than the real 8 MB pieces: only char and byte get one. The BPE is given 64-character chunks.
    monkeypatch.setattr(token_cache_module, "CHUNK_CHARS", 64)
    two.write_text(("x" * 200 + "é" * 50 if tokenizer in ("char", "byte") else "") + UNICODE[:300])
    # A file that is one long line with spaces: pieces and chunks are cut before a space, a BPE's word boundary.
    three = tmp_path / "three.txt"
    three.write_text("word  of  mine, " * 40 + "end")
    entry = build(recipe, tmp_path, "--train_file", str(one), str(two), str(three), "--tokenizer", tokenizer)
    train, val, meta = entry_tokens(entry)
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(entry / "tokenizer")
    eos = [] if saved.eos_token_id is None else [saved.eos_token_id]
    expected = []
    for path in (one, two, three):
        expected += saved(path.read_text(), add_special_tokens=False)["input_ids"] + eos
    assert [*train, *val] == expected
    assert len(train) == int(len(expected) * 0.9) and meta["val_tokens"] == len(val)
    whole = one.read_text() + two.read_text() + three.read_text()
    assert saved.decode([*train, *val], skip_special_tokens=True) == whole


def test_a_long_corpus_is_written_a_piece_at_a_time(tmp_path, monkeypatch):
    """Memory bound: no token array of the whole corpus is ever held; the file grows piece by piece."""
    recipe = load_recipe("gpt_pretrain")
    monkeypatch.setattr(token_cache_module, "PIECE_BYTES", 4096)
    sizes = []
    original = token_cache_module.TokenFile.write

    def write_and_measure(self, batch):
        original(self, batch)
        self.file.flush()
        sizes.append(os.path.getsize(self.file.name))

    monkeypatch.setattr(token_cache_module.TokenFile, "write", write_and_measure)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SHAKESPEARE.read_text()[:100_000])
    build(recipe, tmp_path, "--train_file", str(corpus), "--tokenizer", "byte")
    assert len(sizes) >= 24 and max(np.diff(sizes)) <= (4096 + 200) * 2  # pieces of 4 kB to a line's end, 2 B a token


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "data file is empty:"), (b" \n\n  \n", "data file is empty:"),
     (b"fine\n" * 30 + "caf\xe9\n".encode("latin-1"), "is not UTF-8 text (byte 153)")],
    ids=["empty", "blank", "latin-1"],
)  # fmt: skip
def test_bad_data_is_one_line_and_leaves_no_cache_entry(tmp_path, monkeypatch, capsys, content, message):
    recipe = load_recipe("gpt_pretrain")
    monkeypatch.setattr(token_cache_module, "PIECE_BYTES", 64)  # the bad byte lies in the third piece
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        build(recipe, tmp_path, "--train_file", str(corpus))
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    cache = tmp_path / "cache"
    assert not cache.exists() or sorted(p.name for p in cache.iterdir() if not p.name.endswith(".failed")) == []


def test_a_rank_waits_for_the_entry_on_the_file_system_and_leaves_with_the_builders_failure(tmp_path):
    """Not the local main process: it never builds and uses no collective; it returns once the entry is there."""
    recipe = load_recipe("gpt_pretrain")
    args = recipe.parse_args(["--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out")])
    key, _ = token_cache_module.token_cache_key(args)
    found = {}

    def wait_for_the_entry():
        found["entry"] = token_cache_module.prepare_token_cache(args, builds=False)[0]

    thread = threading.Thread(target=wait_for_the_entry)
    thread.start()
    time.sleep(1.5)
    assert thread.is_alive() and not (tmp_path / "cache" / key).exists()  # waiting, building nothing
    build(recipe, tmp_path)  # the local main process (here, in this thread)
    thread.join(timeout=10)
    assert found["entry"] == tmp_path / "cache" / key

    (tmp_path / "other.txt").write_text("other text\n")
    args = recipe.parse_args(["--cache_dir", str(tmp_path / "cache"), "--train_file", str(tmp_path / "other.txt"),
                              "--output_dir", str(tmp_path / "out")])  # fmt: skip
    failed = tmp_path / "cache" / f"{token_cache_module.token_cache_key(args)[0]}.failed"
    # What a builder that met bad data leaves, a moment after this process began to wait.
    threading.Timer(1.0, lambda: failed.write_text("2")).start()
    with pytest.raises(SystemExit) as exit_info:
        token_cache_module.prepare_token_cache(args, builds=False)
    assert exit_info.value.code == 2


def test_a_killed_prepare_leaves_no_entry_and_the_next_one_builds_it(tmp_path):
    """SIGKILL in the middle of tokenizing: no half-written entry; its lock and staging folder do not hold up the
    next run, which builds the entry whole."""
    corpus = tmp_path / "big.txt"
    corpus.write_text(SHAKESPEARE.read_text() * 20)  # 22 MB: some seconds of work
    args = [sys.executable, str(RECIPES_DIR / "gpt_pretrain.py"),
            "--prepare_only", "--train_file", str(corpus), "--cache_dir",
            str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out")]  # fmt: skip
    process = subprocess.Popen(args, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list((tmp_path / "cache").glob("*.tmp-*/train.bin")):
        assert process.poll() is None and time.monotonic() < deadline, "tokenizing never started"
        time.sleep(0.05)
    process.kill()
    process.wait()
    cache = tmp_path / "cache"
    assert not [p for p in cache.iterdir() if (p / "meta.json").exists()]  # no entry
    recipe = load_recipe("gpt_pretrain")
    entry = build(recipe, tmp_path, "--train_file", str(corpus))
    assert (entry / "meta.json").is_file() and not list(cache.glob("*.lock")) and not list(cache.glob("*.tmp-*"))


def test_token_cache_py_run_alone_builds_the_entry_that_training_finds(tmp_path):
    """`python recipes/token_cache.py` with the training run's data flags, like nanoGPT's prepare.py."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SHAKESPEARE.read_text()[:30_000])
    data = ["--train_file", str(corpus), "--tokenizer", "bpe:300", "--cache_dir", str(tmp_path / "cache")]
    done = subprocess.run([sys.executable, str(RECIPES_DIR / "token_cache.py"), *data], env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    [entry] = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert f"token cache {entry} built: " in done.stdout
    args = load_recipe("gpt_pretrain").parse_args([*data, "--output_dir", str(tmp_path / "out")])
    found, meta = token_cache_module.prepare_token_cache(args, builds=False)
    assert found == entry  # found at once: nothing to wait for
    assert meta["vocab_size"] <= 300 and f"vocabulary {meta['vocab_size']:,}" in done.stdout
    line = token_cache_module.describe_entry(found, {**meta, "source": {"tokenizer": "bpe:100000"}})
    assert line.startswith(f"token cache {entry} reused (built earlier): ")  # a second run says it found it
    assert "(bpe:100000 asked for 100,000: the corpus has no more pairs to merge)" in line


def test_accel_dp_prepare_fills_the_cache_and_training_starts_from_it(tmp_path, token_cache, capfd):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SHAKESPEARE.read_text()[:120_000])
    data = ["--train_file", str(corpus), "--tokenizer", "bpe:400", "--cache_dir", str(tmp_path / "cache")]
    result = CliRunner().invoke(app, ["prepare", "gpt-pretrain", "--", *data])
    assert result.exit_code == 0, capfd.readouterr().err[-2000:]
    [entry] = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    stamp = (entry / "train.bin").stat().st_mtime_ns
    reset_accelerate_state()
    train = gpt_args(
        tmp_path / "run", token_cache, "--max_train_steps", "3", "--eval_every", "3", "--sample_tokens", "0"
    )
    results = load_recipe("gpt_pretrain").main([*train, *data])
    reset_accelerate_state()
    assert (entry / "train.bin").stat().st_mtime_ns == stamp  # found, not rebuilt
    # The BPE trained here is saved with the model: AutoTokenizer loads it from the run's folder.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run")
    assert len(tokenizer) == 400 and tokenizer.decode(tokenizer("ROMEO: hi")["input_ids"]) == "ROMEO: hi"
    # Validation loss in bits per byte, for runs with different vocabularies to compare.
    meta = json.loads((entry / "meta.json").read_text())
    [record] = [r for r in read_metrics(tmp_path / "run") if "eval_loss" in r]
    assert record["eval_bits_per_byte"] == pytest.approx(
        record["eval_loss"] * meta["val_tokens"] / meta["val_bytes"] / np.log(2)
    )
    assert 1.5 < meta["val_bytes"] / meta["val_tokens"] < 4  # a BPE token stands for several bytes
    assert results["eval_bits_per_byte"] == pytest.approx(record["eval_bits_per_byte"])


def test_dataset_name_streams_jsonl_files_and_refuses_a_missing_column(tmp_path, token_cache, capsys):
    folder = tmp_path / "jsonl"
    folder.mkdir()
    lines = SHAKESPEARE.read_text().splitlines()
    with open(folder / "train.jsonl", "w") as f:
        for start in range(0, 2000, 10):
            f.write(json.dumps({"content": "\n".join(lines[start : start + 10])}) + "\n")
    recipe = load_recipe("gpt_pretrain")
    entry = build(recipe, tmp_path, "--dataset_name", str(folder), "--text_column", "content")
    train, val, meta = entry_tokens(entry)
    documents = ["\n".join(lines[start : start + 10]) for start in range(0, 2000, 10)]
    assert meta["train_tokens"] + meta["val_tokens"] == sum(map(len, documents))  # char: no separator token
    with pytest.raises(SystemExit):
        build(recipe, tmp_path, "--dataset_name", str(folder), "--text_column", "text")
    assert "dataset has no column 'text'; choose one of ['content'] with --text_column" in capsys.readouterr().err


def test_text_without_newlines_is_cut_into_bounded_chunks():
    """A corpus that is one line (no newline in 20 MB) must not reach the tokenizer as one item: memory."""
    text = ("word " * 30_000) + ("x" * 100_000)  # spaces, then neither newline nor space
    pieces = list(token_cache_module.chunks(text))
    assert "".join(pieces) == text
    assert max(map(len, pieces)) <= 2 * token_cache_module.CHUNK_CHARS
    assert all(p.startswith(" ") for p in pieces[1:5])  # cut before a space where there is one


def test_a_stale_lock_is_taken_over_whatever_its_pid_says_and_a_wait_for_nobody_gives_up(tmp_path, monkeypatch, capsys):
    """A lock naming a live process of this machine (this test's own pid) whose heartbeat is old is stale: a builder
    takes it over. A process that may not build, waiting on an entry that no one builds, gives up with a line that
    names the lock and what to do."""
    import socket

    recipe = load_recipe("gpt_pretrain")
    args = recipe.parse_args(["--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out")])
    key, _ = token_cache_module.token_cache_key(args)
    lock = tmp_path / "cache" / f"{key}.lock"
    lock.parent.mkdir()
    lock.write_text(f"{socket.gethostname()}:{os.getpid()}")
    old = time.time() - 2 * heartbeat_lock.STALE_AFTER_S
    os.utime(lock, (old, old))
    monkeypatch.setattr(token_cache_module, "ABANDONED_AFTER_S", 1)
    with pytest.raises(SystemExit) as exit_info:  # not a builder: it waits, then gives up
        token_cache_module.prepare_token_cache(args, builds=False)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"lock {lock}: stale, from" in error and "accel-dp prepare" in error
    entry, _ = token_cache_module.prepare_token_cache(args, builds=True)  # a builder takes the stale lock over
    assert (entry / "meta.json").is_file() and not lock.exists()


def test_two_builders_racing_for_one_entry_build_it_once_and_leave_nothing_behind(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SHAKESPEARE.read_text() * 3)
    data = [str(RECIPES_DIR / "token_cache.py"), "--train_file", str(corpus), "--tokenizer", "byte", "--cache_dir",
            str(tmp_path / "cache")]  # fmt: skip
    builders = [subprocess.Popen([sys.executable, *data], env=subprocess_env(), stdout=subprocess.PIPE, text=True)
                for _ in range(2)]  # fmt: skip
    outputs = [b.communicate(timeout=120)[0] for b in builders]
    assert [b.returncode for b in builders] == [0, 0]
    entries = {line.split()[2] for out in outputs for line in out.splitlines() if line.startswith("token cache")}
    assert len(entries) == 1  # both name the one entry
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [next(iter(entries)).split("/")[-1]]
