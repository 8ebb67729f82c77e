"""Data-parallel efficiency on CPU: the GPT recipe on 2 processes x 1 thread against 1 process x 2 threads.

    python benchmarks/dp_efficiency.py                    # 300 steps, 3 repeats of each, then the comm probe (~4 min)
    python benchmarks/dp_efficiency.py --quick            # 20 steps, 1 repeat, short probe: checks that it runs (~40 s)
    python benchmarks/dp_efficiency.py --global_batch 24 --steps 400 --repeats 5
    python benchmarks/dp_efficiency.py --no_probe         # throughput only

Both configurations run recipes/gpt_pretrain.py unchanged (nanoGPT's CPU model: 4 layers, 4 heads, width 128,
block 64, Tiny Shakespeare characters) at the same global batch (default 12 sequences), no accumulation:

  1 x 2: OMP_NUM_THREADS=2 python recipes/gpt_pretrain.py --per_device_train_batch_size 12 ...
  2 x 1: ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1
         --mixed_precision no --dynamo_backend no recipes/gpt_pretrain.py --per_device_train_batch_size 6 ...

alternating (1x2 first in repeats 1, 3, ...; 2x1 first in 2, 4, ...), each with --max_train_steps --steps,
no sample, and one small evaluation at the end over the same windows on both (global-batch-many), so the two
must end with the same validation loss: the script checks it. The token cache is filled first by an untimed
1-step run. Throughput is all_results.json's tokens_per_second (optimizer steps x global batch x block /
train_runtime_s: start-up excluded, the final small evaluation included); the steady rate (median of
metrics.jsonl's per-10-step rates, the first interval left out) is printed beside it. Target: 2x1 / 1x2
throughput >= 0.95, on the medians of the repeats. Any other load on the cores ruins the 1 x 2 runs (two
OpenMP threads on one free core run many times slower): measure on a quiet machine.

Then benchmarks/dp_comm_probe.py runs on 2 x 1 at the same batch: the bytes all-reduced per optimizer step
(measured by a DDP comm hook, and the parameters' gradient bytes for comparison), and the share of a step that
communication takes (the recipe's step against the same step under no_sync, and the hook's all-reduce times).
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

from common import free_port, warn_if_busy

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPE = REPO_ROOT / "recipes" / "gpt_pretrain.py"
PROBE = REPO_ROOT / "benchmarks" / "dp_comm_probe.py"
TARGET = 0.95
BASE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def launch_command(procs: int, script: Path) -> list[str]:
    if procs == 1:
        return [sys.executable, str(script)]
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(procs),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), str(script),
    ]  # fmt: skip


def environment(procs: int, threads: int) -> dict:
    env = dict(os.environ, **BASE_ENV, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if procs > 1:
        env["ACCELERATE_USE_CPU"] = "1"
    else:  # a plain single process, whatever the calling shell exported for launchers
        for name in ("ACCELERATE_USE_CPU", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
            env.pop(name, None)
    return env


def run(command: list[str], env: dict, log: Path, timeout: float) -> None:
    with open(log, "w") as out:
        rc = subprocess.call(command, env=env, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    if rc != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise SystemExit(f"error: exit status {rc} from: {' '.join(command)}\n{tail}")


def run_recipe(procs: int, threads: int, global_batch: int, steps: int, out: Path, cache: Path, cores: int) -> dict:
    # The same validation windows on 1 and on `cores` processes: cores batches of global_batch / cores sequences.
    recipe_args = [
        "--per_device_train_batch_size", str(global_batch // procs), "--max_train_steps", str(steps),
        "--eval_every", str(steps), "--eval_iters", str(cores),
        "--per_device_eval_batch_size", str(global_batch // cores), "--log_every", "10", "--sample_tokens", "0",
        "--output_dir", str(out), "--cache_dir", str(cache),
    ]  # fmt: skip
    start = time.perf_counter()
    run([*launch_command(procs, RECIPE), *recipe_args], environment(procs, threads), out.with_suffix(".log"), 1800)
    wall = time.perf_counter() - start
    results = json.loads((out / "all_results.json").read_text())
    rates = [r["tokens_per_second"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if "tokens_per_second" in r]  # fmt: skip
    results["steady_tokens_per_second"] = statistics.median(rates[1:] if len(rates) > 1 else rates)
    results["wall_s"] = wall
    if results["world_size"] != procs or results["global_batch_size"] != global_batch:
        raise SystemExit(f"error: expected {procs} process(es) at global batch {global_batch}, got {results}")
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    p.add_argument("--repeats", type=int, default=3, help="runs of each configuration, alternating")
    p.add_argument("--global_batch", type=int, default=12, help="sequences per optimizer step (even)")
    p.add_argument("--cores", type=int, default=2, help="cores to share out: 1 x cores threads vs cores x 1 thread")
    p.add_argument("--no_probe", action="store_true", help="skip the communication probe")
    p.add_argument("--keep", help="keep the runs' folders and logs here (default: a temporary folder)")
    p.add_argument("--quick", action="store_true", help="20 steps, 1 repeat, a short probe: checks that it runs")
    args = p.parse_args()
    if args.quick:
        args.steps, args.repeats = 20, 1
    cores = args.cores
    if args.global_batch % cores:
        raise SystemExit(f"error: --global_batch {args.global_batch} must be a multiple of --cores {cores}")

    tmp = tempfile.TemporaryDirectory() if args.keep is None else None
    root = Path(args.keep or tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    cache = root / "cache"
    warn_if_busy()
    print(f"runs in {root}; global batch {args.global_batch}, {args.steps} steps, {args.repeats} repeat(s)", flush=True)
    if not args.quick:  # tokenize the corpus once, untimed (tokenizing is outside train_runtime_s anyway, not wall_s)
        run_recipe(1, cores, args.global_batch, 1, root / "fill-cache", cache, cores)

    configs = {"single": (1, cores), "dp": (cores, 1)}
    label = {"single": f"1 proc x {cores} threads", "dp": f"{cores} procs x 1 thread"}
    results = {"single": [], "dp": []}
    for r in range(args.repeats):
        for name in ("single", "dp") if r % 2 == 0 else ("dp", "single"):
            procs, threads = configs[name]
            res = run_recipe(procs, threads, args.global_batch, args.steps, root / f"{name}-{r}", cache, cores)
            results[name].append(res)
            print(
                f"repeat {r + 1}/{args.repeats} {label[name]:>18}: {res['tokens_per_second']:>8,.0f} tok/s "
                f"(steady {res['steady_tokens_per_second']:,.0f}) | training {res['train_runtime_s']:.1f} s, "
                f"wall {res['wall_s']:.1f} s | train loss {res['train_loss']:.4f}, val loss {res['eval_loss']:.4f}",
                flush=True,
            )

    med = {k: statistics.median(x["tokens_per_second"] for x in v) for k, v in results.items()}
    steady = {k: statistics.median(x["steady_tokens_per_second"] for x in v) for k, v in results.items()}
    ratio = med["dp"] / med["single"]
    paired = [
        d["tokens_per_second"] / s["tokens_per_second"] for d, s in zip(results["dp"], results["single"], strict=True)
    ]
    for k in ("single", "dp"):
        values = sorted(x["tokens_per_second"] for x in results[k])
        print(f"{label[k]:>18}: median {med[k]:,.0f} tok/s (runs: {', '.join(f'{v:,.0f}' for v in values)}); "
              f"steady {steady[k]:,.0f} tok/s")  # fmt: skip
    print(f"paired ratios (2x1 / 1x2 per repeat): {', '.join(f'{x:.3f}' for x in paired)}; "
          f"steady-rate ratio {steady['dp'] / steady['single']:.3f}")  # fmt: skip

    gap = max(abs(d["eval_loss"] - s["eval_loss"]) for d, s in zip(results["dp"], results["single"], strict=True))
    print(
        f"same training on both: final val losses (same windows) differ by at most {gap:.2e} "
        f"({'ok' if gap < 1e-2 else 'NOT the same training: check the logs'}; only summation order differs)"
    )

    probe_line = ""
    if not args.no_probe:
        probe_json = root / "probe.json"
        command = [*launch_command(cores, PROBE), "--per_device_batch", str(args.global_batch // cores)]
        command += ["--cache_dir", str(cache), "--json", str(probe_json)] + (["--quick"] if args.quick else [])
        run(command, environment(cores, 1), root / "probe.log", 900)
        probe = json.loads(probe_json.read_text())
        mb = probe["allreduce_bytes_per_step"] / 1e6
        print(
            f"all-reduce per optimizer step: {probe['allreduce_bytes_per_step']:,.0f} bytes ({mb:.2f} MB) in "
            f"{probe['buckets_per_step']:.0f} bucket(s) {probe['bucket_bytes']} (DDP comm hook); parameters' "
            f"gradients: {probe['param_grad_bytes']:,} bytes ({probe['num_parameters']:,} fp32 parameters)"
        )
        print(
            f"step on {probe['world_size']} x {probe['threads_per_process']} thread(s): "
            f"{probe['step_s_sync'] * 1e3:.1f} ms with all-reduce, {probe['step_s_no_sync'] * 1e3:.1f} ms under "
            f"no_sync: communication adds {probe['exposed_comm_s'] * 1e3:.1f} ms = "
            f"{probe['exposed_comm_share']:.1%} of a step; the hook's all-reduces last "
            f"{probe['hook_allreduce_s_sum_per_step'] * 1e3:.1f} ms per step from launch to completion "
            f"({probe['hook_allreduce_share']:.1%} of a step, overlapping backward and waiting for the peer); "
            f"a bare all-reduce of the gradients takes {probe['bare_allreduce_s'] * 1e3:.2f} ms "
            f"({probe['bare_allreduce_GBps']:.2f} GB/s)"
        )
        probe_line = f"; {mb:.2f} MB all-reduced per step, communication {probe['exposed_comm_share']:.1%} of a step"

    met = ratio >= TARGET
    print(
        f"SUMMARY: {label['dp']} / {label['single']} throughput ratio {ratio:.3f} "
        f"({med['dp']:,.0f} / {med['single']:,.0f} tok/s, median of {args.repeats}, global batch "
        f"{args.global_batch}){probe_line}; target >= {TARGET}: {'met' if met else 'NOT met'}"
        + (" (--quick: not a measurement)" if args.quick else ""),
        flush=True,
    )
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
