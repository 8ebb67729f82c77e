"""`accel-dp slurm`: the sbatch script asks for the right job, starts accelerate launch on every node with its own
rank, forwards preemption signals, and really trains on two "nodes" (loopback, CPU) under stand-in Slurm tools."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import CONFIGS_DIR, RECIPES_DIR, free_port, gpt_args, subprocess_env
from typer.testing import CliRunner

from accel_dp.cli import app
from accel_dp.errors import UsageError
from accel_dp.launch import RunOptions, build_launch
from accel_dp.slurm import SlurmJob, build_sbatch_script

RECIPE = RECIPES_DIR / "gpt_pretrain.py"
runner = CliRunner()

# Stand-ins for Slurm's tools, enough to run a generated script on one machine.
FAKE_SRUN = r"""#!/bin/bash
# srun: run the step's command once per node of the job, each with that node's SLURM_NODEID; forward SIGTERM.
echo "srun $*" >> "$FAKE_SLURM_LOG"
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_JOB_NUM_NODES; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 "$@" &
    pids+=($!)
done
trap 'echo "srun got TERM" >> "$FAKE_SLURM_LOG"; kill -TERM "${pids[@]}" 2>/dev/null' TERM
status=0
for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null; do wait "$pid"; done
    wait "$pid"; code=$?
    (( code > status )) && status=$code
done
exit $status
"""
FAKE_SCONTROL = r"""#!/bin/bash
# scontrol: every node of the job is this machine; requeue requests are written down.
echo "scontrol $*" >> "$FAKE_SLURM_LOG"
if [ "$1 $2" = "show hostnames" ]; then printf '127.0.0.1\n127.0.0.1\n'; fi
"""
# A stand-in recipe that waits to be told to stop, and "checkpoints" (writes a file) when it gets SIGTERM.
PREEMPTIBLE_RECIPE = r"""import os, signal, sys, time
out = sys.argv[sys.argv.index("--output_dir") + 1]
rank = os.environ["RANK"]
def stop(signum, frame):
    open(os.path.join(out, f"rank{rank}.checkpointed"), "w").write(signal.Signals(signum).name)
    sys.exit(75)
signal.signal(signal.SIGTERM, stop)
open(os.path.join(out, f"rank{rank}.started"), "w").write(os.environ["WORLD_SIZE"])
time.sleep(120)
"""


def gpu_script(**job_fields):
    job = SlurmJob(**{"nodes": 2, "gpus_per_node": 8, "job_name": "gpt", "output_dir": "/scratch/gpt", **job_fields})
    return build_sbatch_script(RECIPE, "gpt-pretrain", job, RunOptions(recipe_args=("--model_size", "gpt2")),
                               python="python")  # fmt: skip


def test_script_asks_sbatch_for_one_launcher_per_node_and_a_warning_signal():
    script = gpu_script(time_limit="04:00:00", partition="gpu", signal_seconds=300).text
    lines = script.splitlines()
    directives = [line for line in lines if line.startswith("#SBATCH")]
    assert directives == [
        "#SBATCH --job-name=gpt",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --time=04:00:00",
        "#SBATCH --partition=gpu",
        "#SBATCH --output=%x-%j.out",
        "#SBATCH --open-mode=append",
        "#SBATCH --signal=B:USR1@300",
        "#SBATCH --requeue",
    ]
    # sbatch stops reading directives at the first command: all of them come before it.
    first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert max(lines.index(d) for d in directives) < first_command
    assert lines[0] == "#!/bin/bash"
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # valid bash


def test_every_node_runs_build_launchs_command_with_its_own_rank_from_slurm():
    script = gpu_script()
    expected = build_launch(RECIPE, RunOptions(gpus=8, nodes=2, main_ip="MAIN_ADDR", main_port=29500,
                                               recipe_args=("--model_size", "gpt2", "--output_dir", "/scratch/gpt",
                                                            "--resume_from_checkpoint", "latest")),
                            gpus_available=8, python="python").argv  # fmt: skip
    assert expected[expected.index("--num_processes") + 1] == "16" and "--num_machines" in expected
    # Each node's own rank, the main node's address and port, and the allocation's size, read when the job runs.
    for flag, variable in (("--machine_rank", "$SLURM_NODEID"), ("--main_process_ip", "$MAIN_ADDR"),
                           ("--main_process_port", "$MAIN_PORT"), ("--num_machines", "$SLURM_JOB_NUM_NODES"),
                           ("--num_processes", "$((SLURM_JOB_NUM_NODES * 8))")):  # fmt: skip
        expected[expected.index(flag) + 1] = variable
    assert shlex.split(script.node_command) == ["exec", *expected]
    assert expected[expected.index("--config_file") + 1] == str(CONFIGS_DIR / "multi_node.yaml")
    # Single quotes: the batch shell passes $SLURM_NODEID on unexpanded, and each node's shell expands it.
    assert f"srun --kill-on-bad-exit=1 bash -c {shlex.quote(script.node_command)} &" in script.text
    assert shlex.quote(script.node_command).startswith("'exec ")
    assert (
        'export MAIN_ADDR="${MAIN_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"' in script.text
    )
    assert 'export MAIN_PORT="${MAIN_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"' in script.text
    assert 'export MAIN_PORT="${MAIN_PORT:-29400}"' in gpu_script(main_port=29400).text


def test_signals_are_forwarded_to_the_job_step_as_sigterm():
    text = gpu_script().text
    assert "trap 'forward_signal USR1' USR1" in text and "trap 'forward_signal TERM' TERM" in text
    assert 'kill -TERM "$SRUN_PID"' in text
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text


def test_recipe_gets_a_fixed_output_dir_and_resumes_from_latest_unless_given():
    def recipe_args(script):
        argv = shlex.split(script.node_command)
        return argv[argv.index(str(RECIPE)) + 1 :]

    assert recipe_args(gpu_script()) == [
        "--model_size", "gpt2", "--output_dir", "/scratch/gpt", "--resume_from_checkpoint", "latest",
    ]  # fmt: skip
    own_args = RunOptions(recipe_args=("--output_dir=/mine", "--resume_from_checkpoint", "/ckpt"))
    own = build_sbatch_script(
        RECIPE, "gpt-pretrain", SlurmJob(nodes=2, gpus_per_node=8, output_dir="/unused"), own_args
    )
    assert recipe_args(own) == ["--output_dir=/mine", "--resume_from_checkpoint", "/ckpt"]
    # A recipe that cannot resume is not requeued: a new job would start from scratch.
    plain = build_sbatch_script(RECIPE, "some-recipe", SlurmJob(nodes=2, gpus_per_node=8), can_resume=False)
    assert recipe_args(plain) == []
    assert "#SBATCH --requeue" not in plain.text and "scontrol requeue" not in plain.text
    assert "some-recipe cannot resume from a checkpoint" in plain.text


def test_a_one_node_job_hands_its_restart_budget_to_torchs_agent_and_a_multi_node_one_is_refused():
    job = SlurmJob(nodes=1, gpus_per_node=8, output_dir="/runs/x")
    script = build_sbatch_script(RECIPE, "gpt-pretrain", job, RunOptions(max_restarts=3))
    assert "--max_restarts 3" in script.node_command
    with pytest.raises(UsageError, match="--max-restarts in a Slurm job runs on one node: across nodes the job is"):
        build_sbatch_script(RECIPE, "gpt-pretrain", SlurmJob(nodes=2, gpus_per_node=8, output_dir="/o"),
                            RunOptions(max_restarts=3))  # fmt: skip


def test_cpu_nodes_export_accelerates_cpu_switch():
    script = build_sbatch_script(RECIPE, "gpt-pretrain", SlurmJob(nodes=3, cpu=True, procs_per_node=2, output_dir="o"))
    assert "export ACCELERATE_USE_CPU=1" in script.text
    assert "--gpus-per-node" not in script.text
    assert '--num_processes "$((SLURM_JOB_NUM_NODES * 2))" --num_machines "$SLURM_JOB_NUM_NODES"' in script.node_command


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["slurm", "gpt-pretrain", "--nodes", "2"], "say how many GPUs each node has with --gpus G"),
        (["slurm", "gpt-pretrain", "--gpus", "2", "--cpu"], "contradict each other"),
        (["slurm", "gpt-pretrain", "--nodes", "0", "--gpus-per-node", "8"], "--nodes must be at least 1"),
        (["slurm", "gpt-pretrain", "--nodes", "4-2", "--gpus", "8"], "a range MIN-MAX, got '4-2'"),
        (["slurm", "gpt-pretrain", "--nodes", "2-4", "--gpus", "8", "--grad-accum", "2"], "--global_batch_size rather"),
        (["slurm", "nope", "--gpus-per-node", "8"], "unknown recipe 'nope'"),
        (["slurm", "gpt-pretrain", "--cpu", "--mixed-precision", "fp16"], "use --mixed-precision bf16"),
        (["slurm", "gpt-pretrain", "--gpus-per-node", "8", "--mixed-precision", "fp32"], "is not one of no, bf16"),
        (
            [
                "slurm",
                "gpt-pretrain",
                "--gpus-per-node",
                "8",
                "--grad-accum",
                "2",
                "--",
                "--gradient_accumulation_steps",
                "4",
            ],
            "both given: keep one",
        ),  # fmt: skip
    ],
)
def test_bad_slurm_requests_are_one_line_errors_with_exit_code_2(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert text.startswith("error: ") and message in text and "Traceback" not in result.output


def test_cli_prints_the_script_with_a_default_absolute_output_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["slurm", "gpt-pretrain", "--nodes", "2", "--gpus-per-node", "4", "--time", "1:00:00",
                                 "--", "--model_size", "gpt2"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("#!/bin/bash\n")
    assert "#SBATCH --time=1:00:00" in result.stdout and "#SBATCH --gpus-per-node=4" in result.stdout
    assert f"--model_size gpt2 --output_dir {tmp_path}/runs/gpt-pretrain-" in result.stdout


def test_slurm_takes_accel_dp_runs_words_for_gpus_and_processes_per_node(tmp_path, monkeypatch):
    """One vocabulary across commands: --gpus and --procs, as in `accel-dp run`; the older names still work."""
    monkeypatch.chdir(tmp_path)
    common = ["slurm", "gpt-pretrain", "--nodes", "2", "--output-dir", "/scratch/run"]
    scripts = [
        runner.invoke(app, [*common, *topology]).stdout for topology in (["--gpus", "4"], ["--gpus-per-node", "4"])
    ]
    assert scripts[0] == scripts[1] and "#SBATCH --gpus-per-node=4" in scripts[0]
    scripts = [runner.invoke(app, [*common, "--cpu", flag, "2"]).stdout for flag in ("--procs", "--procs-per-node")]
    assert scripts[0] == scripts[1] and "= 4 processes" in scripts[0]


# ------------------------------------------------------------------------------------- running the script
def fake_slurm_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a batch script on node 0 of a 2-node job, with stand-in srun and scontrol first on PATH."""
    bin_dir = tmp_path / "fake_slurm_bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return subprocess_env(
        **{
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "FAKE_SLURM_LOG": str(tmp_path / "slurm.log"),
            "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NODELIST": "node[1-2]",
            "SLURM_JOB_NUM_NODES": "2",
            "SLURM_NODEID": "0",  # the batch shell runs on node 0: a rank expanded here would be 0 on both nodes
            "OMP_NUM_THREADS": "1",
            **extra,
        }
    )


def start_batch_script(script: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip  # its own process group: killpg reaches all


def finish(job: subprocess.Popen, deadline: float) -> str:
    """The job's output once it has ended; past the deadline, it and everything it started are killed."""
    try:
        return job.communicate(timeout=max(1.0, deadline - time.monotonic()))[0]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)


@pytest.mark.slow
def test_generated_script_trains_gpt_on_two_nodes_over_loopback(tmp_path, token_cache):
    out = tmp_path / "run"
    recipe_args = gpt_args(out, token_cache, "--max_train_steps", "4", "--eval_every", "4", "--log_every", "2",
                           "--sample_tokens", "0")  # fmt: skip
    generated = runner.invoke(app, ["slurm", "gpt-pretrain", "--nodes", "2", "--cpu", "--main-port", str(free_port()),
                                    "--", *recipe_args])  # fmt: skip
    assert generated.exit_code == 0, generated.output
    (tmp_path / "job.sh").write_text(generated.stdout)

    job = start_batch_script(tmp_path / "job.sh", fake_slurm_env(tmp_path))
    output = finish(job, deadline=time.monotonic() + 180)  # a rank that never meets its peer fails, never hangs

    assert job.returncode == 0, output[-4000:]
    results = json.loads((out / "all_results.json").read_text())
    assert results["world_size"] == 2 and results["optimizer_steps"] == 4
    assert "main node 127.0.0.1:" in output
    assert "scontrol requeue" not in (tmp_path / "slurm.log").read_text()


@pytest.mark.slow
def test_a_job_requeued_on_fewer_nodes_resumes_with_the_same_global_batch(tmp_path, token_cache):
    """--nodes 1-2: the script counts its nodes when it runs. Started on 2 nodes, requeued on 1, the job resumes the
    2-node checkpoint on one process, with twice the accumulation steps, and ends where 2 nodes end."""
    out = tmp_path / "run"
    recipe_args = gpt_args(out, token_cache, "--max_train_steps", "6", "--eval_every", "6", "--log_every", "2",
                           "--checkpointing_steps", "2", "--sample_tokens", "0", "--dropout", "0")  # fmt: skip
    generated = runner.invoke(app, ["slurm", "gpt-pretrain", "--nodes", "1-2", "--cpu", "--main-port",
                                    str(free_port()), "--", *recipe_args])  # fmt: skip
    assert generated.exit_code == 0, generated.output
    assert "#SBATCH --nodes=1-2" in generated.stdout
    (tmp_path / "job.sh").write_text(generated.stdout)
    on_two = finish(start_batch_script(tmp_path / "job.sh", fake_slurm_env(tmp_path)), time.monotonic() + 180)
    whole = json.loads((out / "all_results.json").read_text())
    assert whole["world_size"] == 2, on_two[-3000:]
    (out / "all_results.json").unlink()  # as if the time limit had stopped it after its checkpoint at step 4

    (tmp_path / "requeued").mkdir()
    env = fake_slurm_env(tmp_path / "requeued", SLURM_JOB_NUM_NODES="1", SLURM_RESTART_COUNT="1")
    on_one = finish(start_batch_script(tmp_path / "job.sh", env), time.monotonic() + 180)
    resumed = json.loads((out / "all_results.json").read_text())
    assert resumed["world_size"] == 1 and resumed["gradient_accumulation_steps"] == 2, on_one[-3000:]
    assert resumed["global_batch_size"] == whole["global_batch_size"] and resumed["optimizer_steps"] == 6
    assert resumed["eval_loss"] == pytest.approx(whole["eval_loss"], rel=1e-5)
    assert "resuming on 4 per device x 1 process(es) x 2 accumulation" in " ".join(on_one.split())


@pytest.mark.faults  # signals: with the fault matrix (`make test-faults`, .ci/run's second step)
@pytest.mark.parametrize(
    ("sent", "requeued"), [(signal.SIGUSR1, True), (signal.SIGTERM, False)], ids=["USR1-requeues", "TERM-stops"]
)
def test_a_signal_to_the_batch_script_reaches_every_process_as_sigterm(tmp_path, sent, requeued):
    """USR1 (time limit near) or TERM (preemption) -> srun -> accelerate launch -> torchrun -> each rank gets SIGTERM
    and has time to checkpoint; after USR1 the job asks to be requeued."""
    recipe = tmp_path / "preemptible.py"
    recipe.write_text(PREEMPTIBLE_RECIPE)
    out = tmp_path / "run"
    out.mkdir()
    job_spec = SlurmJob(nodes=2, cpu=True, output_dir=str(out), main_port=free_port())
    (tmp_path / "job.sh").write_text(build_sbatch_script(recipe, "preemptible", job_spec).text)

    job = start_batch_script(tmp_path / "job.sh", fake_slurm_env(tmp_path))
    deadline = time.monotonic() + 120
    try:
        while not all((out / f"rank{r}.started").exists() for r in (0, 1)) and job.poll() is None:
            assert time.monotonic() < deadline, "the two ranks did not start"
            time.sleep(0.2)
        assert [(out / f"rank{r}.started").read_text() for r in (0, 1)] == ["2", "2"]  # one world of 2
        os.kill(job.pid, sent)
    finally:
        output = finish(job, deadline)

    assert [(out / f"rank{r}.checkpointed").read_text() for r in (0, 1)] == ["SIGTERM", "SIGTERM"], output[-3000:]
    assert job.returncode != 0, output[-3000:]
    log = (tmp_path / "slurm.log").read_text()
    assert "srun got TERM" in log
    assert ("scontrol requeue 4242" in log) == requeued
