"""nanoGPT's CPU benchmark, side by side: nanoGPT's own train.py and gpt-pretrain through `accel-dp run`.

    python benchmarks/nanogpt_cpu.py --nanogpt_dir ~/nanoGPT              # 2 rounds, each runs both
    python benchmarks/nanogpt_cpu.py --nanogpt_dir ~/nanoGPT --rounds 3
    python benchmarks/nanogpt_cpu.py --nanogpt_dir ~/nanoGPT -- --mixed_precision bf16   # extra recipe arguments
    python benchmarks/nanogpt_cpu.py --nanogpt_dir ~/nanoGPT --config compile_cpu.yaml  # accel-dp run --config

--nanogpt_dir is a checkout of https://github.com/karpathy/nanoGPT whose data/shakespeare_char/prepare.py has been
run on the bundled Tiny Shakespeare (copy data/tinyshakespeare/input.txt into its data/shakespeare_char/ first, so
that prepare.py does not download it). Both sides get the same model shape (4 layers, 4 heads, width 128, block
64), batch 12, 2000 steps, lr 1e-3 with 100 warmup steps and cosine decay to 1e-4, AdamW
(0.9, 0.99), weight decay 0.1, clipping 1.0, dropout 0, evaluation every 250 steps on 20 batches, one process
on every core. Differences that remain: nanoGPT's Linear and LayerNorm layers have no bias (GPT-2's, which the
recipe trains, do), nanoGPT evaluates the train and the validation split at each evaluation (the recipe the
validation split only) and on random windows (the recipe on fixed, evenly spaced ones).

The two run one after the other, in alternating order, so that a slow phase of a shared machine hits both. Each
wall time runs from starting the command to its exit: the recipe's includes accel-dp's and accelerate's start-up,
imports, 8 evaluations, saving the model and the end-of-run sample. Tokenization is done once beforehand for both,
as nanoGPT's prepare.py does (the recipe's token cache is filled by an untimed --prepare_only run).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import warn_if_busy

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "gpt_pretrain.py"
TARGET_VAL_LOSS, TARGET_RATIO = 1.88, 0.8  # issue 15: val loss <= 1.88 in at most 0.8x nanoGPT's wall time
SHAPE = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0)


def nanogpt_command(steps: int, out_dir: Path) -> list[str]:
    shape = [f"--{k}={v}" for k, v in SHAPE.items()]
    return [
        sys.executable,
        "train.py",
        "config/train_shakespeare_char.py",
        "--device=cpu",
        "--compile=False",
        "--eval_iters=20",
        "--batch_size=12",
        *shape,
        f"--max_iters={steps}",
        f"--lr_decay_iters={steps}",
        f"--out_dir={out_dir}",
    ]


def recipe_arguments(steps: int, cache_dir: Path, extra: list[str]) -> list[str]:
    shape = ["--model_size", "nano", "--block_size", "64", "--dropout", "0"]
    return [
        *shape,
        "--per_device_train_batch_size",
        "12",
        "--max_train_steps",
        str(steps),
        "--learning_rate",
        "1e-3",
        "--eval_every",
        "250",
        "--eval_iters",
        "20",
        "--cache_dir",
        str(cache_dir),
        *extra,
    ]


def timed(command: list[str], cwd: Path | None = None) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(command[:4])} ... exited {done.returncode}: {done.stderr[-2000:]}")
    return wall, done.stdout + done.stderr


def run_nanogpt(nanogpt_dir: Path, steps: int, out_dir: Path) -> tuple[float, float]:
    wall, output = timed(nanogpt_command(steps, out_dir), cwd=nanogpt_dir)
    val_losses = re.findall(r"val loss ([0-9.]+)", output)
    if not val_losses:
        raise SystemExit(f"error: no 'val loss' line in nanoGPT's output: {output[-1000:]}")
    return wall, float(val_losses[-1])


def run_recipe(steps: int, cache_dir: Path, out_dir: Path, extra: list[str], config: str | None) -> tuple[float, dict]:
    launch = ["--config", config] if config else ["--cpu", "--procs", "1"]
    recipe_args = [*recipe_arguments(steps, cache_dir, extra), "--output_dir", str(out_dir)]
    command = [sys.executable, "-m", "accel_dp", "run", "gpt-pretrain", *launch, "--", *recipe_args]
    wall, _ = timed(command)
    return wall, json.loads((out_dir / "all_results.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nanogpt_dir", type=Path, required=True, help="a nanoGPT checkout, shakespeare_char prepared")
    parser.add_argument("--rounds", type=int, default=2, help="each round runs nanoGPT and the recipe once")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--config", help="accel-dp run's --config (for example one with dynamo_backend INDUCTOR)")
    parser.add_argument("recipe_args", nargs=argparse.REMAINDER, help="after --: passed to the recipe")
    args = parser.parse_args()
    extra = [a for a in args.recipe_args if a != "--"]
    prepared = args.nanogpt_dir / "data" / "shakespeare_char" / "train.bin"
    if not (args.nanogpt_dir / "train.py").is_file() or not prepared.is_file():
        raise SystemExit(
            f"error: {args.nanogpt_dir} is not a prepared nanoGPT checkout (no train.py or {prepared}): clone "
            "karpathy/nanoGPT, copy data/tinyshakespeare/input.txt to its data/shakespeare_char/ and run "
            "data/shakespeare_char/prepare.py there"
        )
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    os.environ.pop("OMP_NUM_THREADS", None)  # both sides use every core (accel-dp passes its own thread count)
    warn_if_busy()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = tmp / "cache"
        timed([sys.executable, str(RECIPE), *recipe_arguments(1, cache, []), "--prepare_only"])  # untimed
        nanogpt_walls, nanogpt_losses, recipe_walls, recipe_losses = [], [], [], []
        for round_ in range(args.rounds):
            order = ("nanogpt", "recipe") if round_ % 2 == 0 else ("recipe", "nanogpt")
            for side in order:
                if side == "nanogpt":
                    wall, loss = run_nanogpt(args.nanogpt_dir, args.steps, tmp / f"nanogpt{round_}")
                    nanogpt_walls.append(wall), nanogpt_losses.append(loss)
                    print(f"round {round_ + 1}: nanoGPT train.py wall {wall:6.1f} s | val loss {loss:.4f}", flush=True)
                else:
                    wall, results = run_recipe(args.steps, cache, tmp / f"recipe{round_}", extra, args.config)
                    recipe_walls.append(wall), recipe_losses.append(results["eval_loss"])
                    speed = f"training {results['train_runtime_s']:.1f} s, {results['tokens_per_second']:,.0f} tok/s"
                    loss = results["eval_loss"]
                    print(f"round {round_ + 1}: accel-dp run      wall {wall:6.1f} s | val loss {loss:.4f} | {speed}")
    nanogpt_wall, recipe_wall = statistics.median(nanogpt_walls), statistics.median(recipe_walls)
    recipe_loss = statistics.median(recipe_losses)
    ratio = recipe_wall / nanogpt_wall
    print(f"median wall: nanoGPT {nanogpt_wall:.1f} s, recipe {recipe_wall:.1f} s; ratio recipe/nanoGPT {ratio:.3f}")
    print(f"val loss: nanoGPT {statistics.median(nanogpt_losses):.4f}, recipe {recipe_loss:.4f}")
    met = recipe_loss <= TARGET_VAL_LOSS and ratio <= TARGET_RATIO
    target = f"val loss <= {TARGET_VAL_LOSS} in <= {TARGET_RATIO}x nanoGPT's wall time"
    print(f"target ({target}): {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
