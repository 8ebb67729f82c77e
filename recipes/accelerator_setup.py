"""How this process was launched, and the Accelerator made for it: checked against what was asked for.

Launchers can start other than what was asked for without a word (`accelerate launch --cpu --num_processes 2`
starts one process; `--multi_gpu` on a machine without a GPU starts N unsynchronised copies), and accelerate runs
some settings as others (fp16 on CPU as fp32, FSDP on CPU as plain DDP). Each is refused here in one line, before
any work. The accumulation arithmetic is nanoGPT's: a fixed global batch is reached with fewer accumulation steps on
more processes.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DDPCommunicationHookType,
    DistributedDataParallelKwargs,
    InitProcessGroupKwargs,
    parse_flag_from_env,
)
from faults import fail
from tqdm.auto import tqdm


def launched_world_size(recipe: str) -> int:
    """The number of processes the launcher started (WORLD_SIZE), refusing accelerate's single-process launcher when
    it was asked for several."""
    launched_alone = "WORLD_SIZE" not in os.environ and "ACCELERATE_DYNAMO_BACKEND" in os.environ
    if launched_alone and "MASTER_ADDR" in os.environ and parse_flag_from_env("ACCELERATE_USE_CPU"):
        # accelerate's single-process launcher sets MASTER_ADDR when asked for several processes, and starts one.
        fail(
            "accelerate launch was asked for several processes but started only this one (`--cpu` and MULTI_CPU "
            "configs do that): use `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N` or "
            f"`accel-dp run {recipe} --cpu --procs N` (or unset MASTER_ADDR to run one process)"
        )
    return int(os.environ.get("WORLD_SIZE", "1"))


def runs_on_cpu(cpu: bool, world_size: int) -> bool:
    """accelerate runs on CPU whenever ACCELERATE_USE_CPU is set, whatever --cpu says; every check must agree."""
    return cpu or parse_flag_from_env("ACCELERATE_USE_CPU") or (world_size > 1 and not torch.cuda.is_available())


def settle_accumulation(
    per_device_batch: int, world_size: int, accumulation: int | None, global_batch_size: int | None
) -> int:
    """The gradient accumulation steps: --gradient_accumulation_steps, or what --global_batch_size needs on this many
    processes (1 when neither is given)."""
    if global_batch_size is None:
        return accumulation or 1
    per_round = per_device_batch * world_size
    if global_batch_size % per_round:
        fail(
            f"--global_batch_size {global_batch_size} is not a multiple of per_device_train_batch_size x processes = "
            f"{per_device_batch} x {world_size} = {per_round}: choose a multiple of {per_round} or another "
            "per-device batch size"
        )
    if accumulation not in (None, global_batch_size // per_round):
        fail(
            f"--gradient_accumulation_steps {accumulation} contradicts --global_batch_size {global_batch_size}, which "
            f"needs {global_batch_size // per_round} on {world_size} process(es): give only one"
        )
    return global_batch_size // per_round


def check_precision(mixed_precision: str | None, on_cpu: bool) -> None:
    precision = mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision in ("fp16", "fp8") and (on_cpu or not torch.cuda.is_available()):
        fail(
            f"{precision} does nothing on CPU (accelerate ignores fp16, fp8 needs a GPU): use --mixed_precision bf16 "
            "or no"
        )


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


def ddp_kwargs(
    comm_hook: str, powersgd_rank: int | None, powersgd_start_iter: int | None, on_cpu: bool
) -> DistributedDataParallelKwargs:
    """What accelerate passes to DDP; it registers the --ddp_comm_hook on the model in prepare()."""
    hook = {
        "none": DDPCommunicationHookType.NO,
        "fp16": DDPCommunicationHookType.FP16,
        "bf16": DDPCommunicationHookType.BF16,
        "powersgd": DDPCommunicationHookType.POWER_SGD,
    }[comm_hook]
    if comm_hook != "powersgd":
        return DistributedDataParallelKwargs(comm_hook=hook)
    # torch's default start (1000 steps of plain all-reduce) outlasts many whole fine-tunes, which would then never
    # compress; 10 steps skip only the first, most violent updates. Error feedback and warm start: on.
    state = {"matrix_approximation_rank": powersgd_rank or 1, "start_powerSGD_iter": powersgd_start_iter or 10}
    # Over gloo (CPU), PowerSGD launches its P and Q all-reduces from callbacks as earlier ones complete, so with
    # several gradient buckets the ranks issue them in different orders and gloo aborts (collective mismatch). One
    # bucket holding every gradient keeps one chain per step: no more memory, only no overlap with the backward.
    single_bucket = {"bucket_cap_mb": 2**20} if on_cpu else {}
    return DistributedDataParallelKwargs(comm_hook=hook, comm_state_option=state, **single_bucket)


def start_accelerator(
    recipe: str,
    world_size: int,
    *,
    on_cpu: bool,
    mixed_precision: str | None,
    accumulation: int,
    trackers: list[str],
    project_dir: str,
    ddp_timeout: int,
    ddp: DistributedDataParallelKwargs,
) -> Accelerator:
    """The Accelerator, checked to run as many processes as the launcher started."""
    accelerator = Accelerator(
        cpu=on_cpu,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=accumulation,
        log_with=trackers or None,
        project_dir=project_dir,  # where tensorboard logs; set to the output folder later
        # The recipes step the LR schedule once per optimizer step; accelerate's default steps it once per process.
        step_scheduler_with_optimizer=False,
        # A collective waiting on a silent process fails after this long instead of hanging (faults.run_main).
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=ddp_timeout)), ddp],
    )
    if accelerator.num_processes != world_size:
        fail(
            f"launched for {world_size} processes but running as {accelerator.num_processes}: on CPU launch with "
            "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N` or "
            f"`accel-dp run {recipe} --cpu --procs N`"
        )
    return accelerator


def check_parallel_mode(accelerator: Accelerator, comm_hook: str, local_sgd_steps: int | None) -> None:
    """Refuse what accelerate would silently run otherwise, once the Accelerator says how it runs (all ranks alike)."""
    # `accelerate launch` with an FSDP or DeepSpeed config sets these; on CPU accelerate then runs plain DDP instead.
    for name, variable in (("FSDP", "ACCELERATE_USE_FSDP"), ("DEEPSPEED", "ACCELERATE_USE_DEEPSPEED")):
        if parse_flag_from_env(variable) and accelerator.distributed_type.name != name:
            fail(
                f"{name} was asked for ({variable}) but accelerate runs {accelerator.distributed_type.value}: on CPU "
                f"it replaces {name} by plain DDP, every process holding the whole model. Shard on GPUs, or drop the "
                "config (accel-dp run --config multi_cpu)"
            )
    given = {"--ddp_comm_hook": comm_hook != "none", "--local_sgd_steps": local_sgd_steps is not None}
    flags = " and ".join(flag for flag, on in given.items() if on)
    if not flags:
        return
    if accelerator.num_processes == 1:
        tqdm.write(f"note: {flags} ignored: one process alone has nothing to communicate", file=sys.stderr)
    elif accelerator.distributed_type.name in ("FSDP", "DEEPSPEED", "MEGATRON_LM", "XLA"):
        fail(
            f"{flags} change DDP's gradient all-reduce, and {accelerator.distributed_type.value} does not use DDP: "
            "drop them, or use a DDP config"
        )
    elif comm_hook == "bf16" and accelerator.device.type == "cpu":
        fail("--ddp_comm_hook bf16 needs GPUs with NCCL (torch refuses it over gloo on CPU): use fp16 or powersgd")
