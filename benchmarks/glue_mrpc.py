"""Benchmark: fine-tune the default model (all-MiniLM-L6) on the full bundled MRPC with the recipe's defaults.

    python benchmarks/glue_mrpc.py                         # 3 epochs, one process; prints accuracy, F1, wall time
    python benchmarks/glue_mrpc.py --procs 2               # the same over 2 CPU processes (gloo)
    python benchmarks/glue_mrpc.py -- --task sst2 --max_train_samples 8000 --num_train_epochs 1

Arguments after `--` go to recipes/glue_bert.py unchanged. Target on MRPC dev (what bert-base-cased reaches with
five times the parameters): accuracy >= 0.84 and F1 >= 0.88. Exit status 1 if an MRPC run misses it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPE = REPO_ROOT / "recipes" / "glue_bert.py"
TARGET = {"eval_accuracy": 0.84, "eval_f1": 0.88}


def main() -> int:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--procs", type=int, default=1, help="processes (CPU: gloo via accelerate launch)")
    p.add_argument("--output_dir", default=None, help="default: runs/bench-glue-<time>")
    args = p.parse_args(own)

    out = Path(args.output_dir or REPO_ROOT / "runs" / f"bench-glue-{time.strftime('%Y%m%d-%H%M%S')}")
    recipe_args = ["--output_dir", str(out), "--overwrite_output_dir", *extra]
    if args.procs > 1:
        cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", str(args.procs), "--num_machines", "1"]
        cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", str(RECIPE), *recipe_args]
    else:
        cmd = [sys.executable, str(RECIPE), *recipe_args]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if args.procs > 1:
        env.update(
            ACCELERATE_USE_CPU=env.get("ACCELERATE_USE_CPU", "1"), OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1")
        )
    print("$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    rc = subprocess.call(cmd, env=env, cwd=REPO_ROOT)
    wall = time.perf_counter() - start
    if rc != 0:
        print(f"recipe failed with exit status {rc}", file=sys.stderr)
        return rc
    results = json.loads((out / "all_results.json").read_text())
    metrics = {k: v for k, v in results.items() if k.startswith("eval_") and isinstance(v, float)}
    print(
        f"\n{results['task']}: "
        + ", ".join(f"{k[5:]} {v:.4f}" for k, v in metrics.items())
        + f" | {results['world_size']} process(es), {results['optimizer_steps']} optimizer steps, "
        + f"{results['epochs']} epoch(s)"
        + f" | train {results['train_runtime_s']:.0f}s ({results['train_samples_per_second']:.1f} samples/s), "
        + f"wall {wall:.0f}s"
    )
    if results["task"] == "mrpc" and not any(a.startswith("--max_train_samples") for a in extra):
        missed = {k: v for k, v in TARGET.items() if results.get(k, 0.0) < v}
        print("target (accuracy >= 0.84, F1 >= 0.88): " + ("met" if not missed else f"MISSED {missed}"))
        return 1 if missed else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
