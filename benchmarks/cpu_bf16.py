"""bf16 autocast on CPU against fp32, for both recipes, through `accel-dp run` (one CPU process, every core).

    python benchmarks/cpu_bf16.py                                # GLUE MRPC 3 epochs and GPT shakespeare 150 steps
    python benchmarks/cpu_bf16.py --recipes gpt --gpt_steps 300 --seeds 1 2

glue-bert: the default model (all-MiniLM-L6-v2) on the bundled MRPC for --glue_epochs epochs: training samples/s,
dev accuracy and F1. gpt-pretrain: `--model_size shakespeare` (6 layers x 384, block 256, batch 12, dropout 0.2) on
Tiny Shakespeare for --gpt_steps steps: training tokens/s and the validation loss after them. Each pair runs fp32
then bf16 (the other way round for the next seed), so that a slow phase of a shared machine hits both; the table
gives bf16's speed-up and its change in quality. What the CPU offers (AMX tiles, AVX-512 BF16) is printed first:
bf16 matmuls are fast only where one of them is.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import warn_if_busy

RUNS = {
    "glue": ("glue-bert", "train_samples_per_second", "samples/s", ("eval_accuracy", "eval_f1")),
    "gpt": ("gpt-pretrain", "tokens_per_second", "tok/s", ("eval_loss",)),
}


def cpu_bf16_features() -> str:
    flags = Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n", 1)[0].split()
    found = [f for f in ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f") if f in flags]
    return ", ".join(found) or "none of amx_bf16, avx512_bf16, avx512f"


def recipe_arguments(recipe: str, args, seed: int) -> list[str]:
    if recipe == "glue":
        return ["--task", "mrpc", "--num_train_epochs", str(args.glue_epochs), "--seed", str(seed)]
    return [
        "--model_size",
        "shakespeare",
        "--max_train_steps",
        str(args.gpt_steps),
        "--eval_every",
        str(args.gpt_steps),
        "--sample_tokens",
        "0",
        "--seed",
        str(seed),
    ]


def run(recipe: str, precision: str, recipe_args: list[str], output_dir: Path) -> dict:
    command = [
        sys.executable,
        "-m",
        "accel_dp",
        "run",
        RUNS[recipe][0],
        "--cpu",
        "--procs",
        "1",
        "--mixed-precision",
        precision,
        "--",
        *recipe_args,
        "--output_dir",
        str(output_dir),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(command)} exited {done.returncode}: {done.stderr[-2000:]}")
    return json.loads((output_dir / "all_results.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", choices=sorted(RUNS), default=["glue", "gpt"])
    parser.add_argument("--glue_epochs", type=int, default=3)
    parser.add_argument("--gpt_steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    args = parser.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    os.environ.pop("OMP_NUM_THREADS", None)  # accel-dp gives the process every core
    print(f"CPU bf16 features: {cpu_bf16_features()}", flush=True)
    warn_if_busy()

    with tempfile.TemporaryDirectory() as tmp:
        for recipe in args.recipes:
            _, speed_key, unit, quality_keys = RUNS[recipe]
            results = {"no": [], "bf16": []}
            for index, seed in enumerate(args.seeds):
                order = ("no", "bf16") if index % 2 == 0 else ("bf16", "no")
                for precision in order:
                    out = Path(tmp) / f"{recipe}-{precision}-{seed}"
                    result = run(recipe, precision, recipe_arguments(recipe, args, seed), out)
                    results[precision].append(result)
                    quality = ", ".join(f"{k} {result[k]:.4f}" for k in quality_keys)
                    name = "fp32" if precision == "no" else "bf16"
                    print(f"{recipe} seed {seed} {name}: {result[speed_key]:,.1f} {unit}, {quality}", flush=True)
            median = {
                p: {k: statistics.median(r[k] for r in rs) for k in (speed_key, *quality_keys)}
                for p, rs in results.items()
            }
            speed = {p: m[speed_key] for p, m in median.items()}
            change = ", ".join(f"{k} {median['bf16'][k] - median['no'][k]:+.4f}" for k in quality_keys)
            print(
                f"{recipe}: bf16/fp32 speed {speed['bf16'] / speed['no']:.3f}x "
                f"({speed['no']:,.1f} -> {speed['bf16']:,.1f} {unit}); bf16 - fp32: {change}",
                flush=True,
            )


if __name__ == "__main__":
    main()
