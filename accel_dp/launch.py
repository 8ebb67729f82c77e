"""Turn `accel-dp run` options into a launch command (pure); accel_dp/runner.py runs it.

The command is `python -m accel_dp.runner <accelerate launch arguments>`: accelerate's own launcher, run by the
runner so that the recipe's exit status and error line come through (its docstring says how). The topology decides
the config when none is given: cpu, multi_cpu, single_gpu, multi_gpu or multi_node from accelerate_configs/. The
command-line flags then override the config's process counts and addresses.
"""

from __future__ import annotations

import shlex
import socket
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from .configs import load_config, resolve_config
from .errors import UsageError


@dataclass(frozen=True)
class RunOptions:
    """What the user asked for; None means "not given, decide from the machine"."""

    gpus: int | None = None
    cpu: bool = False
    procs: int | None = None
    nodes: int = 1  # with min_nodes: the most
    min_nodes: int | None = None  # --nodes MIN:MAX: the group re-forms on as few as MIN nodes and takes nodes back
    node_rank: int = 0
    main_ip: str | None = None
    main_port: int | None = None
    config: str | None = None
    mixed_precision: str | None = None
    grad_accum: int | None = None
    max_restarts: int = 0  # torch's elastic agent restarts every process of the run this many times at most
    rdzv_conf: str = ""  # torch's rendezvous settings across nodes under restarts (key=value,...)
    recipe_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class Launch:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # added to the caller's environment
    summary: str = ""  # one line saying what will run, for the user

    @property
    def launcher_args(self) -> list[str]:
        """What accelerate's launcher gets: the command after `python -m accel_dp.runner`."""
        return self.argv[3:]

    def shell_line(self) -> str:
        assignments = [f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items())]
        return " ".join([*assignments, shlex.join(self.argv)])


def build_launch(
    recipe_path: Path,
    options: RunOptions,
    gpus_available: int,
    python: str = sys.executable,
    cpu_cores: int | None = None,
) -> Launch:
    """The exact launch command and environment for a recipe on the requested topology. `cpu_cores`: this machine's
    physical cores, shared out among its CPU processes (None: leave it to accelerate, which warns)."""
    config = resolve_config(options.config) if options.config is not None else None
    loaded = load_config(config) if config is not None else {}
    # A config that says use_cpu (cpu, multi_cpu) runs on CPU: the processes must be told (ACCELERATE_USE_CPU),
    # or on a GPU machine they would take the GPUs, and without a GPU run N unsynchronised copies.
    on_cpu = options.cpu or bool(loaded.get("use_cpu")) or (options.gpus is None and gpus_available == 0)
    if on_cpu and options.gpus is not None:
        raise UsageError(
            "--gpus and --cpu contradict each other: drop one (--cpu --procs N runs N CPU processes)"
            if options.cpu
            else f"{config.name} runs on CPU (use_cpu: true) but --gpus was given: drop one"
        )
    if options.procs is not None and not on_cpu:
        raise UsageError("--procs counts CPU processes: add --cpu, or use --gpus N for GPU processes")
    if options.nodes < 1:
        raise UsageError(f"--nodes must be at least 1, got {options.nodes}")
    if not 0 <= options.node_rank < options.nodes:
        raise UsageError(f"--node-rank must be between 0 and {options.nodes - 1} for --nodes {options.nodes}")
    if options.nodes > 1 and not options.main_ip:
        raise UsageError("--nodes > 1 needs --main-ip, the address of the node with --node-rank 0")
    if options.grad_accum is not None and options.grad_accum < 1:
        raise UsageError(f"--grad-accum must be a positive integer, got {options.grad_accum}")
    check_port(options.main_port)
    if options.grad_accum is not None and any(
        a.startswith("--gradient_accumulation_steps") for a in options.recipe_args
    ):
        raise UsageError("--grad-accum and the recipe's --gradient_accumulation_steps both given: keep one")
    if options.mixed_precision == "fp16" and on_cpu:
        raise UsageError("fp16 does nothing on CPU (accelerate silently ignores it): use --mixed-precision bf16")

    # The user's own config keeps its process counts unless the topology flags say otherwise.
    topology_given = options.gpus is not None or options.procs is not None or options.nodes > 1
    from_config = config_processes_per_node(loaded) if config is not None and not topology_given else None
    if on_cpu:
        per_node = options.procs if options.procs is not None else from_config or 1
        if per_node < 1:
            raise UsageError(f"--procs must be a positive integer, got {per_node}")
        device_words = f"{per_node} CPU process{'es' if per_node > 1 else ''}"
    else:
        per_node = options.gpus if options.gpus is not None else from_config or gpus_available
        asked = f"--gpus {per_node}" if from_config is None else f"{config.name} (num_processes {per_node})"
        if per_node < 1:
            raise UsageError(f"--gpus must be a positive integer, got {per_node}")
        if per_node > gpus_available:
            raise UsageError(
                f"{asked} but this machine has {gpus_available} GPU(s): ask for at most {gpus_available} with --gpus, "
                "or add --dry-run to print the command for another machine"
            )
        device_words = f"{per_node} GPU{'s' if per_node > 1 else ''}"
    total = per_node * options.nodes
    if options.max_restarts < 0:
        raise UsageError(f"--max-restarts must be 0 or more, got {options.max_restarts}")
    elastic = options.min_nodes is not None or (options.max_restarts > 0 and options.nodes > 1)
    if options.min_nodes is not None and not 1 <= options.min_nodes <= options.nodes:
        raise UsageError(f"--nodes MIN:MAX needs 1 <= MIN <= MAX, got {options.min_nodes}:{options.nodes}")
    if options.min_nodes is not None and options.nodes < 2:
        raise UsageError(f"--nodes MIN:MAX needs MAX of 2 or more, got '{options.min_nodes}:{options.nodes}'")
    restarts = options.max_restarts or (DEFAULT_ELASTIC_RESTARTS if elastic else 0)
    if elastic and not has_flag(options.recipe_args, "--output_dir"):
        raise UsageError(
            "a run across nodes under restarts needs the recipe's --output_dir, the same folder on a file system every "
            "node shares: add `-- --output_dir PATH`"
        )
    if options.rdzv_conf and not elastic:
        raise UsageError("--rdzv-conf sets the rendezvous of --nodes MIN:MAX (or --nodes N --max-restarts R): add one")
    if restarts and total < 2:
        raise UsageError(
            "--max-restarts needs torch's elastic agent, which accelerate starts for 2 or more processes (--cpu "
            "--procs 2, --gpus 2, or several nodes); one process can be run again with --resume_from_checkpoint latest"
        )
    if config is not None:
        distributed_type = str(loaded["distributed_type"]).upper()
        if distributed_type == "NO" and topology_given and total > 1:
            raise UsageError(
                f"{config.name} runs a single process but {total} were asked for: use "
                f"{'multi_cpu' if on_cpu else 'multi_gpu'} or another multi-process config"
            )
        if on_cpu and distributed_type in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
            raise UsageError(
                f"{config.name} ({distributed_type}) needs GPUs: on CPU accelerate would silently run plain DDP "
                "instead; use --config multi_cpu"
            )
    elif options.nodes > 1:
        config = resolve_config("multi_node")
    elif on_cpu:
        config = resolve_config("multi_cpu" if total > 1 else "cpu")
    else:
        config = resolve_config("multi_gpu" if total > 1 else "single_gpu")

    argv = [python, "-m", "accel_dp.runner", "--config_file", str(config)]
    machines = f"{options.min_nodes or options.nodes}:{options.nodes}" if elastic else str(options.nodes)
    if options.config is None or topology_given:
        argv += ["--num_processes", str(total), "--num_machines", machines]
    if options.nodes > 1:
        argv += ["--machine_rank", str(options.node_rank), "--main_process_ip", options.main_ip]
    if options.main_port is not None or options.nodes > 1:
        argv += ["--main_process_port", str(options.main_port if options.main_port is not None else 29500)]
    if options.mixed_precision is not None:
        argv += ["--mixed_precision", options.mixed_precision]
    if restarts:
        argv += ["--max_restarts", str(restarts)]
    if elastic:  # the main node hosts the rendezvous; the others only join it (on one machine, the tests', too)
        host = f"is_host={'true' if options.node_rank == 0 else 'false'}"
        argv += ["--rdzv_backend", "c10d", "--rdzv_conf", ",".join(filter(None, [host, options.rdzv_conf]))]
    if on_cpu and cpu_cores is not None:  # accelerate's own rule (cores / local processes), said out loud
        argv += ["--num_cpu_threads_per_process", str(max(1, cpu_cores // per_node))]
    argv.append(str(recipe_path))
    if options.grad_accum is not None:
        argv += ["--gradient_accumulation_steps", str(options.grad_accum)]
    recipe_args = list(options.recipe_args)
    if elastic and not has_flag(recipe_args, "--resume_from_checkpoint"):
        # A group re-formed after a node left or joined starts afresh in torch's count of restarts (only failures
        # count), and a joining node's processes are new: every start continues the folder's newest checkpoint.
        recipe_args += ["--resume_from_checkpoint", "latest"]
    argv += recipe_args

    # accelerate's documented CPU switch: with it, a multi-process launch runs gloo on CPU (without it, a
    # machine with no GPU silently runs N unsynchronised copies).
    env = {"ACCELERATE_USE_CPU": "1"} if on_cpu else {}
    count = f"{options.min_nodes} to {options.nodes}" if options.min_nodes is not None else str(options.nodes)
    where = f" x {count} nodes (this is node {options.node_rank})" if options.nodes > 1 else ""
    summary = f"{recipe_path.stem.replace('_', '-')} on {device_words}{where} with {config.name}"
    summary += f"; up to {restarts} restart(s)" if restarts else ""
    return Launch(argv=argv, env=env, summary=summary)


DEFAULT_ELASTIC_RESTARTS = 3  # --nodes MIN:MAX without --max-restarts: a node lost costs a restart, one joining none


def parse_nodes(text: str, separator: str = ":") -> tuple[int, int | None]:
    """`--nodes N`, or a range MIN<separator>MAX (torchrun's `1:4` for accel-dp run, sbatch's `1-4` for accel-dp
    slurm): (N, None) or (MIN, MAX). Whether the numbers fit the run, build_launch and the sbatch script say."""
    low, found, high = text.partition(separator)
    if not low.isdigit() or (found and not high.isdigit()):
        raise UsageError(f"--nodes must be a number of nodes or a range MIN{separator}MAX, got {text!r}")
    return int(low), int(high) if found else None


def config_processes_per_node(loaded: dict) -> int | None:
    """The processes a config starts on each machine (its num_processes counts all machines), None if it says not."""
    try:
        return max(1, int(loaded["num_processes"]) // max(1, int(loaded.get("num_machines") or 1)))
    except (KeyError, TypeError, ValueError):
        return None


def has_flag(args: tuple[str, ...] | list[str], flag: str) -> bool:
    return any(arg == flag or arg.startswith(flag + "=") for arg in args)


def with_output_dir(recipe_args: tuple[str, ...], output_dir: str) -> tuple[str, ...]:
    """The recipe's arguments with `--output_dir output_dir` unless they name one: a restarted or requeued run must
    find its checkpoints in the folder the first attempt used."""
    return recipe_args if has_flag(recipe_args, "--output_dir") else (*recipe_args, "--output_dir", output_dir)


DEFAULT_MAIN_PORT = 29500  # torchrun's and accelerate's default


def port_is_free(port: int) -> bool:
    """Whether this machine can listen on `port` (what the main node's rendezvous will do)."""
    with socket.socket() as sock:
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True


def any_free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def check_port(port: int | None) -> None:
    if port is not None and not 1 <= port <= 65535:
        raise UsageError(f"--main-port must be a TCP port, 1 to 65535, got {port}")


def settle_main_port(options: RunOptions, is_free=port_is_free, pick=any_free_port) -> RunOptions:
    """The main node needs its rendezvous port free. The default port, if taken (another job), is swapped for a
    free one on a single machine; a port the user chose, or one all nodes must agree on, is an error."""
    check_port(options.main_port)
    if options.node_rank != 0:
        return options  # only the main node listens
    port = options.main_port if options.main_port is not None else DEFAULT_MAIN_PORT
    if is_free(port):
        return options
    if options.main_port is None and options.nodes == 1:
        return replace(options, main_port=pick())
    raise UsageError(
        f"port {port} is already in use on this machine (another training job?): pass --main-port with a free port "
        f"(e.g. --main-port {pick()}) on every node"
    )


def detect_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def detect_cpu_cores() -> int | None:
    """Physical cores, as accelerate counts them when it sets the threads per CPU process; None when the caller's
    OMP_NUM_THREADS decides (accelerate then takes that)."""
    import os

    import psutil

    return None if "OMP_NUM_THREADS" in os.environ else psutil.cpu_count(logical=False)
