"""The run kit: the plumbing both recipes lean on, in one module beside them (as nanoGPT's train.py imports model.py).

A recipe imports it as a sibling (`from run_kit import ...`): `python`, `accelerate launch` and `torchrun` all put a
script's own folder on the import path. It needs torch, accelerate, transformers, safetensors, psutil and tqdm, and
nothing from accel_dp, so a folder written by `accel-dp copy` trains alone. Nothing in it is specific to one recipe:
what differs (the recipe's name, its unit of work, its model's lookups) comes in as arguments.

What a recipe calls, in the order its main() meets it:
    add_run_arguments, check_run_arguments, check_positive   the shared flags, checked before any work
    Run                  launch checks, the Accelerator, the output folder, the checkpoint to resume; then per step
                         (step_done), at log steps (record), around evaluation (evaluation), for checkpoints and
                         preemption (save), and at the end (finish: the model, all_results.json)
    train_step helpers   Step, optimizer_step: clipping, the non-finite decision and the optimizer step
    model helpers        load_pretrained (fp32 weights), make_optimizer (AdamW, decay on matrices, LR schedule),
                         FlopsPerToken, training_memory, check_memory
    errors               fail (bad input, exit 2), stop (failed run, exit 1), run_failing_fast (a lost process)
The pieces Run is made of stay public for tests and for recipes that need them apart: start_accelerator,
output_folder, RunLog, save_model, Checkpointer, Guard, Meter, LocalSGD.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from datetime import datetime, timedelta
from pathlib import Path
from typing import NamedTuple, NoReturn

import psutil
import torch
from accelerate import Accelerator, PartialState
from accelerate.logging import MultiProcessAdapter
from accelerate.utils import (
    DDPCommunicationHookType,
    DistributedDataParallelKwargs,
    InitProcessGroupKwargs,
    broadcast_object_list,
    gather_object,
    load,
    parse_flag_from_env,
    set_seed,
)
from safetensors import safe_open
from tqdm.auto import tqdm

PREEMPTED_EXIT_CODE = 75  # sysexits' EX_TEMPFAIL, "try again": a checkpoint was written; rerun to resume
FAILED_EXIT_CODE = 1  # stopped during training (a lost process, a NaN): nothing was overwritten
BAD_INPUT_EXIT_CODE = 2  # refused before any work: nothing was written
INTERRUPTED_EXIT_CODE = 130  # Ctrl-C (128 + SIGINT, as a shell reports it): a checkpoint if the run makes them
CHECKPOINT_FORMAT = 2  # training_state.json's layout; older checkpoints are refused with a message
ERROR_DIR_VARIABLE = "ACCEL_DP_ERROR_DIR"  # set by `accel-dp run`, which prints each process's error line once


# Messages go through accelerate's logger: the main process prints them (one copy, not one per process), above the
# progress bar rather than through it.
class RankLogger(MultiProcessAdapter):
    """accelerate's logger (the main process prints, above the progress bar), with a rank prefix only where there are
    several processes to tell apart."""

    def process(self, msg, kwargs):
        kwargs.setdefault("stacklevel", 2)
        state = PartialState()
        return (f"[rank {state.process_index}] {msg}" if state.num_processes > 1 else msg), kwargs


logger = RankLogger(logging.getLogger(__name__), {})


class AboveProgressBar(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record))


def report_error(message: str) -> None:
    """One line that says what is wrong and what to do. Under `accel-dp run` it goes to a file of this process's, and
    accel-dp prints each distinct line once for all processes."""
    error_dir = os.environ.get(ERROR_DIR_VARIABLE)
    if error_dir and os.path.isdir(error_dir):
        Path(error_dir, f"rank-{os.environ.get('RANK', '0')}").write_text(f"error: {message}\n")
    else:
        tqdm.write(f"error: {message}", file=sys.stderr)  # on its own line, under any progress bar


def exit_with_error(message: str, code: int) -> NoReturn:
    """Report, then exit with `code` and no traceback."""
    report_error(message)
    leave(code)


def leave(code: int) -> NoReturn:
    """Exit with `code`. With several processes, at once (os._exit, once the output is flushed): one whose process
    group is torn down while a peer closes its connections can abort in gloo's C++ teardown (std::terminate, status
    134) and lose the code, even after destroy_process_group and end_training (seen on a preemption before the
    first step, 1 time in 36)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)


def fail(message: str) -> NoReturn:
    """Bad input, found before any work: exit status 2."""
    exit_with_error(message, BAD_INPUT_EXIT_CODE)


def stop(message: str) -> NoReturn:
    """A failure during training (not bad input): exit status 1."""
    exit_with_error(message, FAILED_EXIT_CODE)


# ------------------------------------------------------------------------------------------------------- arguments


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every recipe shares, named as in accelerate and transformers; recipes set defaults (set_defaults)."""
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


def check_run_arguments(args: argparse.Namespace, recipe: str, has_epochs: bool) -> None:
    """Bad values and contradictions among the shared flags, before anything runs."""
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
    positive = (
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
    for name in positive:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            fail(f"--{name} must be a positive integer, got {getattr(args, name)}")
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


# ---------------------------------------------------------------------------------------------------------- launch


def start_accelerator(args: argparse.Namespace, recipe: str) -> Accelerator:
    """Check how this process was launched, settle the gradient accumulation steps, and make the Accelerator.

    Launchers can start other than what was asked for without a word (`accelerate launch --cpu --num_processes 2`
    starts one process; `--multi_gpu` on a machine without a GPU starts N unsynchronised copies): the number of
    processes the Accelerator runs is checked against the launcher's WORLD_SIZE."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    # accelerate runs on CPU whenever ACCELERATE_USE_CPU is set, whatever --cpu says; the checks below must agree.
    use_cpu = (
        args.cpu or parse_flag_from_env("ACCELERATE_USE_CPU") or (world_size > 1 and not torch.cuda.is_available())
    )
    launched_alone = "WORLD_SIZE" not in os.environ and "ACCELERATE_DYNAMO_BACKEND" in os.environ
    if launched_alone and "MASTER_ADDR" in os.environ and parse_flag_from_env("ACCELERATE_USE_CPU"):
        # accelerate's single-process launcher sets MASTER_ADDR when asked for several processes, and starts one.
        fail(
            "accelerate launch was asked for several processes but started only this one (`--cpu` and MULTI_CPU "
            "configs do that): use `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N` or "
            f"`accel-dp run {recipe} --cpu --procs N` (or unset MASTER_ADDR to run one process)"
        )
    # nanoGPT's rule: a fixed global batch is reached with fewer accumulation steps on more processes.
    accumulation = args.gradient_accumulation_steps or 1
    if args.global_batch_size is not None:
        per_round = args.per_device_train_batch_size * world_size
        if args.global_batch_size % per_round:
            fail(
                f"--global_batch_size {args.global_batch_size} is not a multiple of per_device_train_batch_size x "
                f"processes = {args.per_device_train_batch_size} x {world_size} = {per_round}: choose a multiple of "
                f"{per_round} or another per-device batch size"
            )
        accumulation = args.global_batch_size // per_round
        if args.gradient_accumulation_steps not in (None, accumulation):
            fail(
                f"--gradient_accumulation_steps {args.gradient_accumulation_steps} contradicts --global_batch_size "
                f"{args.global_batch_size}, which needs {accumulation} on {world_size} process(es): give only one"
            )
    precision = args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision in ("fp16", "fp8") and (use_cpu or not torch.cuda.is_available()):
        fail(
            f"{precision} does nothing on CPU (accelerate ignores fp16, fp8 needs a GPU): use --mixed_precision bf16 "
            "or no"
        )
    trackers = trackers_for(args.report_to)
    accelerator = Accelerator(
        cpu=use_cpu,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=accumulation,
        log_with=trackers or None,
        project_dir=args.output_dir or "runs",  # where tensorboard logs; set to the output folder later
        # The recipes step the LR schedule once per optimizer step; accelerate's default steps it once per process.
        step_scheduler_with_optimizer=False,
        # A collective waiting on a silent process fails after this long instead of hanging (run_failing_fast).
        kwargs_handlers=[
            InitProcessGroupKwargs(timeout=timedelta(seconds=args.ddp_timeout)),
            ddp_kwargs(args, use_cpu),
        ],
    )
    if accelerator.num_processes != world_size:
        fail(
            f"launched for {world_size} processes but running as {accelerator.num_processes}: on CPU launch with "
            "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N` or "
            f"`accel-dp run {recipe} --cpu --procs N`"
        )
    check_parallel_mode(args, accelerator)
    logger.logger.setLevel(logging.INFO)
    if not logger.logger.handlers:
        logger.logger.addHandler(AboveProgressBar())
    if not accelerator.is_main_process:  # one copy of the libraries' chatter, not one per process
        for library in ("transformers", "datasets"):
            logging.getLogger(library).setLevel(logging.ERROR)
    # save_state drops GPT-2's tied LM head (the token embeddings' twin) and says so at every checkpoint, though
    # load_state ties it back: expected and harmless. That module's other warnings still show.
    logging.getLogger("accelerate.utils.other").addFilter(lambda record: "Removed shared tensor" not in str(record.msg))
    return accelerator


def ddp_kwargs(args: argparse.Namespace, on_cpu: bool) -> DistributedDataParallelKwargs:
    """What accelerate passes to DDP; it registers the --ddp_comm_hook on the model in prepare()."""
    hook = {
        "none": DDPCommunicationHookType.NO,
        "fp16": DDPCommunicationHookType.FP16,
        "bf16": DDPCommunicationHookType.BF16,
        "powersgd": DDPCommunicationHookType.POWER_SGD,
    }
    if args.ddp_comm_hook != "powersgd":
        return DistributedDataParallelKwargs(comm_hook=hook[args.ddp_comm_hook])
    # torch's default start (1000 steps of plain all-reduce) outlasts many whole fine-tunes, which would then never
    # compress; 10 steps skip only the first, most violent updates. Error feedback and warm start: on.
    state = {
        "matrix_approximation_rank": args.powersgd_rank or 1,
        "start_powerSGD_iter": args.powersgd_start_iter or 10,
    }
    # Over gloo (CPU), PowerSGD launches its P and Q all-reduces from callbacks as earlier ones complete, so with
    # several gradient buckets the ranks issue them in different orders and gloo aborts (collective mismatch). One
    # bucket holding every gradient keeps one chain per step: no more memory, only no overlap with the backward.
    single_bucket = {"bucket_cap_mb": 2**20} if on_cpu else {}
    return DistributedDataParallelKwargs(comm_hook=hook["powersgd"], comm_state_option=state, **single_bucket)


def check_parallel_mode(args: argparse.Namespace, accelerator: Accelerator) -> None:
    """Refuse what accelerate would silently run otherwise, once the Accelerator says how it runs (all ranks alike)."""
    # `accelerate launch` with an FSDP or DeepSpeed config sets these; on CPU accelerate then runs plain DDP instead.
    for name, variable in (("FSDP", "ACCELERATE_USE_FSDP"), ("DEEPSPEED", "ACCELERATE_USE_DEEPSPEED")):
        if parse_flag_from_env(variable) and accelerator.distributed_type.name != name:
            fail(
                f"{name} was asked for ({variable}) but accelerate runs {accelerator.distributed_type.value}: on CPU "
                f"it replaces {name} by plain DDP, every process holding the whole model. Shard on GPUs, or drop the "
                "config (accel-dp run --config multi_cpu)"
            )
    flags = [
        f
        for f, given in (
            ("--ddp_comm_hook", args.ddp_comm_hook != "none"),
            ("--local_sgd_steps", args.local_sgd_steps is not None),
        )
        if given
    ]
    if not flags:
        return
    if accelerator.num_processes == 1:
        tqdm.write(
            f"note: {' and '.join(flags)} ignored: one process alone has nothing to communicate", file=sys.stderr
        )
    elif accelerator.distributed_type.name in ("FSDP", "DEEPSPEED", "MEGATRON_LM", "XLA"):
        fail(
            f"{' and '.join(flags)} change DDP's gradient all-reduce, and {accelerator.distributed_type.value} does "
            "not use DDP: drop them, or use a DDP config"
        )
    elif args.ddp_comm_hook == "bf16" and accelerator.device.type == "cpu":
        fail("--ddp_comm_hook bf16 needs GPUs with NCCL (torch refuses it over gloo on CPU): use fp16 or powersgd")


def trackers_for(report_to: str) -> list[str]:
    """accelerate's trackers for --report_to, checked before anything runs: a missing package or a wandb that is
    not logged in is a one-line error, not a crash after the data is loaded."""
    wanted = {"none": [], "all": ["tensorboard", "wandb"]}.get(report_to, [report_to])
    for name, module in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        if name in wanted and importlib.util.find_spec(module) is None:
            fail(f"--report_to {name} needs `pip install {name}`")
    if "wandb" in wanted:
        netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
        logged_in = bool(os.environ.get("WANDB_API_KEY")) or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())
        if not logged_in and os.environ.get("WANDB_MODE", "").lower() not in ("offline", "disabled", "dryrun"):
            fail(
                "--report_to wandb: wandb is not logged in; run `wandb login`, or set WANDB_MODE=offline to log into "
                "<output_dir>/wandb and upload later with `wandb sync`"
            )
    return wanted


# ---------------------------------------------------------------------------------------------------------- output


def output_folder(args: argparse.Namespace, accelerator: Accelerator, default_name: str) -> Path:
    """The run's folder, named on the main process and shared (each rank's clock could tick to another second). A run
    never writes into an earlier run's folder unless asked to (--overwrite_output_dir, --resume_from_checkpoint)."""
    name = [args.output_dir or os.path.join("runs", f"{default_name}-{datetime.now():%Y%m%d-%H%M%S}")]
    broadcast_object_list(name)
    output_dir = Path(name[0])
    if output_dir.exists() and not output_dir.is_dir():
        fail(f"--output_dir {output_dir} is a file: choose a folder")
    if (
        output_dir.is_dir()
        and any(output_dir.iterdir())
        and not (args.overwrite_output_dir or args.resume_from_checkpoint)
    ):
        fail(
            f"--output_dir {output_dir} already holds files: choose a new folder, pass --overwrite_output_dir, or "
            "continue it with --resume_from_checkpoint latest"
        )
    return output_dir


class RunLog:
    """The run's record: output_dir/metrics.jsonl and accelerate's trackers (one tracker run per job, with the whole
    config), written by the main process. Making it creates the output folder: do it once the data and the model are
    known to be good, so that bad input leaves nothing behind."""

    def __init__(self, accelerator: Accelerator, args: argparse.Namespace, output_dir: Path, resumed_step: int | None):
        self.accelerator, self.path = accelerator, output_dir / "metrics.jsonl"
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            output_dir.mkdir(parents=True, exist_ok=True)
            if resumed_step is None:
                self.path.unlink(missing_ok=True)
            elif self.path.is_file():  # forget what the interrupted run logged after its checkpoint
                lines = self.path.read_text().splitlines()
                self.path.write_text("".join(f"{x}\n" for x in lines if json.loads(x)["step"] <= resumed_step))
        if accelerator.log_with:
            accelerator.project_configuration.set_directories(str(output_dir))  # tensorboard logs go under it
            config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}
            accelerator.init_trackers(
                args.tracker_project,
                config={
                    **config,
                    "world_size": accelerator.num_processes,
                    "gradient_accumulation_steps": accelerator.gradient_accumulation_steps,
                },
                init_kwargs={"wandb": {"dir": str(output_dir), "name": output_dir.name}},
            )

    def __call__(self, record: dict, message: str | None = None) -> None:
        """A record ({"step": N, ...}) in metrics.jsonl and the trackers, and a line for the user."""
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        if message:
            logger.info(message)


def save_model(accelerator: Accelerator, model, tokenizer, output_dir: Path) -> None:
    """The trained model and its tokenizer in Hugging Face format (from_pretrained loads them). Every process takes
    part: get_state_dict gathers the full weights when FSDP or ZeRO-3 shard them."""
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    with no_transformers_progress_bars():
        accelerator.unwrap_model(model).save_pretrained(
            output_dir,
            is_main_process=accelerator.is_main_process,
            save_function=accelerator.save,
            state_dict=state_dict,
        )
    if accelerator.is_main_process:
        tokenizer.save_pretrained(output_dir)


# ------------------------------------------------------------------------------------------------------------ step


class Step(NamedTuple):
    """What one optimizer step did, for the guard and the meter: this process's summed loss over its examples (on
    the device, not read back), the items it trained on (tokens or samples) and their FLOPs, and the norm of the
    averaged gradient with whether it was finite (then the optimizer stepped)."""

    loss_sum: torch.Tensor
    examples: torch.Tensor | int
    items: int
    flops: float
    grad_norm: torch.Tensor | float | None
    finite: bool


def optimizer_step(accelerator: Accelerator, model, optimizer, max_grad_norm: float) -> tuple[bool, object]:
    """Call inside `accelerator.accumulate(model)` after the backward. At the last micro-batch of an optimizer step
    (accelerate's sync_gradients): clip the averaged gradient and step, unless its norm is NaN or inf, which leaves the
    weights as they were. The norm is the same on every process, so all decide alike. Returns (finite, norm)."""
    finite, grad_norm = True, None
    if accelerator.sync_gradients:
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm if max_grad_norm > 0 else math.inf)
        # DeepSpeed returns a float (None before its first step) and clips and steps inside its engine; fp16's loss
        # scaler skips an overflowing step by itself and lowers its scale, so neither is a non-finite step here.
        finite = grad_norm is None or math.isfinite(float(grad_norm)) or accelerator.scaler is not None
    if finite:
        optimizer.step()  # a no-op on the micro-batches before the last
    optimizer.zero_grad(set_to_none=True)
    return finite, grad_norm


# ----------------------------------------------------------------------------------------------------- checkpoints


class Checkpointer:
    """Resumable checkpoints in <output_dir>/checkpoints/step-N.

    A checkpoint is accelerate's save_state (model, optimizer, LR schedule, every process's RNG state) plus
    training_state.json: the step, the batch layout that wrote it, each process's unlogged part of the meter, the
    recipe's own state, and the size of every file save_state wrote (so any layout, DDP's, FSDP's or DeepSpeed's, is
    checked whole). It is written into step-N.partial and renamed into place; `latest` is replaced atomically; old
    checkpoints are pruned only after a new one is whole, and never the one `latest` names. So a kill at any moment
    leaves the previous checkpoint whole.

    Resuming checks the checkpoint on every process before any work. It goes on at the same optimizer step, data
    position and LR schedule also on another number of processes, as long as the global batch is the same (with
    neither --gradient_accumulation_steps nor --global_batch_size given, the accumulation steps are set to keep it).
    Checkpoints newer than the one resumed from belong to an abandoned timeline: they are moved aside, not pruned."""

    def __init__(self, accelerator: Accelerator, args: argparse.Namespace, output_dir: Path, recipe: str):
        self.accelerator, self.args, self.root, self.recipe = accelerator, args, output_dir / "checkpoints", recipe
        self.last_saved, self.tracked = None, {}
        self.resume_from = self._find(args.resume_from_checkpoint) if args.resume_from_checkpoint else None
        self.state = self._check(self.resume_from) if self.resume_from else None
        self.resumed_step = self.state["step"] if self.state else None

    def layout(self) -> dict:
        return {
            "per_device_train_batch_size": self.args.per_device_train_batch_size,
            "processes": self.accelerator.num_processes,
            "gradient_accumulation_steps": self.accelerator.gradient_accumulation_steps,
        }

    def _find(self, spec: str) -> Path | None:
        """The checkpoint folder to resume from: a path, or `latest` (None when the run has none yet)."""
        if spec == "latest":
            pointer = self.root / "latest"
            if not pointer.is_file():
                return None
            path = self.root / pointer.read_text().strip()
        else:
            path = Path(spec)
        if not path.is_dir():
            fail(
                f"--resume_from_checkpoint: {path} does not exist; give a checkpoint folder "
                "(<output_dir>/checkpoints/step-N) or `latest`"
            )
        if not (path / "training_state.json").is_file():
            fail(
                f"{path} is not a {self.recipe} checkpoint (no training_state.json): give a checkpoint folder or "
                "`latest`"
            )
        return path

    def _check(self, path: Path) -> dict:
        """Read the checkpoint's state and check, on every process, that its files are whole and load, then that this
        run can continue it; one clear error otherwise. (accelerate's load_state would skip an unreadable RNG file
        silently, and resume inexactly.)"""
        problem, state = None, {}
        try:
            state = json.loads((path / "training_state.json").read_text())
            if state.get("format") != CHECKPOINT_FORMAT:
                problem = (
                    f"{path} was written by an older version of this recipe (checkpoint format "
                    f"{state.get('format', 1)}, this one reads {CHECKPOINT_FORMAT}): resume it with the version that "
                    "wrote it, or start a new run"
                )
            else:
                self._check_files(path, state["files"])
                problem = self._adopt_layout(path, state["layout"], state["per_process_optimizer"])
        except Exception as e:  # a truncated or overwritten file: say which checkpoint, suggest an older one
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            problem = (
                f"checkpoint {path} is corrupted or incomplete ({type(e).__name__}: {first}); resume from an earlier "
                f"one in {path.parent}"
            )
        problems = [p for p in gather_object([problem]) if p]
        if problems:
            fail(problems[0])
        return state

    def _check_files(self, path: Path, files: dict[str, list | int]) -> None:
        """Every file save_state wrote is there at its size and with its SHA-256 (a checkpoint written before the
        checksums holds sizes only); pickles load with weights_only (one holding code is refused, never run),
        safetensors headers parse."""
        for name, written in files.items():
            file, (size, digest) = path / name, written if isinstance(written, list) else (written, None)
            if not file.is_file() or file.stat().st_size != size:
                raise OSError(f"{name} is missing or has another size than was written")
            if digest and sha256_of(file) != digest:
                raise OSError(f"{name} has changed since it was written (its SHA-256 differs)")
            if file.suffix in (".bin", ".pkl") and not name.startswith("random_states_"):
                load(file, map_location="cpu")
            elif file.suffix == ".safetensors":
                with safe_open(file, "pt") as tensors:
                    tensors.keys()
        own_rng = path / f"random_states_{self.accelerator.process_index}.pkl"
        if own_rng.is_file():
            load(own_rng)

    def _adopt_layout(self, path: Path, saved: dict, per_process_optimizer: bool) -> str | None:
        """The global batch must be the one the checkpoint was written with; how it is split may change. With no
        accumulation asked for, take the steps that keep it. Returns a problem, or None."""
        now = self.layout()
        saved_global, now_global = math.prod(saved.values()), math.prod(now.values())
        pinned = self.args.gradient_accumulation_steps is not None or self.args.global_batch_size is not None
        per_round = now["per_device_train_batch_size"] * now["processes"]
        if saved_global != now_global and not pinned and saved_global % per_round == 0:
            self.accelerator.gradient_accumulation_steps = saved_global // per_round
            now = self.layout()
        describe = (
            "{per_device_train_batch_size} per device x {processes} process(es) x {gradient_accumulation_steps} "
            "accumulation"
        ).format
        if saved_global != math.prod(now.values()):
            return (
                f"{path} was written with a global batch of {saved_global} ({describe(**saved)}) and this run's is "
                f"{math.prod(now.values())} ({describe(**now)}): resume with --global_batch_size {saved_global}"
            )
        if per_process_optimizer and saved["processes"] != now["processes"]:
            return (
                f"{path} holds Local SGD's optimizer state of {saved['processes']} processes, one each: resume it on "
                f"{saved['processes']} processes"
            )
        if saved != now:
            logger.info(
                f"{self.recipe}: the checkpoint was written by {describe(**saved)}; resuming on {describe(**now)}: the "
                "same global batches, optimizer step and LR schedule"
            )
        return None

    def restore(self, optimizer, meter: Meter, guard: Guard, local_sgd: LocalSGD) -> dict:
        """Restore the checkpoint (if resuming) into the prepared objects, and remember what every later checkpoint
        saves. Returns the recipe's own saved state ({} when starting afresh)."""
        self.tracked = {"optimizer": optimizer, "meter": meter, "guard": guard, "local_sgd": local_sgd}
        if self.state is None:
            return {}
        step, path = self.state["step"], self.resume_from
        newer = [p for p in self.root.glob("step-*") if self._step_of(p) > step] if self.root.is_dir() else []
        if newer and self.accelerator.is_main_process:  # another timeline, abandoned: kept aside, not deleted
            aside = self.root / f"abandoned-{datetime.now():%Y%m%d-%H%M%S}"
            aside.mkdir()
            for folder in newer:
                folder.rename(aside / folder.name)
            kept = sorted((p for p in self.root.glob("step-*") if self._step_of(p) >= 0), key=self._step_of)
            if kept:  # `latest` never names a folder that is gone
                self._point_latest_to(kept[-1])
            else:
                (self.root / "latest").unlink(missing_ok=True)
            names = ", ".join(sorted(p.name for p in newer))
            logger.info(f"{self.recipe}: resuming from step {step}; the newer checkpoints ({names}) moved to {aside}")
        self.accelerator.wait_for_everyone()
        self.accelerator.load_state(str(path))
        same_layout = self.state["layout"] == self.layout()
        if not same_layout:
            # load_state brought back the writer's micro-batch count, which places accumulation windows; with other
            # accumulation steps it would close this run's first window early. A checkpoint is taken at an optimizer
            # step's boundary: count afresh. (accelerate 1.15 has no public setter for it.)
            self.accelerator.step = 0
            # The saved RNG states belong to other processes: a new stream, the same on every rerun.
            set_seed(self.args.seed + step, device_specific=True)
            if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in local_sgd.model.modules()):
                logger.info(
                    f"{self.recipe}: random numbers (dropout) continue from a new stream: they cannot be carried over "
                    "exactly to another layout"
                )
        if local_sgd.enabled:
            own = path / f"optimizer_rank_{self.accelerator.process_index}.bin"
            if own.is_file():  # this replica's moments, not rank 0's (they differ between averages)
                optimizer.load_state_dict(load(own, map_location="cpu"))
            else:
                logger.warning(f"{path} has no per-process optimizer state: every process resumes with rank 0's")
        meter.load_state_dict(self.state["meter"], same_layout)
        guard.skipped_steps = self.state["skipped_steps"]
        logger.info(f"{self.recipe}: resumed from {path} at step {step}")
        return self.state["recipe"]

    def _failed_save(self, staging: Path, final: Path, error: Exception) -> NoReturn:
        """Remove what the save wrote (the previous checkpoint and `latest` are untouched), and say why it failed:
        the space a checkpoint takes (the last one's size, or the model's) against the space there is."""
        shutil.rmtree(staging, ignore_errors=True)
        previous = self.root / self.last_complete() if self.last_complete() else None
        size = sum(p.stat().st_size for p in previous.rglob("*") if p.is_file()) if previous else 0
        size = size or 12 * sum(p.numel() for p in self.tracked["local_sgd"].model.parameters())
        free = shutil.disk_usage(self.root).free
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        stop(
            f"could not write checkpoint {final} ({first}): it takes about {size / 2**30:.2f} GiB, and "
            f"{free / 2**30:.2f} GiB are free on its file system. The partial checkpoint was removed and the last "
            f"whole one kept ({previous.name if previous else 'none yet'}): free some space, then resume with "
            "--resume_from_checkpoint latest"
        )

    def last_complete(self) -> str | None:
        pointer = self.root / "latest"
        return pointer.read_text().strip() if pointer.is_file() else None

    def _point_latest_to(self, checkpoint: Path) -> None:
        (self.root / "latest.partial").write_text(checkpoint.name)
        os.replace(self.root / "latest.partial", self.root / "latest")  # atomic: latest names a whole checkpoint

    @staticmethod
    def _step_of(path: Path) -> int:
        name = path.name.removeprefix("step-")
        return int(name) if name.isdigit() else -1

    def due(self, step: int, epoch_end: bool = False) -> bool:
        every = self.args.checkpointing_steps
        return (isinstance(every, int) and step % every == 0) or (every == "epoch" and epoch_end)

    def save(self, step: int, state: dict | None = None, epoch_end: bool = False, force: bool = False) -> None:
        """Save a checkpoint if one is due at this step (--checkpointing_steps), or if `force`. Every process must
        call it. `state`: the recipe's own, JSON-serialisable (tensors become lists)."""
        if step == self.last_saved or not (force or self.due(step, epoch_end)):
            return
        accelerator, meter, local_sgd = self.accelerator, self.tracked["meter"], self.tracked["local_sgd"]
        with meter.paused("checkpoint"):
            local_sgd.average()  # rank 0's model is what is saved: make it the replicas' mean
            meter_state = meter.state_dict()  # a collective: before the main process's part
            final, staging = self.root / f"step-{step:07d}", self.root / f"step-{step:07d}.partial"
            if accelerator.is_main_process:
                shutil.rmtree(staging, ignore_errors=True)  # the leftover of a save that was killed
            accelerator.wait_for_everyone()
            try:
                accelerator.save_state(str(staging))  # every process writes its own RNG state
            except Exception as error:  # a full disk shows as torch's "unexpected pos ..." as often as ENOSPC
                self._failed_save(staging, final, error)
            if local_sgd.enabled:  # each replica's optimizer moments (save_state keeps rank 0's only)
                torch.save(
                    self.tracked["optimizer"].state_dict(), staging / f"optimizer_rank_{accelerator.process_index}.bin"
                )
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                files = {
                    str(p.relative_to(staging)): [p.stat().st_size, sha256_of(p)]
                    for p in staging.rglob("*")
                    if p.is_file()
                }
                recipe_state = {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in (state or {}).items()}
                (staging / "training_state.json").write_text(
                    json.dumps(
                        {
                            "format": CHECKPOINT_FORMAT,
                            "step": step,
                            "layout": self.layout(),
                            "per_process_optimizer": local_sgd.enabled,
                            "skipped_steps": self.tracked["guard"].skipped_steps,
                            "meter": meter_state,
                            "recipe": recipe_state,
                            "files": files,
                        }
                    )
                )
                shutil.rmtree(final, ignore_errors=True)
                staging.rename(final)
                self._point_latest_to(final)
                complete = sorted((p for p in self.root.glob("step-*") if self._step_of(p) >= 0), key=self._step_of)
                keep = self.args.checkpoints_total_limit
                for old in complete[:-keep] if keep else []:
                    if old != final:
                        shutil.rmtree(old)
            accelerator.wait_for_everyone()
        self.last_saved = step
        logger.info(f"{self.recipe}: checkpoint {final}")


# ----------------------------------------------------------------------------------------------------------- guard


class Guard:
    """Ends a run cleanly. SIGTERM (preemption; torchrun passes it to every rank) and SIGUSR1 (Slurm's --signal) set
    accelerate's trigger: at the next log step every process checkpoints, then exits 75. Ctrl-C (SIGINT) does the
    same, with a checkpoint only if the run makes them (--checkpointing_steps), and exits 130; a second Ctrl-C stops
    at once. A step whose gradient norm is NaN or inf is skipped, up to --nonfinite_skip_limit; the next stops the
    run before anything is written."""

    def __init__(self, accelerator: Accelerator, args: argparse.Namespace, log: RunLog, recipe: str):
        self.accelerator, self.args, self.log, self.recipe = accelerator, args, log, recipe
        self.signal, self.skipped_steps = None, 0
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signal == "SIGINT":
            raise KeyboardInterrupt  # the second Ctrl-C: now (run_failing_fast reports it)
        self.signal = signal.Signals(signum).name
        self.accelerator.set_trigger()

    def check(self, step: int, result: Step) -> None:
        """After each optimizer step: a NaN or inf gradient left the weights as they were; skip the step if allowed,
        else stop before anything (a checkpoint, the final model) is written from a broken state."""
        if result.finite:
            return
        self.skipped_steps += 1
        limit = self.args.nonfinite_skip_limit
        if self.skipped_steps > limit:
            latest = Path(self.log.path.parent, "checkpoints", "latest")
            used_up = f"all {limit} skips that --nonfinite_skip_limit allows are used up"
            skips = used_up if limit else "or allow skips with --nonfinite_skip_limit N"
            stop(
                f"gradient norm is {float(result.grad_norm)} at optimizer step {step}; stopped without saving (last "
                f"checkpoint: {latest.read_text().strip() if latest.is_file() else 'none'}). Lower --learning_rate, "
                f"check the data, {skips}"
            )
        self.log(
            {"step": step, "skipped_nonfinite_step": self.skipped_steps},
            f"step {step}: gradient norm {float(result.grad_norm)}, step skipped "
            f"({self.skipped_steps}/{self.args.nonfinite_skip_limit})",
        )

    def stop_if_preempted(self, step: int, checkpointer: Checkpointer, state: dict | None = None) -> None:
        """At log steps (the trigger is a collective; asking at every step would cost data parallelism a few
        percent): after a signal on any process, every process checkpoints, then exits 75."""
        if step % self.args.log_every or not self.accelerator.check_trigger():
            return
        interrupted = self.signal == "SIGINT"
        if interrupted and self.args.checkpointing_steps is None:
            saved = "no checkpoint (the run makes none: --checkpointing_steps)"
        else:
            checkpointer.save(step, state, force=True)
            saved = "checkpoint written; run the same command with --resume_from_checkpoint latest to continue"
        code = INTERRUPTED_EXIT_CODE if interrupted else PREEMPTED_EXIT_CODE
        what = "interrupted (Ctrl-C)" if interrupted else f"preempted ({self.signal or 'a signal to another rank'})"
        logger.info(f"{self.recipe}: {what} at step {step}: {saved}; exit status {code}")
        self.accelerator.end_training()
        leave(code)


# Errors of a collective whose peer is gone. gloo raises a plain RuntimeError (no DistError subclass; checked with
# torch 2.13), so the text is all there is to tell a lost peer from a bug.
LOST_PEER_ERRORS = ("Connection reset", "Connection closed", "Broken pipe", "Timed out", "timed out")


def run_failing_fast(entry, recipe: str) -> None:
    """When a process dies (killed node, out of memory), every collective of the others fails, or times out after
    --ddp_timeout. Name the lost rank in one line and exit at once, rather than hang or print a wall of C++."""
    try:
        entry()
    except KeyboardInterrupt:  # Ctrl-C before training began (the token cache, the model), or a second one
        exit_with_error("interrupted (Ctrl-C): stopped at once; nothing half-written was kept", INTERRUPTED_EXIT_CODE)
    except Exception as error:
        dist, text = torch.distributed, str(error)
        lost_peer = isinstance(error, dist.DistError) or any(s in text for s in LOST_PEER_ERRORS)
        several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not several:
            raise
        rank, world = dist.get_rank(), dist.get_world_size()
        if not lost_peer:  # this process's own failure: say it, so that its peers' "lost contact" is not all we see
            first = (text.strip().splitlines() or [""])[0][:300]
            report_error(f"rank {rank}: {type(error).__name__}: {first}")
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(FAILED_EXIT_CODE)
        if peer_said_why(rank):  # a peer stopped with a line of its own (bad input, a crash): that line tells it
            sys.stderr.flush()
            os._exit(FAILED_EXIT_CODE)
        try:  # the survivors check in with the launcher's rendezvous store; whoever does not is lost
            store = dist.TCPStore(
                os.environ["MASTER_ADDR"],
                int(os.environ["MASTER_PORT"]),
                is_master=False,
                timeout=timedelta(seconds=10),
            )
            store.set(f"{recipe}/alive/{rank}", "1")
            time.sleep(3)
            lost = [r for r in range(world) if not store.check([f"{recipe}/alive/{r}"])]
            who = "rank " + ", ".join(map(str, lost)) if lost else "another process"
        except Exception:  # the store lives with rank 0's launcher: that node is gone
            who = "rank 0 (the main node)"
        # gloo's text quotes its C++ source and a cut-off sentence: name what happened, not where.
        reason = next((s for s in LOST_PEER_ERRORS if s in text), type(error).__name__)
        report_error(
            f"rank {rank}: lost contact with {who} ({reason.lower()}); stopping. Resume with "
            "--resume_from_checkpoint latest once all nodes are back"
        )
        sys.stderr.flush()
        os._exit(FAILED_EXIT_CODE)  # skip teardown: destroying a process group with a dead peer can hang


def peer_said_why(rank: int, wait_s: float = 3.0) -> bool:
    """Whether another process has written its error line (under accel-dp run), waiting a moment for it."""
    error_dir = os.environ.get(ERROR_DIR_VARIABLE)
    deadline = time.monotonic() + wait_s
    while error_dir and os.path.isdir(error_dir):
        if any(p.name != f"rank-{rank}" for p in Path(error_dir).glob("rank-*")):
            return True
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return False


# ----------------------------------------------------------------------------------------------------------- meter


class Meter:
    """Training throughput and the mean loss since the last log. Each process adds up its own steps on the device
    (nothing is read back per step); a log step sums every process's part in one all-reduce. Evaluation and
    checkpoints are left out of the time (`with meter.paused("evaluation"):`)."""

    def __init__(self, accelerator: Accelerator, unit: str, start_time: float):
        self.accelerator, self.unit, self.start_time = accelerator, unit, start_time
        self.peak = peak_tflops(accelerator)
        self.dtype = torch.float32 if accelerator.device.type == "mps" else torch.float64
        self.loss = torch.zeros(2, dtype=torch.float32, device=accelerator.device)  # summed loss, examples
        self.work = [0.0, 0.0]  # items (tokens or samples) and their FLOPs: this process's, since the last log
        self.totals = {"loss": 0.0, "examples": 0.0, "items": 0.0, "flops": 0.0, "seconds": 0.0}  # all processes
        self.last_loss, self.paused_seconds = None, {}
        self.window_start, self.window_paused = time.perf_counter(), 0.0

    def add(self, result: Step) -> None:
        if result.finite:  # a skipped step's loss is left out of the mean
            self.loss[0] += result.loss_sum
            self.loss[1] += result.examples
        self.work[0] += result.items
        self.work[1] += result.flops

    @contextlib.contextmanager
    def paused(self, what: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - started
            self.window_paused += seconds
            self.paused_seconds[what] = self.paused_seconds.get(what, 0.0) + seconds

    def record(self, step: int) -> dict:
        """The record of a log step (every process must call it): loss, items/s, TFLOP/s, MFU, elapsed time."""
        now = time.perf_counter()
        seconds = max(now - self.window_start - self.window_paused, 1e-9)
        window = torch.cat(
            (self.loss.to(self.dtype), torch.tensor(self.work, dtype=self.dtype, device=self.loss.device))
        )
        loss_sum, examples, items, flops = self.accelerator.reduce(window, reduction="sum").tolist()
        self.loss.zero_()
        self.work, self.window_start, self.window_paused = [0.0, 0.0], now, 0.0
        for key, value in zip(self.totals, (loss_sum, examples, items, flops, seconds), strict=True):
            self.totals[key] += value
        record = {"step": step}
        if examples:  # (none when every step since the last log was skipped)
            self.last_loss = record["loss"] = loss_sum / examples
            if not math.isfinite(self.last_loss):
                stop(
                    f"the training loss became {self.last_loss} at step {step}: lower --learning_rate, or use "
                    "--mixed_precision bf16 instead of fp16"
                )
        record[f"{self.unit}_per_second"] = items / seconds
        record["tflops"] = flops / seconds / 1e12  # all processes together
        if self.peak:  # model FLOPs utilisation: the share of the devices' peak that trains the model
            record["mfu"] = record["tflops"] / (self.peak * self.accelerator.num_processes)
        record["elapsed_s"] = now - self.start_time
        return record

    def summary(self) -> dict:
        """The whole run (every process must call it): mean loss, training time, items/s, TFLOP/s, MFU, memory."""
        if any(self.work):
            self.record(step=-1)
        seconds = max(self.totals["seconds"], 1e-9)
        tflops = self.totals["flops"] / seconds / 1e12
        return {
            "train_loss": self.totals["loss"] / self.totals["examples"] if self.totals["examples"] else None,
            "train_runtime_s": self.totals["seconds"],  # training only: evaluation and checkpoints excluded
            **{f"{what}_runtime_s": s for what, s in self.paused_seconds.items()},
            f"{self.unit}_per_second": self.totals["items"] / seconds,
            "tflops": tflops,
            "peak_tflops_per_device": self.peak,
            "mfu": tflops / (self.peak * self.accelerator.num_processes) if self.peak else None,
            "peak_memory_gib": peak_memory_gib(self.accelerator),  # rank 0's: GPU memory on GPU, RSS on CPU
        }

    def state_dict(self) -> dict:
        """For a checkpoint (every process must call it): each process's unlogged part, gathered, and the totals."""
        windows = gather_object([[*self.loss.tolist(), *self.work]])
        seconds = time.perf_counter() - self.window_start - self.window_paused
        return {"windows": windows, "window_seconds": seconds, "totals": self.totals, "last_loss": self.last_loss}

    def load_state_dict(self, state: dict, same_layout: bool) -> None:
        """On another number of processes, the main process takes every process's unlogged part: the sums are what a
        log step reports."""
        windows = state["windows"]
        if same_layout:
            mine = windows[self.accelerator.process_index]
        else:
            mine = (
                [sum(column) for column in zip(*windows, strict=True)]
                if self.accelerator.is_main_process
                else [0.0] * 4
            )
        self.loss = torch.tensor(mine[:2], dtype=torch.float32, device=self.loss.device)
        self.work = list(mine[2:])
        self.window_start, self.window_paused = time.perf_counter() - state["window_seconds"], 0.0
        self.totals, self.last_loss = dict(state["totals"]), state["last_loss"]


# Peak dense tensor-core TFLOP/s per GPU, (bf16/fp16, fp32), from the vendors' data sheets, matched by a part of
# torch.cuda.get_device_name(). MFU is reported only for a device listed here, never against a guessed peak:
# on CPU, or an unknown GPU, runs log achieved TFLOP/s only.
PEAK_TFLOPS = (
    ("H200", (989.0, 67.0)),
    ("H100 PCIe", (756.0, 51.0)),
    ("H100 NVL", (835.0, 60.0)),
    ("H100", (989.0, 67.0)),  # SXM
    ("GH200", (989.0, 67.0)),
    ("A100", (312.0, 19.5)),
    ("L40S", (362.0, 91.6)),
    ("L4", (121.0, 30.3)),
    ("A10G", (70.0, 31.2)),
    ("V100", (125.0, 15.7)),  # fp16; no bf16
)


def peak_tflops(accelerator: Accelerator) -> float | None:
    """This device's peak for the run's precision, or None where unknown (CPU included)."""
    if accelerator.device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(accelerator.device)
    half = accelerator.mixed_precision in ("bf16", "fp16", "fp8")
    return next((peaks[0] if half else peaks[1] for part, peaks in PEAK_TFLOPS if part in name), None)


def peak_memory_gib(accelerator: Accelerator) -> float:
    """Peak GPU memory allocated by this process on GPU; peak resident memory (RSS) of this process on CPU."""
    if accelerator.device.type == "cuda":
        return torch.cuda.max_memory_allocated(accelerator.device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def check_memory(accelerator: Accelerator, need: dict[str, float], what_to_lower: str) -> None:
    """Refuse, within seconds of the start, a run whose estimated memory per process (`need`: bytes by what they hold)
    cannot fit: the GPU's free memory on GPU, this machine's available RAM shared by its processes on CPU."""
    if accelerator.device.type == "cuda":
        free, where = torch.cuda.mem_get_info(accelerator.device)[0], "the GPU"
    else:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        free, where = psutil.virtual_memory().available / local, f"this machine's RAM ({local} process(es) share it)"
    free = min(gather_object([free]))  # every process decides alike, on the tightest
    total = sum(need.values())
    if total > free:
        parts = ", ".join(f"{name} {size / 2**30:.1f}" for name, size in need.items())
        fail(
            f"this run needs about {total / 2**30:.1f} GiB per process ({parts} GiB) but {where} has "
            f"{free / 2**30:.1f} GiB free: lower {what_to_lower}"
        )


# ------------------------------------------------------------------------------------------------------- Local SGD


class LocalSGD:
    """--local_sgd_steps K: each process steps on its own gradient (DDP's all-reduce off: accelerate's no_sync for the
    whole loop) and the replicas' parameters are averaged (accelerate's reduce) every K optimizer steps, and before
    evaluation, checkpoints and the save. Averaging is keyed to the step number, so a resumed run averages at the same
    steps; leaving the `with` averages only when no exception is in flight (an average is a collective, which a lost
    process would hang). Disabled, with one process or without K, every method does nothing."""

    def __init__(self, accelerator: Accelerator, model, every: int | None):
        self.accelerator, self.model, self.every = accelerator, model, every
        self.enabled = bool(every) and accelerator.num_processes > 1
        self.contexts = contextlib.ExitStack()

    def __enter__(self) -> LocalSGD:
        if self.enabled:
            self.contexts.enter_context(self.accelerator.no_sync(self.model))
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        if error_type is None:
            self.average()
        self.contexts.close()

    def step(self, step: int) -> None:
        if self.enabled and step % self.every == 0:
            self.average()

    def average(self) -> None:
        if self.enabled:
            parameters = list(self.model.parameters())  # one all-reduce for all, copied back in place
            mean = self.accelerator.reduce(torch.nn.utils.parameters_to_vector(parameters), reduction="mean")
            for parameter, averaged in zip(parameters, mean.split([p.numel() for p in parameters]), strict=True):
                parameter.data.copy_(averaged.view_as(parameter))


# -------------------------------------------------------------------------------------------------- model helpers


def check_positive(args: argparse.Namespace, *names: str) -> None:
    """Each named flag, when given, is a positive integer."""
    for name in names:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            fail(f"--{name} must be a positive integer, got {getattr(args, name)}")


def load_pretrained(auto_class, name_or_path: str, new_modules: tuple[str, ...] = (), **kwargs):
    """`auto_class.from_pretrained` with fp32 master weights, whatever the checkpoint holds (transformers keeps a bf16
    one in bf16, which fp16's loss scaler cannot unscale and in which AdamW's small updates round away):
    --mixed_precision casts. A checkpoint that cannot be loaded is a one-line error. transformers' LOAD REPORT table
    (with terminal colour codes, also in a log file) becomes one line naming the weights the checkpoint lacked, and
    none when those are the `new_modules` the recipe adds on purpose (a fresh classification head)."""

    def not_the_report(record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)

    reporter = logging.getLogger("transformers.modeling_utils")
    reporter.addFilter(not_the_report)
    try:
        with no_transformers_progress_bars():
            model, info = auto_class.from_pretrained(
                name_or_path, dtype=torch.float32, output_loading_info=True, **kwargs
            )
    except (OSError, ValueError) as e:
        fail(f"cannot load model '{name_or_path}': {(str(e).strip().splitlines() or [type(e).__name__])[0]}")
    finally:
        reporter.removeFilter(not_the_report)
    mismatched = [key[0] if isinstance(key, tuple) else key for key in info["mismatched_keys"]]
    fresh = [key for key in info["missing_keys"] if not key.startswith(new_modules)] + mismatched
    if fresh:
        listed = ", ".join(map(str, fresh[:5])) + (", ..." if len(fresh) > 5 else "")
        logger.warning(f"{name_or_path}: {len(fresh)} weight(s) not in the checkpoint, initialised at random: {listed}")
    return model


@contextlib.contextmanager
def no_transformers_progress_bars():
    """transformers' "Loading weights" and "Writing model shards" bars, one per model: a moment on screen, and a
    line of carriage returns in a log file."""
    from transformers.utils import logging as transformers_logging

    shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            transformers_logging.enable_progress_bar()


def make_optimizer(
    model,
    *,
    learning_rate: float,
    weight_decay: float,
    betas: tuple[float, float],
    schedule: str,
    num_warmup_steps: int,
    num_training_steps: int,
    mixed_precision: str = "no",
    **schedule_options,
):
    """AdamW with weight decay on matrices (2-D weights) only, never on biases and LayerNorm parameters (GPT-2's and
    BERT's recipe alike), and transformers' LR schedule `schedule` with linear warmup, counted in optimizer steps.

    AdamW is torch's fused implementation (one kernel for all parameters, on CPU and GPU: 7 % of a CPU step of the
    nano GPT, about 3 % on GPUs by nanoGPT's and llm.c's reports), except under fp16, whose loss scaler must see
    every step to skip an overflowing one and count it (the recipes' skip accounting): there it is foreach."""
    from transformers import get_scheduler

    fused = mixed_precision != "fp16"
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in parameters if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in parameters if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=learning_rate,
        betas=betas,
        fused=fused or None,
        foreach=None if fused else True,
    )
    lr_scheduler = get_scheduler(
        schedule,
        optimizer,
        num_warmup_steps=num_warmup_steps,
        num_training_steps=num_training_steps,
        scheduler_specific_kwargs=schedule_options,
    )
    return optimizer, lr_scheduler


class FlopsPerToken(NamedTuple):
    """Training FLOPs per token, forward and backward: 6 per weight the token meets in a matmul, plus attention's
    12 x layers x width x context (PaLM, appendix B; nanoGPT's estimate_mfu). Embedding tables are lookups and do
    not count, unless tied to an output layer (GPT-2's token embeddings are also its LM head's matmul)."""

    weights: int
    layers: int
    width: int

    @classmethod
    def of(cls, model) -> FlopsPerToken:
        matmuls = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
        lookups = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)} - matmuls
        config = model.config  # transformers' attribute map gives GPT-2's n_layer and n_embd these names too
        weights = sum(p.numel() for p in model.parameters() if id(p) not in lookups)
        return cls(weights, config.num_hidden_layers, config.hidden_size)

    def __call__(self, context: int) -> float:
        return 6 * self.weights + 12 * self.layers * self.width * context


def training_memory(
    accelerator: Accelerator, model, tokens: int, context: int, attention_materialised: bool, logits: int = 0
) -> dict[str, float]:
    """Bytes one process needs, roughly, for micro-batches of `tokens` tokens: fp32 weights, gradients and AdamW's two
    moments (16 per parameter, shared out under FSDP or DeepSpeed); the activations kept for the backward, about
    17 x width values per token and layer (Korthikanti et al. 2022), plus 2 x heads x context where attention is
    materialised (eager; sdpa's kernels are linear in the context, also on CPU); and a causal LM's logits in fp32,
    kept for the loss and its gradient. Measured on CPU (GPT 4 x 128, batch 4 x 4096): 0.58 GiB estimated, 0.67 GiB
    of peak RSS above the model's."""
    config = model.config
    value_bytes = 2 if accelerator.mixed_precision in ("bf16", "fp16") else 4
    values = 17 * config.hidden_size + (2 * config.num_attention_heads * context if attention_materialised else 0)
    shards = accelerator.num_processes if accelerator.distributed_type.name in ("FSDP", "DEEPSPEED") else 1
    need = {
        "weights, gradients and optimizer": 16 * sum(p.numel() for p in model.parameters()) / shards,
        "activations": tokens * config.num_hidden_layers * values * value_bytes,
    }
    if logits:  # the fp32 logit values held at once (a micro-batch's, or one chunk's when the loss is chunked)
        need["logits"] = 3 * logits * 4
    return need


# ------------------------------------------------------------------------------------------------------------ run


class Run:
    """One training run's plumbing, so that a recipe's main() calls one line per concern.

    Made first in main(): it checks how this process was launched, makes the Accelerator (the accumulation steps set
    by the flags, or by a checkpoint's global batch), names the output folder (created only once the data and the
    model are known to be good) and checks the checkpoint to resume from on every process, all before any work."""

    def __init__(self, recipe: str, args: argparse.Namespace, unit: str, default_name: str | None = None):
        self.start_time = time.perf_counter()
        self.recipe, self.args, self.unit = recipe, args, unit
        self.accelerator = start_accelerator(args, recipe)
        self.output_dir = output_folder(args, self.accelerator, default_name or recipe)
        self.checkpointer = Checkpointer(self.accelerator, args, self.output_dir, recipe)
        self.first_step = self.checkpointer.resumed_step or 0
        self.early_signal = None  # a preemption while the data and the model are prepared (Guard takes over later)
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, lambda signum, frame: setattr(self, "early_signal", signal.Signals(signum).name))

    def check_steps(self, max_train_steps: int) -> None:
        """A checkpoint at or past the last step has nothing left to train: refused, not reported as a success."""
        if self.first_step >= max_train_steps:
            fail(
                f"{self.checkpointer.resume_from} is at step {self.first_step}, and the run ends at step "
                f"{max_train_steps}: nothing to train; raise --max_train_steps (or --num_train_epochs) to go on"
            )

    @property
    def accumulation(self) -> int:
        return self.accelerator.gradient_accumulation_steps

    @property
    def global_batch_size(self) -> int:
        return self.args.per_device_train_batch_size * self.accumulation * self.accelerator.num_processes

    def describe(self) -> str:
        """How the run is laid out, for its first log line."""
        a, n = self.accelerator, self.accelerator.num_processes
        return (
            f"{self.recipe}: {n} process(es) on {a.device.type}, mixed precision {a.mixed_precision}, global batch "
            f"{self.global_batch_size} = {self.args.per_device_train_batch_size} per device x {n} x "
            f"{self.accumulation} accumulation, AdamW {self.adamw_implementation()}"
            + (", compiled (torch.compile)" if self.args.torch_compile else "")
        )

    def adamw_implementation(self) -> str:
        defaults = getattr(self.optimizer, "optimizer", self.optimizer).defaults
        return "fused" if defaults.get("fused") else "foreach" if defaults.get("foreach") else "for-loop"

    def begin(self, model, optimizer, lr_scheduler) -> dict:
        """After prepare(): the output folder and its log, the meter, the guard, Local SGD, and the checkpoint (if
        resuming) restored into the prepared objects. Returns the recipe's own saved state ({} on a fresh start)."""
        accelerator, args = self.accelerator, self.args
        self.lr_scheduler, self.optimizer = lr_scheduler, optimizer
        check_disk(accelerator, self.output_dir, model, checkpoints=args.checkpointing_steps is not None)
        if self.early_signal:
            accelerator.set_trigger()
        if accelerator.check_trigger():  # preempted before the first step: nothing to save yet
            logger.info(
                f"{self.recipe}: preempted ({self.early_signal or 'a signal to another rank'}) before training "
                f"began: nothing to save; exit status {PREEMPTED_EXIT_CODE}, run the same command again"
            )
            accelerator.end_training()
            leave(PREEMPTED_EXIT_CODE)
        self.log = RunLog(accelerator, args, self.output_dir, self.checkpointer.resumed_step)
        self.meter = Meter(accelerator, self.unit, self.start_time)
        self.guard = Guard(accelerator, args, self.log, self.recipe)
        self.local_sgd = LocalSGD(accelerator, model, args.local_sgd_steps)
        if args.torch_compile:
            # --torch_compile (transformers' TrainingArguments flag): the module compiles its own forward in place,
            # inside DDP, so its parameters keep their names: no `_orig_mod.` in checkpoints or saved weights, and a
            # compiled run's checkpoint resumes uncompiled and the other way round. (accelerate's dynamo_backend
            # wraps the model instead, and its checkpoints then carry the prefix.)
            accelerator.unwrap_model(model).compile()
        return self.checkpointer.restore(optimizer, self.meter, self.guard, self.local_sgd)

    @contextlib.contextmanager
    def training(self, total_steps: int):
        """Around the loop: the progress bar (closed whatever ends the loop) and Local SGD's no_sync. The bar is drawn
        on a terminal only: in a log file the log lines say how far the run is."""
        bar = dict(
            total=total_steps, initial=self.first_step, disable=True if not self.accelerator.is_main_process else None
        )
        with tqdm(**bar, desc="train", mininterval=1.0, dynamic_ncols=True) as self.progress, self.local_sgd:
            yield self.progress

    def step_done(self, step: int, result: Step) -> None:
        """After each optimizer step: a NaN or inf gradient is skipped or stops the run (Guard), the meter counts the
        step, the LR schedule steps once per optimizer step, applied or skipped (docs/data_parallel.md), and every
        K-th step Local SGD averages the replicas."""
        self.guard.check(step, result)
        self.meter.add(result)
        self.lr_scheduler.step()
        self.local_sgd.step(step)
        self.progress.update(1)

    def log_step(self, step: int, total_steps: int, **extra) -> dict | None:
        """At every --log_every-th step and the last: the mean loss since the last log, the throughput and the LR into
        metrics.jsonl, the trackers, the log and the progress bar. Every process calls it at every step."""
        if step % self.args.log_every and step != total_steps:
            return None
        record = {**self.meter.record(step), **extra, "lr": self.lr_scheduler.get_last_lr()[0]}
        loss = f"{record['loss']:.4f}" if "loss" in record else "- (steps skipped)"
        where = "".join(f" | {key} {value}" for key, value in extra.items())
        self.log(
            record,
            f"step {step}/{total_steps}{where} | loss {loss} | lr {record['lr']:.3e} | "
            f"{record[f'{self.unit}_per_second']:,.1f} {self.unit}/s | {record['tflops']:.3g} TFLOP/s",
        )
        self.progress.set_postfix(loss=loss)
        return record

    @contextlib.contextmanager
    def evaluation(self):
        """Around an evaluation: its time is left out of the throughput, and under Local SGD the replicas are
        averaged first (one model to evaluate)."""
        self.progress.set_description("eval")  # (at the last step the bar is full, and evaluation still to come)
        with self.meter.paused("eval"):
            self.local_sgd.average()
            yield
        self.progress.set_description("train")

    def save(self, step: int, state: dict | None = None, epoch_end: bool = False) -> None:
        """After every step but the last: a checkpoint when one is due (--checkpointing_steps); after a signal, every
        process checkpoints, then exits 75. `state`: the recipe's own, to come back from `begin` on resume."""
        self.checkpointer.save(step, state, epoch_end=epoch_end)
        if not epoch_end:
            self.guard.stop_if_preempted(step, self.checkpointer, state)

    def finish(self, model, tokenizer, results: dict) -> dict:
        """The end of training: the model and tokenizer in Hugging Face format, all_results.json (strict JSON, null
        where a value is missing) and run_args.json, and the trackers closed. Every process calls it."""
        save_model(self.accelerator, model, tokenizer, self.output_dir)
        results = {**results, "total_runtime_s": time.perf_counter() - self.start_time}
        if self.accelerator.is_main_process:
            for name, content in (("all_results.json", results), ("run_args.json", vars(self.args))):
                (self.output_dir / name).write_text(json.dumps(finite_or_null(content), indent=2) + "\n")
        self.accelerator.end_training()
        return results


def check_disk(accelerator: Accelerator, output_dir: Path, model, checkpoints: bool) -> None:
    """Before the first step, on every process: the output folder can be written, and its file system has room for
    the final model and, if the run makes them, a checkpoint (fp32 weights and AdamW's two moments, 12 bytes per
    parameter, shared out under FSDP or DeepSpeed). Every process decides alike."""
    existing = next(p for p in (output_dir.absolute(), *output_dir.absolute().parents) if p.exists())
    parameters = sum(p.numel() for p in model.parameters())
    shards = accelerator.num_processes if accelerator.distributed_type.name in ("FSDP", "DEEPSPEED") else 1
    need = 4 * parameters + (12 * parameters / shards if checkpoints else 0)
    problem = None
    try:  # (os.access says yes to root, also on a read-only file system's folder)
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        problem = f"--output_dir {output_dir}: {existing} cannot be written to ({e.strerror}): choose another folder"
    if problem is None and (free := shutil.disk_usage(existing).free) < need:
        problem = (
            f"--output_dir {output_dir}: the model{' and a checkpoint' if checkpoints else ''} need about "
            f"{need / 2**30:.2f} GiB, and its file system has {free / 2**30:.2f} GiB free: free some space or choose "
            "another folder"
        )
    problems = [p for p in gather_object([problem]) if p]
    if problems:
        fail(problems[0])


def sha256_of(path: Path) -> str:
    """A file's SHA-256, read a MiB at a time (about 1 s per GB: docs/benchmarks.md)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(2**20):
            digest.update(block)
    return digest.hexdigest()


def finite_or_null(value):
    """NaN and infinity, which JSON has no word for, as null (json.dumps would write NaN, which no parser reads)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(item) for item in value]
    return value
