"""GLUE recipe on MRPC: training samples/s with dynamic padding (the default) against fixed 128-token padding.

    python benchmarks/glue_padding.py                     # 12 steps x batch 32, 3 repeats of each (~4 min)
    python benchmarks/glue_padding.py --quick             # 1 step, 1 repeat: checks that it runs (~30 s)
    python benchmarks/glue_padding.py --steps 30 --repeats 5 --threads 2

Both sides run recipes/glue_bert.py unchanged, one process, on the first --steps x 32 pairs of the bundled MRPC
training set (one epoch of --steps optimizer steps, the same shuffled batches on both), evaluating on 32 dev
pairs only (evaluation is not in the rate anyway):

  dynamic: python recipes/glue_bert.py --max_train_samples N --max_train_steps S ...   (pad each batch to its longest)
  fixed:   the same with --pad_to_max_length                                            (pad every batch to 128)

alternating (dynamic first in repeats 1, 3, ...; fixed first in 2, 4, ...). The rate is all_results.json's
train_samples_per_second (training time only: start-up and evaluation excluded); the ratio is dynamic / fixed on
the medians of the repeats. Target: dynamic padding, the recipe's default, is the faster (ratio > 1). The mean
padded length of the dynamic batches is printed beside it (the same seeded shuffle, recomputed here).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import load_recipe, warn_if_busy

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPE = REPO_ROOT / "recipes" / "glue_bert.py"
BASE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_recipe(fixed: bool, args, out: Path) -> dict:
    samples = args.steps * args.batch_size
    command = [
        sys.executable, str(RECIPE), "--task", "mrpc", "--max_train_samples", str(samples),
        "--max_train_steps", str(args.steps), "--per_device_train_batch_size", str(args.batch_size),
        "--max_length", str(args.max_length), "--max_eval_samples", "32", "--log_every", str(max(args.steps, 1)),
        "--output_dir", str(out), "--overwrite_output_dir",
    ] + (["--pad_to_max_length"] if fixed else [])  # fmt: skip
    env = dict(os.environ, **BASE_ENV)
    for name in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(name, None)
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    log = out.with_suffix(".log")
    start = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call(command, env=env, cwd=REPO_ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=3600)
    if rc != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise SystemExit(f"error: exit status {rc} from: {' '.join(command)}\n{tail}")
    results = json.loads((out / "all_results.json").read_text())
    results["wall_s"] = time.perf_counter() - start
    return results


def dynamic_lengths(args) -> tuple[float, int]:
    """Mean and largest padded length of the dynamic batches: the recipe's shuffle (seed 42) over the same subset."""
    import torch
    from transformers import AutoTokenizer

    recipe = load_recipe(RECIPE)
    defaults = recipe.parse_args([])
    import glue_data

    train = glue_data.read_glue_tsv("mrpc", REPO_ROOT / "data" / "glue" / "MRPC" / "train.tsv")
    train = train.select(range(min(args.steps * args.batch_size, len(train))))
    tokenizer = AutoTokenizer.from_pretrained(recipe.default_model_path())
    encoded = tokenizer(list(train["sentence1"]), list(train["sentence2"]), truncation=True, max_length=args.max_length)
    lengths = [len(ids) for ids in encoded["input_ids"]]
    loader = torch.utils.data.DataLoader(  # the recipe's training loader, over the lengths
        lengths, shuffle=True, batch_size=args.batch_size, generator=torch.Generator().manual_seed(defaults.seed)
    )
    padded = [int(batch.max()) for batch in loader]
    return statistics.mean(padded), max(padded)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per run (one epoch of steps x batch pairs)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each, alternating")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--max_length", type=int, default=128, help="the fixed side's padding length (recipe default 128)")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the recipe (default: inherited)")
    p.add_argument("--keep", help="keep the runs' folders and logs here (default: a temporary folder)")
    p.add_argument("--quick", action="store_true", help="1 step, 1 repeat: checks that it runs")
    args = p.parse_args()
    if args.quick:
        args.steps, args.repeats = 1, 1
    if args.steps * args.batch_size > 3668:
        raise SystemExit("error: --steps x --batch_size must stay within MRPC's 3,668 training pairs (one epoch)")

    tmp = tempfile.TemporaryDirectory() if args.keep is None else None
    root = Path(args.keep or tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    warn_if_busy()
    print(f"runs in {root}; {args.steps} steps x batch {args.batch_size}, {args.repeats} repeat(s)", flush=True)
    rates = {"dynamic": [], "fixed": []}
    for r in range(args.repeats):
        for name in ("dynamic", "fixed") if r % 2 == 0 else ("fixed", "dynamic"):
            res = run_recipe(name == "fixed", args, root / f"{name}-{r}")
            rates[name].append(res["train_samples_per_second"])
            print(
                f"repeat {r + 1}/{args.repeats} {name:>7}: {res['train_samples_per_second']:7.2f} samples/s | "
                f"training {res['train_runtime_s']:.1f} s, wall {res['wall_s']:.1f} s | "
                f"{res['optimizer_steps']} steps, train loss {res['train_loss']:.4f}",
                flush=True,
            )
    mean_len, max_len = dynamic_lengths(args)
    med = {k: statistics.median(v) for k, v in rates.items()}
    ratio = med["dynamic"] / med["fixed"]
    for k, v in rates.items():
        print(f"{k:>7}: median {med[k]:.2f} samples/s (runs: {', '.join(f'{x:.2f}' for x in sorted(v))})")
    paired = [d / f for d, f in zip(rates["dynamic"], rates["fixed"], strict=True)]
    print(f"paired ratios (dynamic / fixed per repeat): {', '.join(f'{x:.3f}' for x in paired)}")
    print(f"dynamic batches: padded to {mean_len:.1f} tokens on average (longest {max_len}), fixed: {args.max_length}")
    faster = "dynamic" if ratio > 1 else "fixed"
    print(
        f"SUMMARY: dynamic / fixed-{args.max_length} padding samples/s ratio {ratio:.3f} "
        f"({med['dynamic']:.2f} / {med['fixed']:.2f}, median of {args.repeats}): {faster} padding is faster; "
        f"target (the default, dynamic, is faster): {'met' if ratio > 1 else 'NOT met'}"
        + (" (--quick: not a measurement)" if args.quick else ""),
        flush=True,
    )
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
