"""`accel-dp slurm`: an sbatch script that runs a recipe on N nodes with accel-dp's runner on each (pure).

The launch command is `launch.build_launch`'s, built for node 0 and then given shell variables where each node
differs: its machine rank is `$SLURM_NODEID`, expanded on that node (the command is single-quoted for
`srun bash -c`), and the main node's address and port are `$MAIN_ADDR` and `$MAIN_PORT`, set once in the
batch script. Preemption: the batch shell turns SIGUSR1 (sent `--signal-seconds` before the time limit) and
SIGTERM into a SIGTERM for the job step, waits for the recipe to checkpoint and exit, and on SIGUSR1 requeues
the job, which resumes from the latest checkpoint in the same --output_dir.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError
from .launch import Launch, RunOptions, build_launch, has_flag, with_output_dir

# Launcher flags whose value differs per node or per job: the script gives them as shell variables. The number of
# machines is the allocation's, read when the job runs: a requeued job may get fewer nodes (--nodes MIN-MAX).
PER_NODE_VALUES = {"--machine_rank": '"$SLURM_NODEID"', "--main_process_ip": '"$MAIN_ADDR"',
                   "--main_process_port": '"$MAIN_PORT"', "--num_machines": '"$SLURM_JOB_NUM_NODES"'}  # fmt: skip
PLACEHOLDER_ADDRESS = "MAIN_ADDR"  # build_launch needs some address for --nodes > 1; replaced as above


@dataclass(frozen=True)
class SlurmJob:
    """What sbatch is asked for, and where the run writes."""

    nodes: int = 1
    max_nodes: int | None = None  # --nodes MIN-MAX: Slurm may start (or requeue) the job on fewer than the most
    gpus_per_node: int | None = None  # None with cpu=True
    cpu: bool = False
    procs_per_node: int | None = None  # CPU processes per node, with cpu=True
    job_name: str = "accel-dp"
    output_dir: str | None = None  # the fixed --output_dir that a requeued job resumes in
    main_port: int | None = None  # None: derived from the job id, so that jobs sharing a node do not collide
    signal_seconds: int = 120  # SIGUSR1 this long before the time limit
    time_limit: str | None = None
    partition: str | None = None
    account: str | None = None
    cpus_per_task: int | None = None
    log_file: str = "%x-%j.out"


@dataclass(frozen=True)
class SbatchScript:
    text: str
    node_command: str  # what every node runs (inside `srun bash -c`), with its shell variables unexpanded
    launch: Launch  # build_launch's answer for node 0, before the per-node substitutions


def recipe_arguments(
    recipe_args: tuple[str, ...], output_dir: str | None, can_resume: bool
) -> tuple[tuple[str, ...], bool]:
    """The recipe's arguments with a fixed --output_dir and --resume_from_checkpoint latest added (unless given),
    where the recipe can resume; and whether a requeued job resumes."""
    if not can_resume:
        return recipe_args, False
    if output_dir is None and not has_flag(recipe_args, "--output_dir"):
        raise UsageError("a requeued job needs a fixed --output_dir: pass --output-dir or the recipe's --output_dir")
    args = with_output_dir(recipe_args, output_dir) if output_dir else recipe_args
    if not has_flag(args, "--resume_from_checkpoint"):
        args = (*args, "--resume_from_checkpoint", "latest")
    return args, True


def node_command(launch: Launch, per_node: int) -> str:
    """The launch as one shell line in which the per-node flags take their values from shell variables, and the
    number of processes is the allocation's nodes x per_node."""
    values = {**PER_NODE_VALUES, "--num_processes": f'"$((SLURM_JOB_NUM_NODES * {per_node}))"'}
    words, argv = [], launch.argv
    for index, arg in enumerate(argv):
        previous = argv[index - 1] if index else ""
        words.append(values[previous] if previous in values else shlex.quote(arg))
    return "exec " + " ".join(words)


def build_sbatch_script(
    recipe_path: Path,
    recipe_name: str,
    job: SlurmJob,
    run: RunOptions | None = None,
    can_resume: bool = True,
    python: str = sys.executable,
    generated_by: str = "accel-dp slurm",
) -> SbatchScript:
    """The sbatch script for `recipe_path` on job.nodes nodes; `run` carries config, mixed precision, gradient
    accumulation and the recipe's arguments (its topology fields are ignored: the job decides them)."""
    if job.nodes < 1:
        raise UsageError(f"--nodes must be at least 1, got {job.nodes}")
    if job.max_nodes is not None and job.max_nodes < job.nodes:
        raise UsageError(f"--nodes must be a number of nodes or a range MIN-MAX, got '{job.nodes}-{job.max_nodes}'")
    if job.cpu and job.gpus_per_node is not None:
        raise UsageError("--gpus and --cpu contradict each other: drop one")
    if not job.cpu and job.gpus_per_node is None:
        raise UsageError("say how many GPUs each node has with --gpus G (or --cpu for CPU nodes)")
    if job.procs_per_node is not None and not job.cpu:
        raise UsageError("--procs counts CPU processes: add --cpu, or use --gpus")
    if job.signal_seconds < 1:
        raise UsageError(f"--signal-seconds must be at least 1, got {job.signal_seconds}")
    run = run or RunOptions()
    pinned = run.grad_accum is not None or has_flag(run.recipe_args, "--gradient_accumulation_steps")
    if job.max_nodes is not None and pinned:
        raise UsageError(
            "with a range of nodes, give the recipe --global_batch_size rather than --grad-accum: on fewer nodes the "
            "accumulation steps must grow to keep the global batch"
        )
    if run.max_restarts and (job.max_nodes or job.nodes) > 1:
        raise UsageError(
            "--max-restarts in a Slurm job runs on one node: across nodes the job is requeued from its latest "
            "checkpoint instead (on as many nodes as Slurm gives it, with --nodes MIN-MAX); drop --max-restarts"
        )
    args, resumes = recipe_arguments(run.recipe_args, job.output_dir, can_resume)
    options = RunOptions(
        gpus=job.gpus_per_node,
        cpu=job.cpu,
        procs=job.procs_per_node if job.cpu else None,
        nodes=job.max_nodes or job.nodes,  # the script fills in the allocation's count
        node_rank=0,
        main_ip=PLACEHOLDER_ADDRESS,
        main_port=job.main_port or 29500,  # the value is replaced by $MAIN_PORT; this only makes the flag appear
        config=run.config,
        mixed_precision=run.mixed_precision,
        grad_accum=run.grad_accum,
        max_restarts=run.max_restarts,
        recipe_args=args,
    )
    launch = build_launch(recipe_path, options, gpus_available=job.gpus_per_node or 0, python=python)
    per_node = (job.procs_per_node or 1) if job.cpu else job.gpus_per_node
    command = node_command(launch, per_node)
    nodes = f"{job.nodes}-{job.max_nodes}" if job.max_nodes else str(job.nodes)
    total = "" if job.max_nodes else f" = {per_node * job.nodes} processes"
    devices = f"{per_node} CPU process(es)" if job.cpu else f"{per_node} GPU(s)"
    port = str(job.main_port) if job.main_port else "$((20000 + SLURM_JOB_ID % 20000))"

    # (option, comment): sbatch reads no comment on a #SBATCH line, so each comment goes on the line above.
    sbatch: list[tuple[str, str]] = [
        (f"--job-name={job.job_name}", ""),
        (f"--nodes={nodes}", "a range: Slurm may start or requeue the job on fewer nodes" if job.max_nodes else ""),
        ("--ntasks-per-node=1", "one accelerate launcher per node; it starts that node's processes"),
    ]
    if not job.cpu:
        sbatch.append((f"--gpus-per-node={job.gpus_per_node}", ""))
    if job.cpus_per_task:
        sbatch.append((f"--cpus-per-task={job.cpus_per_task}", ""))
    sbatch += [(f"--time={job.time_limit}", "")] if job.time_limit else []
    sbatch += [(f"--partition={job.partition}", "")] if job.partition else []
    sbatch += [(f"--account={job.account}", "")] if job.account else []
    sbatch += [
        (f"--output={job.log_file}", ""),
        ("--open-mode=append", "a requeued job appends to the same log"),
        (f"--signal=B:USR1@{job.signal_seconds}",
         f"SIGUSR1 to this batch script (B:) {job.signal_seconds} s before the time limit"),
    ]  # fmt: skip
    if resumes:
        sbatch.append(("--requeue", "the job may be requeued, by the trap below or by preemption"))
    sbatch_lines = [
        line for option, comment in sbatch for line in ([f"# {comment}"] if comment else []) + [f"#SBATCH {option}"]
    ]

    if resumes:
        resume_note = [
            "# Preemption and time limits: on SIGUSR1 (the time limit is near) or SIGTERM (preemption, scancel), the",
            "# trap below sends SIGTERM to the job step; the recipe saves a checkpoint and exits. After SIGUSR1 the",
            "# job requeues itself: it runs this script again, with the same fixed --output_dir and",
            "# --resume_from_checkpoint latest, so it continues from that checkpoint (the first run, with no",
            "# checkpoint yet, starts fresh). Add --checkpointing_steps N to also save every N steps: a failed node",
            "# sends no signal.",
        ]
    else:
        resume_note = [
            f"# {recipe_name} cannot resume from a checkpoint: on SIGUSR1 or SIGTERM the trap below stops the job",
            "# step cleanly, and the job is not requeued (a new job would start from scratch).",
        ]
    environment = [f"export {k}={shlex.quote(v)}" for k, v in sorted(launch.env.items())]
    requeue = (
        [
            'if [ "$SIGNALLED" = USR1 ] && [ "$status" -ne 0 ]; then',
            '    echo "accel-dp: requeueing job $SLURM_JOB_ID; it resumes from the latest checkpoint" >&2',
            '    scontrol requeue "$SLURM_JOB_ID"',
            "fi",
        ]
        if resumes
        else []
    )
    lines = [
        "#!/bin/bash",
        f"# {recipe_name} on {nodes} node(s) x {devices}{total}, data parallel.",
        f"# Generated by {generated_by}.",
        "# Submit with: sbatch THIS_FILE. Every node must see the same Python and files:",
        f"#   {python}",
        f"#   {recipe_path}",
        *sbatch_lines,
        "",
        *resume_note,
        "",
        "set -uo pipefail  # not -e: a trapped signal makes `wait` return non-zero, and the loop below handles it",
        "",
        "# The main node (machine rank 0) is the first of the allocation. MAIN_ADDR or MAIN_PORT set in the",
        "# environment win (e.g. to test this script off the cluster).",
        'export MAIN_ADDR="${MAIN_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"',
        f'export MAIN_PORT="${{MAIN_PORT:-{port}}}"',
        *environment,
        f'echo "accel-dp: {recipe_name} on $SLURM_JOB_NUM_NODES node(s), main node $MAIN_ADDR:$MAIN_PORT" >&2',
        "",
        "SRUN_PID=''",
        "SIGNALLED=''",
        "forward_signal() {",
        "    SIGNALLED=$1",
        '    echo "accel-dp: got SIG$1, asking the job step to checkpoint and stop (SIGTERM)" >&2',
        '    [ -n "$SRUN_PID" ] && kill -TERM "$SRUN_PID" 2>/dev/null',
        "}",
        "trap 'forward_signal USR1' USR1",
        "trap 'forward_signal TERM' TERM",
        "",
        "# One task per node. The command is in single quotes: $SLURM_NODEID (0 to nodes-1, the machine rank) is",
        "# expanded by each node's own shell, not here.",
        f"srun --kill-on-bad-exit=1 bash -c {shlex.quote(command)} &",
        "SRUN_PID=$!",
        "",
        "# A trapped signal ends `wait` early (status > 128) while srun still runs: wait again until it has ended,",
        "# then take its own exit status (bash keeps it; 127 means it was already taken).",
        'wait "$SRUN_PID"',
        "status=$?",
        'while kill -0 "$SRUN_PID" 2>/dev/null; do',
        '    wait "$SRUN_PID"',
        "    status=$?",
        "done",
        'if [ "$status" -gt 128 ]; then',
        '    wait "$SRUN_PID"',
        "    own=$?",
        '    [ "$own" -ne 127 ] && status=$own',
        "fi",
        *requeue,
        'exit "$status"',
    ]
    return SbatchScript(text="\n".join(lines) + "\n", node_command=command, launch=launch)
