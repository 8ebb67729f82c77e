"""Goodput under failures: gpt-pretrain on 2 CPU processes under `accel-dp run --max-restarts`, a worker SIGKILLed
at seeded random moments, beside the same run never interrupted.

    python benchmarks/goodput.py                                # checkpoints every 100 and every 400 steps
    python benchmarks/goodput.py --checkpoint_every 50 200 --fault_every_s 30 --steps 1000 --seed 0

For each checkpoint interval it runs the recipe once without faults and once with a worker (rank 0 or 1, drawn)
killed about every --fault_every_s seconds of training (drawn uniformly from 0.5x to 1.5x that, counted from the
moment training runs again after the previous restart). Both runs log every step. It prints:

- goodput: the share of the faulted run's wall time that the uninterrupted run needed (its own wall time, start-up,
  checkpoints and evaluations included), i.e. the share spent on work that counts;
- per fault, the time to recover (the kill to the restarted run's record of its restart, written when it is ready to
  take its first new step: the restart of the processes, imports, rendezvous, the model, the checkpoint's load) and
  the steps trained again (from the checkpoint to the last step logged before the kill);
- where the rest went: recovery, steps trained again, and the checkpoints' own cost (the uninterrupted run with
  checkpoints against one without, measured once more at the start).

Both sides of each comparison run in this invocation, one after the other; timings on a shared machine are noisy
(a warning says when the load is high).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from common import free_port, warn_if_busy

REPO = Path(__file__).resolve().parents[1]


def recipe_args(output_dir: Path, cache: Path, steps: int, checkpoint_every: int | None) -> list[str]:
    args = ["--max_train_steps", str(steps), "--log_every", "1", "--eval_every", str(steps), "--sample_tokens", "0",
            "--cache_dir", str(cache), "--output_dir", str(output_dir)]  # fmt: skip
    return args + (["--checkpointing_steps", str(checkpoint_every)] if checkpoint_every else [])


def command(args: list[str], max_restarts: int) -> list[str]:
    restarts = ["--max-restarts", str(max_restarts)] if max_restarts else []
    return [sys.executable, "-m", "accel_dp", "run", "gpt-pretrain", "--cpu", "--procs", "2",
            "--main-port", str(free_port()), *restarts, "--", *args]  # fmt: skip


def records(output_dir: Path) -> list[dict]:
    try:
        lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        try:
            found.append(json.loads(line))
        except ValueError:  # (a line being written)
            pass
    return found


def workers(launcher: psutil.Process) -> list[psutil.Process]:
    found = []
    try:
        children = launcher.children(recursive=True)
    except psutil.Error:  # (the run has just ended)
        return []
    for child in children:
        try:
            if "gpt_pretrain.py" in " ".join(child.cmdline()) and "RANK" in child.environ():
                found.append(child)
        except psutil.Error:
            pass
    return found


def training_since(output_dir: Path, restarts_seen: int) -> bool:
    """Whether the run trains again: a step logged after its latest restart record."""
    seen = records(output_dir)
    restarts = [i for i, r in enumerate(seen) if r.get("event") == "restart"]
    if len(restarts) < restarts_seen:
        return False
    after = seen[restarts[-1] + 1 :] if restarts else seen
    return any("loss" in r for r in after)


def faulted_run(args: list[str], output_dir: Path, fault_every_s: float, rng: random.Random) -> dict:
    """The run with a worker killed about every fault_every_s seconds of training; when each kill came."""
    start = time.time()
    launcher = subprocess.Popen(command(args, max_restarts=1000), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)  # fmt: skip
    kills, process = [], psutil.Process(launcher.pid)
    while launcher.poll() is None:
        while launcher.poll() is None and not training_since(output_dir, len(kills)):
            time.sleep(0.05)
        deadline = time.time() + rng.uniform(0.5, 1.5) * fault_every_s
        while launcher.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        victims = workers(process)
        if launcher.poll() is not None or not victims:
            break
        victim = rng.choice(sorted(victims, key=lambda p: p.pid))
        last_step = max((r["step"] for r in records(output_dir) if "loss" in r), default=0)
        try:
            victim.send_signal(signal.SIGKILL)
        except psutil.Error:
            continue
        kills.append({"time": time.time(), "last_step": last_step})
    _, stderr = launcher.communicate()
    if launcher.returncode != 0:
        raise SystemExit(f"error: the faulted run exited {launcher.returncode}: {stderr[-2000:]}")
    wall = time.time() - start
    # Each restart's record, the one of restart k answering kill k (a restart with no checkpoint yet starts afresh and
    # sets the earlier attempt's files aside, its metrics.jsonl too: look there as well).
    found = [r for log in output_dir.rglob("metrics.jsonl") for r in records(log.parent) if r.get("event") == "restart"]
    restarts = {r["restart"]: r for r in found}
    faults = []
    for number, kill in enumerate(kills, 1):
        if restart := restarts.get(number):
            faults.append(
                {"recovery_s": restart["time"] - kill["time"], "replayed": kill["last_step"] - restart["step"]}
            )
    return {"wall": wall, "faults": faults, "kills": len(kills), "restarts": len(restarts)}


def timed_run(args: list[str]) -> float:
    start = time.time()
    done = subprocess.run(command(args, max_restarts=0), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: the run exited {done.returncode}: {done.stderr[-2000:]}")
    return time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint_every", type=int, nargs="+", default=[100, 400], help="steps between checkpoints")
    parser.add_argument("--fault_every_s", type=float, default=30.0, help="seconds of training between kills, about")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work_dir", type=Path, help="keep the runs' folders here (default: a temporary folder)")
    args = parser.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO))
    warn_if_busy()
    with tempfile.TemporaryDirectory() as tmp:
        tmp, rng = args.work_dir or Path(tmp), random.Random(args.seed)
        cache = tmp / "cache"
        timed_run(recipe_args(tmp / "warm", cache, 2, None))  # the token cache, untimed
        plain = timed_run(recipe_args(tmp / "plain", cache, args.steps, None))
        print(f"uninterrupted, no checkpoints: {plain:.1f} s for {args.steps} steps", flush=True)
        rows = []
        for every in args.checkpoint_every:
            reference = timed_run(recipe_args(tmp / f"reference-{every}", cache, args.steps, every))
            faulted = faulted_run(recipe_args(tmp / f"faulted-{every}", cache, args.steps, every),
                                  tmp / f"faulted-{every}", args.fault_every_s, rng)  # fmt: skip
            rows.append((every, reference, faulted))
            recovery = [f["recovery_s"] for f in faulted["faults"]] or [float("nan")]
            replayed = [f["replayed"] for f in faulted["faults"]] or [float("nan")]
            step_s = plain / args.steps
            print(
                f"checkpoint every {every} steps: uninterrupted {reference:.1f} s, with {faulted['kills']} kill(s) "
                f"{faulted['wall']:.1f} s -> goodput {reference / faulted['wall']:.1%}; per fault: recovery "
                f"{statistics.mean(recovery):.1f} s (min {min(recovery):.1f}, max {max(recovery):.1f}), steps trained "
                f"again {statistics.mean(replayed):.0f} (~{statistics.mean(replayed) * step_s:.1f} s); checkpoints "
                f"cost {(reference - plain) / plain:+.1%} of the run without them",
                flush=True,
            )
    print(
        "goodput = the uninterrupted run's wall time / the faulted run's; recovery = the kill to the restarted run "
        "ready for its first new step"
    )


if __name__ == "__main__":
    main()
