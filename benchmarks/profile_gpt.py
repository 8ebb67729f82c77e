"""Where the GPT recipe's time goes: cProfile over a run with nanoGPT's CPU settings, summed by stage.

    python benchmarks/profile_gpt.py                 # 500 steps of nanoGPT's CPU model, one process
    python benchmarks/profile_gpt.py --steps 2000    # the whole benchmark run

Prints each stage's share of the run (forward, backward, optimizer, clipping, data loading, evaluation, logging,
checkpoint/preemption checks, start-up), measured as the cumulative time of the functions that do it. cProfile
slows Python-heavy parts more than the torch kernels, so read the shares as an upper bound for the Python parts.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time

from common import load_recipe

# Stage -> (file fragment, function name) pairs whose cumulative time is the stage's time.
STAGES = {
    "forward": [("transformers/models/gpt2/modeling_gpt2.py", "forward")],
    "backward": [("accelerate/accelerator.py", "backward")],
    "optimizer step": [("accelerate/optimizer.py", "step")],
    "gradient clipping + non-finite check": [("accelerate/accelerator.py", "clip_grad_norm_")],
    "data loading": [("accelerate/data_loader.py", "__iter__")],
    "evaluation": [("gpt_pretrain.py", "evaluate")],
    "logging (loss reduce + metrics.jsonl)": [("accelerate/accelerator.py", "reduce"), ("run_log.py", "__call__")],
    "preemption check": [("accelerate/accelerator.py", "check_trigger")],
    "token cache + model build (start-up)": [
        ("token_cache.py", "prepare_token_cache"),
        ("transformers/modeling_utils.py", "from_config"),
    ],  # fmt: skip
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--top", type=int, default=15, help="also print the N functions with the most own time")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = load_recipe("gpt_pretrain")
    out = tempfile.mkdtemp(prefix="profile-gpt-")
    argv = ["--max_train_steps", str(args.steps), "--eval_every", "250", "--output_dir", out, "--sample_tokens", "0"]
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.runcall(recipe.main, argv)
    wall = time.perf_counter() - start
    stats = pstats.Stats(profiler)
    print(f"\n{args.steps} steps in {wall:.1f} s under cProfile ({torch.get_num_threads()} threads)")
    print(f"{'stage':<42} {'seconds':>8} {'share':>7}")
    for stage, functions in STAGES.items():
        seconds = 0.0
        for (file, _line, name), (_, _, _, cumulative, _) in stats.stats.items():
            if any(fragment in file and name == wanted for fragment, wanted in functions):
                seconds = max(seconds, cumulative) if stage == "forward" else seconds + cumulative
        print(f"{stage:<42} {seconds:>8.2f} {seconds / wall:>7.1%}")
    print(f"\nthe {args.top} functions with the most own time:")
    stats.sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
