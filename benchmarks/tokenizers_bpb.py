"""Tokenizers compared on Tiny Shakespeare by validation bits per byte: char against BPEs trained here, offline.

    python benchmarks/tokenizers_bpb.py                                  # char, bpe:512, bpe:2048 (about 6 minutes)
    python benchmarks/tokenizers_bpb.py --tokenizers char bpe:8192 -- --max_train_steps 500

Each run is `accel-dp run gpt-pretrain --cpu --procs 1 -- --tokenizer T` with the recipe's defaults (nanoGPT's CPU
shape and schedule, 2000 steps of 12 x 64 tokens) and any extra arguments after `--`. A loss per token does not
compare across vocabularies (a BPE token stands for several characters); the loss per byte of validation text
does: eval_bits_per_byte = eval_loss x validation tokens / validation bytes / ln 2. The validation text is the
last 10 % of the token stream, so the held-out text differs slightly between tokenizers (its bytes are counted).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import warn_if_busy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizers", nargs="+", default=["char", "bpe:512", "bpe:2048"])
    parser.add_argument("recipe_args", nargs=argparse.REMAINDER, help="after --: passed to the recipe")
    args = parser.parse_args()
    extra = [a for a in args.recipe_args if a != "--"]
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    warn_if_busy()
    columns = ("tokenizer", "vocab", "val tokens", "val loss", "bits/byte", "tok/s", "bytes/s")
    print(" ".join(f"{c:>10}" for c in columns))
    with tempfile.TemporaryDirectory() as tmp:
        for tokenizer in args.tokenizers:
            out = Path(tmp) / tokenizer.replace(":", "-")
            recipe_args = ["--tokenizer", tokenizer, "--cache_dir", f"{tmp}/cache", "--output_dir", str(out), *extra]
            command = [sys.executable, "-m", "accel_dp", "run", "gpt-pretrain", "--cpu", "--procs", "1", "--"]
            done = subprocess.run([*command, *recipe_args], capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"error: --tokenizer {tokenizer} exited {done.returncode}: {done.stderr[-2000:]}")
            results = json.loads((out / "all_results.json").read_text())
            entry = next(p for p in (Path(tmp) / "cache").iterdir() if p.is_dir())  # this tokenizer's token cache
            meta = json.loads((entry / "meta.json").read_text())
            shutil.rmtree(entry)
            bytes_per_token = meta["val_bytes"] / meta["val_tokens"]
            row = (tokenizer, meta["vocab_size"], f"{meta['val_tokens']:,}", f"{results['eval_loss']:.4f}",
                   f"{results['eval_bits_per_byte']:.4f}", f"{results['tokens_per_second']:,.0f}",
                   f"{results['tokens_per_second'] * bytes_per_token:,.0f}")  # fmt: skip
            print(" ".join(f"{c:>10}" for c in row), flush=True)


if __name__ == "__main__":
    main()
