"""nanoGPT's CPU benchmark with recipes/gpt_pretrain.py: wall time (start-up included) and final validation loss.

The recipe's defaults are nanoGPT's CPU settings (4 layers, 4 heads, width 128, block 64, batch 12, 2000 steps,
lr 1e-3 cosine to 1e-4, warmup 100, dropout 0, eval every 250 steps on 20 batches), on the bundled Tiny
Shakespeare at the character level. nanoGPT's own train.py took about 140 s here for 1.886.

    python benchmarks/nanogpt_cpu.py                 # one run
    python benchmarks/nanogpt_cpu.py --repeats 3     # median of three
    python benchmarks/nanogpt_cpu.py -- --max_train_steps 500   # extra arguments go to the recipe

Like nanoGPT's prepare.py, tokenization is done once beforehand (an untimed 1-step run fills the token cache).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "gpt_pretrain.py"
NANOGPT_WALL_S, NANOGPT_VAL_LOSS = 140.0, 1.886
TARGET_VAL_LOSS, TARGET_WALL_S = 1.88, 110.0  # issue 6: <= 1.88 within 110 s, start-up included


def run_recipe(output_dir: Path, cache_dir: Path, extra: list[str]) -> tuple[float, dict]:
    command = [sys.executable, str(RECIPE), "--output_dir", str(output_dir), "--cache_dir", str(cache_dir), *extra]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    return wall, json.loads((output_dir / "all_results.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("recipe_args", nargs=argparse.REMAINDER, help="after --: passed to the recipe")
    args = parser.parse_args()
    extra = [a for a in args.recipe_args if a != "--"]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run_recipe(tmp / "warmup", tmp / "cache", [*extra, "--max_train_steps", "1", "--sample_tokens", "0"])
        walls, losses = [], []
        for i in range(args.repeats):
            wall, results = run_recipe(tmp / f"run{i}", tmp / "cache", extra)
            walls.append(wall)
            losses.append(results["eval_loss"])
            print(
                f"run {i + 1}: wall {wall:6.1f} s (training {results['train_runtime_s']:.1f} s, "
                f"{results['tokens_per_second']:,.0f} tok/s) | val loss {results['eval_loss']:.4f}",
                flush=True,
            )
    wall, loss = statistics.median(walls), statistics.median(losses)
    print(f"median of {args.repeats}: wall {wall:.1f} s, val loss {loss:.4f}")
    print(f"against nanoGPT's train.py here ({NANOGPT_WALL_S:.0f} s, {NANOGPT_VAL_LOSS}): "
          f"wall ratio {wall / NANOGPT_WALL_S:.2f}, val loss {loss - NANOGPT_VAL_LOSS:+.4f}")  # fmt: skip
    met = loss <= TARGET_VAL_LOSS and wall <= TARGET_WALL_S
    print(f"target val loss <= {TARGET_VAL_LOSS} within {TARGET_WALL_S:.0f} s: {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
