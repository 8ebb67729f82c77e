"""The flags every recipe shares, named as in accelerate and transformers, and their checks before any work.

A recipe adds them to its parser (`add_run_arguments`), sets its own defaults (`parser.set_defaults`), and checks them
with `check_run_arguments` before anything runs; `check_positive` checks a recipe's own counts the same way.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import NoReturn

from faults import Attempt, fail


class RecipeParser(argparse.ArgumentParser):
    """argparse's parser, whose errors (an unknown flag, a value of the wrong type) are the run kit's one line and exit
    status 2, without the usage dump before them (`--help` shows it)."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message}; see {self.prog} --help")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The shared flags, in three groups: batches and precision, output and logging, checkpoints and communication."""
    group = parser.add_argument_group("batches and precision")
    group.add_argument("--per_device_train_batch_size", type=int, help="Examples per process and micro-batch.")
    group.add_argument("--gradient_accumulation_steps", type=int, help="Default 1, or what --global_batch_size needs.")
    group.add_argument("--global_batch_size", type=int, help="Examples per optimizer step: sets the accumulation.")
    group.add_argument("--max_train_steps", type=int, help="Optimizer steps in all.")
    group.add_argument("--max_grad_norm", type=float, default=1.0, help="Clip the global gradient norm (0: off).")
    group.add_argument("--mixed_precision", choices=["no", "fp16", "bf16", "fp8"], help="Default: accelerate's.")
    group.add_argument("--seed", type=int)
    group.add_argument("--cpu", action="store_true", help="Train on CPU even if a GPU is present.")
    group.add_argument(
        "--torch_compile", action="store_true", help="torch.compile the model (inductor); checkpoints stay plain."
    )
    group = parser.add_argument_group("output and logging")
    group.add_argument("--output_dir", help="Default: runs/<recipe>-<date>-<time>.")
    group.add_argument("--overwrite_output_dir", action="store_true", help="Allow writing into a non-empty folder.")
    group.add_argument("--log_every", type=int, default=10, help="Optimizer steps between log lines.")
    trackers = ["none", "tensorboard", "wandb", "all"]
    group.add_argument("--report_to", default="none", choices=trackers, help="wandb honours WANDB_MODE=offline.")
    group.add_argument("--tracker_project", default="accel-dp", help="wandb project; tensorboard subfolder.")
    group = parser.add_argument_group("checkpoints and failures")
    group.add_argument("--checkpointing_steps", help="Save a resumable checkpoint every N optimizer steps.")
    group.add_argument("--checkpoints_total_limit", type=int, help="Keep only the newest K checkpoints.")
    group.add_argument("--resume_from_checkpoint", help="A checkpoint folder, or `latest` (none yet: a fresh start).")
    group.add_argument("--nonfinite_skip_limit", type=int, default=0, help="Skip up to N NaN/inf steps (0: stop).")
    group.add_argument("--ddp_timeout", type=int, default=600, help="Seconds a collective waits for a silent process.")
    group = parser.add_argument_group("data-parallel communication (docs/data_parallel.md)")
    hooks = ["none", "fp16", "bf16", "powersgd"]
    group.add_argument("--ddp_comm_hook", choices=hooks, default="none", help="How DDP sends gradients (bf16: NCCL).")
    group.add_argument("--powersgd_rank", type=int, help="PowerSGD's matrix approximation rank (default 1).")
    group.add_argument("--powersgd_start_iter", type=int, help="Plain steps before PowerSGD compresses (default 10).")
    group.add_argument("--local_sgd_steps", type=int, help="Local SGD: average the parameters every K steps instead.")


# A recipe's own float flags, checked where it has them (NaN and infinity never pass).
RECIPE_NUMBERS = (
    ("learning_rate", lambda value: value > 0, "a positive number"),
    ("min_learning_rate", lambda value: value >= 0, "0 or more"),
    ("weight_decay", lambda value: value >= 0, "0 or more"),
    ("dropout", lambda value: 0 <= value < 1, "at least 0 and below 1"),
)


def check_number(args: argparse.Namespace, name: str, ok: Callable[[float], bool], what: str) -> None:
    """A float flag, when given, is finite and `ok` (`what` says which numbers are)."""
    value = getattr(args, name)
    if value is not None and not (math.isfinite(value) and ok(value)):
        fail(f"--{name} must be {what}, got {value}")


def check_positive(args: argparse.Namespace, *names: str) -> None:
    """Each named flag, when given, is a positive integer."""
    for name in names:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            fail(f"--{name} must be a positive integer, got {getattr(args, name)}")


def check_run_arguments(args: argparse.Namespace, recipe: str, has_epochs: bool) -> None:
    """Bad values and contradictions among the shared flags, before anything runs. --checkpointing_steps becomes a
    number of optimizer steps, or `epoch` where the recipe has epochs."""
    if args.checkpointing_steps is not None:
        if args.checkpointing_steps.isdigit() and int(args.checkpointing_steps) > 0:
            args.checkpointing_steps = int(args.checkpointing_steps)
        elif args.checkpointing_steps == "epoch" and not has_epochs:
            fail(f"--checkpointing_steps epoch: {recipe} has no epochs; give a number of optimizer steps")
        elif args.checkpointing_steps != "epoch":
            fail(
                "--checkpointing_steps must be a positive number of optimizer steps"
                + (" or `epoch`" if has_epochs else "")
                + f", got '{args.checkpointing_steps}'"
            )
    check_positive(
        args,
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "global_batch_size",
        "max_train_steps",
        "log_every",
        "checkpoints_total_limit",
        "ddp_timeout",
        "powersgd_rank",
        "local_sgd_steps",
    )
    for name, ok, what in RECIPE_NUMBERS:
        if hasattr(args, name):
            check_number(args, name, ok, what)
    if Attempt.now().max_restarts and not args.output_dir:
        fail(
            "restarts (--max-restarts) need a fixed --output_dir, where a restarted run finds its checkpoints: pass "
            "--output_dir (accel-dp run --max-restarts gives one)"
        )
    if args.nonfinite_skip_limit < 0:
        fail(f"--nonfinite_skip_limit must be >= 0, got {args.nonfinite_skip_limit}")
    if args.ddp_comm_hook != "powersgd" and (args.powersgd_rank is not None or args.powersgd_start_iter is not None):
        fail("--powersgd_rank and --powersgd_start_iter only apply with --ddp_comm_hook powersgd")
    if args.powersgd_start_iter is not None and args.powersgd_start_iter < 2:
        fail(
            f"--powersgd_start_iter must be at least 2 (DDP rebuilds its gradient buckets after the first step), "
            f"got {args.powersgd_start_iter}"
        )
    if args.local_sgd_steps is not None and args.ddp_comm_hook != "none":
        fail(
            f"--local_sgd_steps turns DDP's gradient all-reduce off, so --ddp_comm_hook {args.ddp_comm_hook} would "
            "have nothing to compress: give one of them"
        )
