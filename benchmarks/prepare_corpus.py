"""Preparing a corpus for gpt-pretrain: time and peak memory of `--prepare_only` by corpus size and tokenizer.

    python benchmarks/prepare_corpus.py                               # 50 MB, 200 MB, 1 GB x char, byte, bpe:8192
    python benchmarks/prepare_corpus.py --sizes 50 200 --tokenizers char
    python benchmarks/prepare_corpus.py --sizes 50 --baseline 7270de4  # beside the recipe of an earlier commit

Each corpus is the bundled Tiny Shakespeare repeated to the size asked for (MB = 10^6 bytes), written once into a
temporary folder. Each run is the recipe itself (`python recipes/gpt_pretrain.py --prepare_only --train_file F
--tokenizer T`) in a fresh process with a fresh cache, so its wall time includes start-up, reading, training the BPE
(bpe:8192) and writing the token files, and its peak resident memory is the process's own (os.wait4's rusage). The
last columns project the wall time of 10 GB and 40 GB (OpenWebText is about 40 GB of text) at the rate measured on the
largest corpus. With --baseline, the recipe of that commit (git show) runs on the same corpora, and the table gives
the ratio of the two wall times.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import warn_if_busy

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPE = REPO_ROOT / "recipes" / "gpt_pretrain.py"
SHAKESPEARE = REPO_ROOT / "data" / "tinyshakespeare" / "input.txt"
TARGETS = "targets: char and byte, 200 MB in <= 30 s; BPE >= 2 MB/s per core; peak RSS <= 1 GiB at 200 MB and 1 GB"


def make_corpus(path: Path, megabytes: int) -> None:
    text = SHAKESPEARE.read_bytes()
    size, written = megabytes * 10**6, 0
    with open(path, "wb") as f:
        while written < size:
            f.write(text[: size - written])
            written += min(len(text), size - written)


def prepare(recipe: Path, corpus: Path, tokenizer: str, cache: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in GiB) of one --prepare_only run in a fresh process."""
    shutil.rmtree(cache, ignore_errors=True)
    command = [sys.executable, str(recipe), "--prepare_only", "--train_file", str(corpus), "--tokenizer", tokenizer,
               "--cache_dir", str(cache), "--output_dir", str(cache / "out")]  # fmt: skip
    if "bpe" in tokenizer and not recipe_knows_bpe(recipe):
        return float("nan"), float("nan")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("TOKENIZERS_PARALLELISM", None)  # the Rust tokenizer's threads: every core
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"error: {recipe} failed on {corpus.name} ({tokenizer}): {process.stderr.read()[-2000:]}")
    return wall, usage.ru_maxrss / 2**20  # Linux: KiB


def recipe_knows_bpe(recipe: Path) -> bool:
    return "bpe:" in recipe.read_text()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 200, 1000], help="corpus sizes in MB")
    parser.add_argument("--tokenizers", nargs="+", default=["char", "byte", "bpe:8192"])
    parser.add_argument("--baseline", help="a git commit whose recipes/gpt_pretrain.py runs beside today's")
    args = parser.parse_args()
    warn_if_busy()
    cores = os.cpu_count()
    with tempfile.TemporaryDirectory(prefix="prepare-bench-") as tmp:
        tmp = Path(tmp)
        recipes = {"recipe": RECIPE}
        if args.baseline:  # the earlier recipe, beside the repository's data so that its defaults still resolve
            (tmp / "baseline" / "recipes").mkdir(parents=True)
            (tmp / "baseline" / "data").symlink_to(REPO_ROOT / "data")
            source = subprocess.run(["git", "-C", str(REPO_ROOT), "show", f"{args.baseline}:recipes/gpt_pretrain.py"],
                                    capture_output=True, text=True, check=True).stdout  # fmt: skip
            recipes["baseline"] = tmp / "baseline" / "recipes" / "gpt_pretrain.py"
            recipes["baseline"].write_text(source)
        print(f"{cores} CPU(s); {TARGETS}", flush=True)
        print(f"{'corpus':>8} {'tokenizer':>9} {'side':>8} {'wall s':>8} {'MB/s':>7} {'MB/s/core':>9} {'peak GiB':>8}"
              f" {'10 GB':>8} {'40 GB':>8} {'ratio':>6}")  # fmt: skip
        for megabytes in args.sizes:
            corpus = tmp / f"corpus-{megabytes}MB.txt"
            make_corpus(corpus, megabytes)
            for tokenizer in args.tokenizers:
                walls = {}
                for side, recipe in recipes.items():
                    wall, peak = prepare(recipe, corpus, tokenizer, tmp / "cache")
                    walls[side] = wall
                    rate = megabytes / wall
                    ratio = f"{wall / walls['recipe']:6.2f}" if side == "baseline" else ""
                    projected = f"{10_000 / rate / 60:7.1f}m {40_000 / rate / 60:7.1f}m"
                    print(f"{megabytes:>6}MB {tokenizer:>9} {side:>8} {wall:8.1f} {rate:7.1f} {rate / cores:9.2f} "
                          f"{peak:8.2f} {projected} {ratio}", flush=True)  # fmt: skip
            corpus.unlink()


if __name__ == "__main__":
    main()
