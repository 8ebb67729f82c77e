"""Data-parallel communication modes on CPU: bytes per optimizer step, step time and validation loss, each against
plain all-reduce run in the same invocation.

    python benchmarks/dp_modes.py                     # 300 steps per mode, 6 modes, 1 repeat (~5 min on 2 cores)
    python benchmarks/dp_modes.py --quick             # 20 steps, 3 modes: checks that it runs (~1 min)
    python benchmarks/dp_modes.py --modes plain fp16 local4 --steps 500 --repeats 3

Every mode runs recipes/gpt_pretrain.py unchanged on 2 processes x 1 thread over gloo (torchrun), nanoGPT's CPU
model (4 layers, 4 heads, width 128, block 64; 0.8M parameters) on Tiny Shakespeare characters, 6 sequences per
process (global batch 12), --steps optimizer steps with 10 % warmup, and one evaluation at the end (20 batches):

  plain      DDP's fp32 all-reduce of every gradient (the baseline)
  fp16       --ddp_comm_hook fp16: gradients cast to fp16 for the all-reduce
  powersgd1  --ddp_comm_hook powersgd --powersgd_rank 1 (plain all-reduce for the first --powersgd_start_iter steps)
  powersgd4  --ddp_comm_hook powersgd --powersgd_rank 4
  local4     --local_sgd_steps 4: no gradient all-reduce, parameters averaged every 4 steps
  local16    --local_sgd_steps 16
  bf16       --ddp_comm_hook bf16 (GPU only: torch refuses it over gloo; not in the default list)

Bytes: each rank counts what it hands to torch.distributed.all_reduce, split by caller: DDP communication hooks
(gradients; the plain baseline runs torch's allreduce_hook, which does what DDP's built-in C++ all-reduce does, so
that its bytes pass through Python too), accelerate's LocalSGD (parameters) and the rest (the recipe's loss and
preemption-trigger scalars, reported apart). This is the payload per rank; a ring all-reduce sends about
2(K-1)/K times it per rank (once, for K = 2). Step time: the median of the recipe's per-10-step rates in
metrics.jsonl (evaluation excluded), the first interval left out. Validation loss: all_results.json's eval_loss
after --steps steps; the runs are deterministic, so its difference to plain is the mode's quality cost at this
length (timings are not: the machine is noisy, use --repeats and a quiet machine).
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

from common import free_port, load_recipe, warn_if_busy

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPE = REPO_ROOT / "recipes" / "gpt_pretrain.py"
BASE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
MODES = {
    "plain": [],
    "fp16": ["--ddp_comm_hook", "fp16"],
    "bf16": ["--ddp_comm_hook", "bf16"],
    "powersgd1": ["--ddp_comm_hook", "powersgd", "--powersgd_rank", "1"],
    "powersgd4": ["--ddp_comm_hook", "powersgd", "--powersgd_rank", "4"],
    "local4": ["--local_sgd_steps", "4"],
    "local16": ["--local_sgd_steps", "16"],
}
DEFAULT_MODES = ["plain", "fp16", "powersgd1", "powersgd4", "local4", "local16"]


# ---------------------------------------------------------------------------------------------------- worker
# `dp_modes.py --worker RESULT.json RECIPE_ARGS...` under torchrun: the recipe in this process, all-reduces counted.


def worker(result_path: str, recipe_args: list[str]) -> int:
    import accelerate
    import torch
    import torch.distributed
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    sent = {"gradients": 0, "parameters": 0, "other": 0}
    original_all_reduce, original_prepare = torch.distributed.all_reduce, accelerate.Accelerator.prepare

    def caller_kind() -> str:  # also right inside a future's callback (PowerSGD's second all-reduce)
        frame = sys._getframe(2)
        while frame is not None:
            name = frame.f_code.co_filename.replace(os.sep, "/")
            if "/ddp_comm_hooks/" in name:
                return "gradients"
            if name.endswith("accelerate/local_sgd.py"):
                return "parameters"
            frame = frame.f_back
        return "other"

    def counting_all_reduce(tensor, *args, **kwargs):
        sent[caller_kind()] += tensor.numel() * tensor.element_size()
        return original_all_reduce(tensor, *args, **kwargs)

    def prepare(self, *objects, **kwargs):
        prepared = original_prepare(self, *objects, **kwargs)
        for model in prepared if isinstance(prepared, tuple) else (prepared,):
            plain = "comm_hook" not in getattr(model, "_get_ddp_logging_data", dict)()
            if isinstance(model, torch.nn.parallel.DistributedDataParallel) and plain:
                model.register_comm_hook(state=None, hook=default_hooks.allreduce_hook)  # DDP's own, in Python
        return prepared

    torch.distributed.all_reduce = counting_all_reduce
    accelerate.Accelerator.prepare = prepare
    recipe = load_recipe(RECIPE)
    results = recipe.main(recipe_args)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(result_path).write_text(json.dumps({"allreduce_bytes": sent, "results": results}))
    return 0


# ---------------------------------------------------------------------------------------------------- driver


def run_mode(mode: str, args, out: Path, cache: Path) -> dict:
    flags = list(MODES[mode])
    if "powersgd" in mode and args.powersgd_start_iter is not None:
        flags += ["--powersgd_start_iter", str(args.powersgd_start_iter)]
    recipe_args = [
        "--per_device_train_batch_size", str(args.global_batch // 2), "--max_train_steps", str(args.steps),
        "--num_warmup_steps", str(max(1, args.steps // 10)), "--eval_every", str(args.steps),
        "--eval_iters", str(args.eval_iters), "--log_every", "10", "--sample_tokens", "0", "--mixed_precision", "no",
        "--output_dir", str(out), "--cache_dir", str(cache), *flags,
    ]  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(Path(__file__).resolve()), "--worker", str(out) + ".json",
               *recipe_args]  # fmt: skip
    env = dict(os.environ, **BASE_ENV, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    log = out.with_suffix(".log")
    start = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call(command, env=env, cwd=REPO_ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=3600)
    if rc != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-12:])
        raise SystemExit(f"error: mode {mode}: exit status {rc}\n{tail}")
    record = json.loads(Path(str(out) + ".json").read_text())
    results = record["results"]
    rates = [r["tokens_per_second"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if "tokens_per_second" in r]  # fmt: skip
    tokens_per_step = results["global_batch_size"] * results["block_size"]
    sent = record["allreduce_bytes"]
    return {
        "mode": mode,
        "flags": flags,
        "bytes_per_step": (sent["gradients"] + sent["parameters"]) / results["optimizer_steps"],
        "control_bytes_per_step": sent["other"] / results["optimizer_steps"],
        "allreduce_bytes": sent,
        "step_s": tokens_per_step / statistics.median(rates[1:] if len(rates) > 1 else rates),
        "eval_loss": results["eval_loss"],
        "train_loss": results["train_loss"],
        "num_parameters": results["num_parameters"],
        "wall_s": time.perf_counter() - start,
    }


def expected_ratio(mode: str, steps: int, start: int) -> str:
    """What the mode's arithmetic predicts for bytes against plain (blank where it depends on shapes)."""
    if mode in ("fp16", "bf16"):
        return "0.500"
    if mode.startswith("local"):
        k = int(mode[len("local") :])
        # every K steps, plus two at the end: before the final evaluation and on leaving LocalSGD
        return f"{(steps // k + 2) / steps:.3f}"
    if mode.startswith("powersgd"):
        return f">{min(start, steps) / steps:.3f}"  # the plain steps before compression, plus the factors
    return "1.000"


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        return worker(sys.argv[2], sys.argv[3:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", nargs="+", choices=sorted(MODES), default=DEFAULT_MODES, help="plain is always run")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    p.add_argument("--repeats", type=int, default=1, help="runs of each mode, alternating order; step time: median")
    p.add_argument("--global_batch", type=int, default=12, help="sequences per optimizer step (even: 2 processes)")
    p.add_argument("--eval_iters", type=int, default=20, help="validation batches of the final evaluation")
    p.add_argument("--powersgd_start_iter", type=int, help="passed to the PowerSGD modes (default: the recipe's, 10)")
    p.add_argument("--keep", help="keep the runs' folders and logs here (default: a temporary folder)")
    p.add_argument("--json", help="also write all results here")
    p.add_argument("--quick", action="store_true", help="20 steps, plain/fp16/powersgd1/local4: checks that it runs")
    args = p.parse_args()
    if args.quick:
        args.steps, args.eval_iters, args.repeats = 20, 4, 1
        args.modes = ["plain", "fp16", "powersgd1", "local4"]
        args.powersgd_start_iter = args.powersgd_start_iter or 2
    if args.global_batch % 2 or args.steps < 20:
        raise SystemExit("error: --global_batch must be even and --steps at least 20 (rates are logged every 10)")
    modes = ["plain", *[m for m in args.modes if m != "plain"]]
    if "bf16" in modes:
        import torch

        if not torch.cuda.is_available():
            print("bf16: skipped (torch runs the bf16 hook only with CUDA and NCCL >= 2.10)", flush=True)
            modes.remove("bf16")

    tmp = tempfile.TemporaryDirectory() if args.keep is None else None
    root = Path(args.keep or tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    warn_if_busy("the step times are not a measurement (bytes and losses are)")
    print(f"runs in {root}: {', '.join(modes)}; {args.steps} steps, global batch {args.global_batch} on 2 processes "
          f"x 1 thread, {args.repeats} repeat(s)", flush=True)  # fmt: skip
    runs = {m: [] for m in modes}
    for r in range(args.repeats):
        for mode in modes if r % 2 == 0 else modes[::-1]:
            res = run_mode(mode, args, root / f"{mode}-{r}", root / "cache")
            runs[mode].append(res)
            print(f"repeat {r + 1}/{args.repeats} {mode:>10}: {res['bytes_per_step']:>11,.0f} B/step, "
                  f"{res['step_s'] * 1e3:6.1f} ms/step, val loss {res['eval_loss']:.4f} (wall {res['wall_s']:.0f} s)",
                  flush=True)  # fmt: skip

    def summary(mode: str) -> dict:
        rs = runs[mode]
        return {**rs[0], "step_s": statistics.median(x["step_s"] for x in rs), "step_s_all": [x["step_s"] for x in rs]}

    table = {m: summary(m) for m in modes}
    base = table["plain"]
    start = args.powersgd_start_iter or 10
    print(f"\n{base['num_parameters']:,} parameters ({base['num_parameters'] * 4:,} bytes of fp32 gradients); "
          f"all-reduce payload per rank per optimizer step, median step time over {args.repeats} run(s)")  # fmt: skip
    header = (
        f"{'mode':>10} | {'bytes/step':>11} | {'x plain':>7} | {'expected':>8} | {'ms/step':>7} | {'x plain':>7} | "
    )
    print(header + f"{'val loss':>8} | {'- plain':>7}")
    for m, res in table.items():
        print(f"{m:>10} | {res['bytes_per_step']:>11,.0f} | {res['bytes_per_step'] / base['bytes_per_step']:>7.3f} | "
              f"{expected_ratio(m, args.steps, start):>8} | {res['step_s'] * 1e3:>7.1f} | "
              f"{res['step_s'] / base['step_s']:>7.3f} | {res['eval_loss']:>8.4f} | "
              f"{res['eval_loss'] - base['eval_loss']:>+7.4f}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "modes": table}, indent=2) + "\n")
    parts = [f"{m} bytes x{r['bytes_per_step'] / base['bytes_per_step']:.3f} time x{r['step_s'] / base['step_s']:.2f} "
             f"val {r['eval_loss'] - base['eval_loss']:+.3f}" for m, r in table.items() if m != "plain"]  # fmt: skip
    print(f"SUMMARY: vs plain all-reduce ({base['bytes_per_step']:,.0f} B/step, {base['step_s'] * 1e3:.1f} ms/step, "
          f"val loss {base['eval_loss']:.4f} after {args.steps} steps): " + "; ".join(parts)
          + (" (--quick: not a measurement)" if args.quick else ""), flush=True)  # fmt: skip
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
