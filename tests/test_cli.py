"""The `accel-dp` commands as a user types them: listing, copying, dry runs and one-line errors."""

from __future__ import annotations

import ast
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import RECIPES_DIR, REPO_ROOT, free_port, kill_process_tree, subprocess_env
from typer.testing import CliRunner

from accel_dp import launch as launch_module
from accel_dp.cli import app

runner = CliRunner()


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(launch_module, "detect_gpus", lambda: 0)
    monkeypatch.setattr("accel_dp.cli.detect_gpus", lambda: 0)


def test_list_shows_every_recipe_with_its_docstring_line():
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0
    listed = " ".join(result.output.split())  # the table may wrap a description over several lines
    for path in RECIPES_DIR.glob("*.py"):
        first_line = ast.get_docstring(ast.parse(path.read_text())).splitlines()[0]
        assert f"{path.stem.replace('_', '-')} {first_line}" in listed


def test_configs_lists_every_bundled_config():
    result = runner.invoke(app, ["configs"])
    assert result.exit_code == 0
    for name in (
        "cpu",
        "multi_cpu",
        "single_gpu",
        "multi_gpu",
        "multi_node",
        "fsdp",
        "deepspeed_zero2",
        "deepspeed_zero3",
    ):
        assert name in result.output


def test_copy_writes_the_recipe_and_never_overwrites(tmp_path: Path):
    result = runner.invoke(app, ["copy", "gpt-pretrain", str(tmp_path)])
    assert result.exit_code == 0
    copied = tmp_path / "gpt_pretrain.py"
    assert copied.read_text() == (RECIPES_DIR / "gpt_pretrain.py").read_text()
    copied.write_text("# my edits\n")
    again = runner.invoke(app, ["copy", "gpt-pretrain", str(tmp_path)])
    assert again.exit_code == 2
    assert "already exists" in again.output
    assert copied.read_text() == "# my edits\n"


def test_copy_into_a_missing_folder_is_refused_and_writes_nothing(tmp_path: Path):
    result = runner.invoke(app, ["copy", "gpt-pretrain", str(tmp_path / "my_project") + "/"])
    assert result.exit_code == 2
    assert "does not exist" in result.output
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "my_project").mkdir()
    assert runner.invoke(app, ["copy", "glue-bert", str(tmp_path / "my_project" / "train.py")]).exit_code == 0
    assert (tmp_path / "my_project" / "train.py").read_text() == (RECIPES_DIR / "glue_bert.py").read_text()


def test_dry_run_prints_the_command_and_passes_recipe_args_after_double_dash(no_gpu):
    result = runner.invoke(
        app, ["run", "gpt-pretrain", "--cpu", "--procs", "2", "--dry-run", "--", "--max_train_steps", "7"]
    )
    assert result.exit_code == 0, result.output
    line = " ".join(result.output.split())
    assert line.startswith("ACCELERATE_USE_CPU=1 ")
    assert "--num_processes 2" in line
    assert line.endswith("gpt_pretrain.py --max_train_steps 7")


def test_dry_run_may_ask_for_more_gpus_than_this_machine_has(no_gpu):
    result = runner.invoke(app, ["run", "gpt-pretrain", "--gpus", "8", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "multi_gpu.yaml --num_processes 8" in " ".join(result.output.split())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "nope"], "unknown recipe 'nope': choose one of"),
        (["run", "gpt-pretrain", "--gpus", "2"], "this machine has 0 GPU(s)"),
        (["run", "gpt-pretrain", "--config", "missing"], "config 'missing' not found"),
        (["run", "gpt-pretrain", "--mixed-precision", "fp16"], "use --mixed-precision bf16"),
        (["run", "gpt-pretrain", "--mixed-precision", "fp32"], "is not one of no, bf16, fp16, fp8"),
        (["copy", "nope", "."], "unknown recipe 'nope'"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(no_gpu, args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert text.startswith("error: ") and message in text
    assert "Traceback" not in result.output


def test_run_passes_the_recipe_exit_code_through(monkeypatch, no_gpu):
    seen = {}

    def fake_run(launch):
        seen["argv"] = launch.argv
        return 7

    monkeypatch.setattr("accel_dp.cli.run_launch", fake_run)
    result = runner.invoke(app, ["run", "gpt-pretrain", "--", "--max_train_steps", "1"])
    assert result.exit_code == 7
    assert seen["argv"][-2:] == ["--max_train_steps", "1"]
    assert "running gpt-pretrain on 1 CPU process" in " ".join(result.output.split())


def test_run_launch_returns_the_child_exit_code():
    from accel_dp.launch import Launch, run_launch

    assert run_launch(Launch(argv=[sys.executable, "-c", "import sys; sys.exit(3)"])) == 3


RANK_THAT_CHECKPOINTS_ON_SIGTERM = """
import os, pathlib, signal, sys, time
out, rank = pathlib.Path(sys.argv[1]), os.environ["RANK"]
signal.signal(signal.SIGTERM, lambda signum, frame: (time.sleep(2), (out / f"saved-{rank}").write_text(
    os.environ["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]), sys.exit(75)))  # a 2 s checkpoint, then the preempted code
(out / f"ready-{rank}").touch()
time.sleep(120)
"""


@pytest.mark.slow
@pytest.mark.parametrize("caller_grace", [None, "0"])
def test_accel_dp_run_gives_the_ranks_time_to_checkpoint_after_sigterm(tmp_path, monkeypatch, caller_grace):
    """Through the real chain (accel-dp's run_launch, accelerate launch, torchrun, 2 ranks): after a forwarded
    SIGTERM the ranks get SHUTDOWN_GRACE_S to write their checkpoint rather than torchrun's 30 s; a grace the
    caller sets wins (0: torchrun kills the ranks at once, so nothing is saved)."""
    from accel_dp.launch import PREEMPTED_EXIT_CODE, SHUTDOWN_GRACE_S

    script = tmp_path / "rank.py"
    script.write_text(RANK_THAT_CHECKPOINTS_ON_SIGTERM)
    driver = (
        "import sys; from pathlib import Path; from accel_dp.launch import RunOptions, build_launch, run_launch; "
        "options = RunOptions(cpu=True, procs=2, main_port=int(sys.argv[3]), recipe_args=(sys.argv[2],)); "
        "sys.exit(run_launch(build_launch(Path(sys.argv[1]), options, 0)))"
    )
    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    env = subprocess_env(**({"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": caller_grace} if caller_grace else {}))
    command = [sys.executable, "-c", driver, str(script), str(tmp_path), str(free_port())]
    process = subprocess.Popen(command, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"ready-{rank}").exists() for rank in (0, 1)):
            assert process.poll() is None and time.monotonic() < deadline, "the ranks never started"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
    finally:
        kill_process_tree(process.pid)
    saved = sorted(p.name for p in tmp_path.glob("saved-*"))
    if caller_grace is None:
        assert code == PREEMPTED_EXIT_CODE and saved == ["saved-0", "saved-1"]
        assert (tmp_path / "saved-0").read_text() == str(SHUTDOWN_GRACE_S) and SHUTDOWN_GRACE_S > 30
    else:
        assert saved == []  # killed mid-"checkpoint": the caller's grace is the one torchrun used


def test_console_script_works_from_another_folder(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "-m", "accel_dp.cli", "run", "gpt-pretrain", "--cpu", "--dry-run"],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert str(REPO_ROOT / "recipes" / "gpt_pretrain.py") in " ".join(result.stdout.split())
