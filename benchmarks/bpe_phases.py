"""Where a BPE prepare spends its time: training the tokenizer, then tokenizing, timed apart in one process.

    python benchmarks/bpe_phases.py                     # 50 MB, bpe:8192 (about half a minute)
    python benchmarks/bpe_phases.py --megabytes 200 --tokenizer bpe:32768
    git show COMMIT:recipes/gpt_pretrain.py > /tmp/old.py && python benchmarks/bpe_phases.py --recipe /tmp/old.py

The corpus is the bundled Tiny Shakespeare repeated to --megabytes (10^6 bytes). Both phases are the recipe's own
code (recipes/gpt_pretrain.py's build_tokenizer, file_batches and TokenFile, imported from the file); the peak
resident memory is read after each phase (it only grows). prepare_corpus.py times the whole prepare step instead.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from common import load_recipe

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPE = REPO_ROOT / "recipes" / "gpt_pretrain.py"
SHAKESPEARE = REPO_ROOT / "data" / "tinyshakespeare" / "input.txt"


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=50)
    parser.add_argument("--tokenizer", default="bpe:8192")
    parser.add_argument("--recipe", type=Path, default=RECIPE, help="another version of gpt_pretrain.py to time")
    args = parser.parse_args()
    os.environ.pop("TOKENIZERS_PARALLELISM", None)  # the Rust tokenizer's threads: every core
    load_recipe(args.recipe)  # its token_cache module, beside it
    import token_cache as recipe

    with tempfile.TemporaryDirectory() as tmp:
        corpus, text, size = Path(tmp) / "corpus.txt", SHAKESPEARE.read_bytes(), args.megabytes * 10**6
        corpus.write_bytes((text * (size // len(text) + 1))[:size])
        start = time.perf_counter()
        tokenizer = recipe.build_tokenizer(args.tokenizer, lambda: recipe.text_of(recipe.file_batches([str(corpus)])))
        trained = time.perf_counter()
        print(f"train {args.tokenizer}: {trained - start:6.1f} s, peak RSS {peak_gib():.2f} GiB", flush=True)
        tokens = recipe.TokenFile(Path(tmp) / "train.bin", tokenizer, args.tokenizer, np.uint32)
        for batch in recipe.file_batches([str(corpus)]):
            tokens.write(batch)
        tokens.file.close()
        encoded = time.perf_counter() - trained
        rate = args.megabytes / encoded / os.cpu_count()
        memory = f"peak RSS {peak_gib():.2f} GiB"
        print(f"tokenize:  {encoded:6.1f} s, {rate:.2f} MB/s per core, {tokens.tokens:,} tokens, {memory}", flush=True)


if __name__ == "__main__":
    main()
