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
    for path in (RECIPES_DIR / "gpt_pretrain.py", RECIPES_DIR / "glue_bert.py"):
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


def test_copy_writes_the_recipe_with_its_modules_and_never_overwrites(tmp_path: Path):
    result = runner.invoke(app, ["copy", "gpt-pretrain", str(tmp_path)])
    assert result.exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt_pretrain.py", "run_kit.py", "token_cache.py"]
    for name in ("gpt_pretrain.py", "run_kit.py", "token_cache.py"):
        assert (tmp_path / name).read_text() == (RECIPES_DIR / name).read_text()
        assert name in result.output
    (tmp_path / "run_kit.py").write_text("# my edits\n")
    again = runner.invoke(app, ["copy", "gpt-pretrain", str(tmp_path)])
    assert again.exit_code == 2
    assert "already exist" in again.output and "--force" in again.output
    assert (tmp_path / "run_kit.py").read_text() == "# my edits\n"
    assert runner.invoke(app, ["copy", "gpt-pretrain", str(tmp_path), "--force"]).exit_code == 0
    assert (tmp_path / "run_kit.py").read_text() == (RECIPES_DIR / "run_kit.py").read_text()


def test_copy_as_the_readme_shows_makes_the_folder_and_names_the_recipe_file(tmp_path: Path):
    """`accel-dp copy glue-bert ./my_project/train.py` on a fresh folder: the recipe as train.py, its modules beside."""
    result = runner.invoke(app, ["copy", "glue-bert", str(tmp_path / "my_project" / "train.py")])
    assert result.exit_code == 0, result.output
    project = tmp_path / "my_project"
    assert (project / "train.py").read_text() == (RECIPES_DIR / "glue_bert.py").read_text()
    assert (project / "run_kit.py").is_file() and (project / "glue_data.py").is_file()
    (tmp_path / "a_file").write_text("")
    refused = runner.invoke(app, ["copy", "glue-bert", str(tmp_path / "a_file" / "train.py")])
    assert refused.exit_code == 2 and "is a file" in refused.output


def test_the_registry_offers_recipes_never_their_modules():
    from accel_dp.cli import complete_recipe
    from accel_dp.recipes import get_recipe, list_recipes

    assert [r.name for r in list_recipes()] == ["glue-bert", "gpt-pretrain"]
    assert complete_recipe("") == ["glue-bert", "gpt-pretrain"]  # shell completion
    listed = runner.invoke(app, ["list"]).output
    for module in ("run-kit", "token-cache", "glue-data"):
        assert module not in listed
        refused = runner.invoke(app, ["run", module, "--dry-run"])
        assert refused.exit_code == 2 and "unknown recipe" in refused.output
    assert [m.name for m in get_recipe("gpt-pretrain").modules()] == ["run_kit.py", "token_cache.py"]


def test_flags_are_asked_of_the_recipes_own_parser_including_the_kits():
    from accel_dp.recipes import get_recipe

    gpt, glue = get_recipe("gpt-pretrain"), get_recipe("glue-bert")
    assert gpt.accepts_flag("--prepare_only") and not glue.accepts_flag("--prepare_only")
    # Defined by the run kit's add_run_arguments, not in the recipes' own text.
    assert "--resume_from_checkpoint" not in gpt.path.read_text()
    assert gpt.accepts_flag("--resume_from_checkpoint") and glue.accepts_flag("--checkpointing_steps")
    assert not gpt.accepts_flag("--no_such_flag")


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

    def fake_run(launch_args, env):
        seen["args"], seen["env"] = launch_args, env
        return 7

    monkeypatch.setattr("accel_dp.runner.run", fake_run)
    result = runner.invoke(app, ["run", "gpt-pretrain", "--", "--max_train_steps", "1"])
    assert result.exit_code == 7
    assert seen["args"][-2:] == ["--max_train_steps", "1"] and seen["env"] == {"ACCELERATE_USE_CPU": "1"}
    assert "running gpt-pretrain on 1 CPU process" in " ".join(result.output.split())


RANK_THAT_CHECKPOINTS_ON_SIGTERM = """
import os, pathlib, signal, sys, time
out, rank = pathlib.Path(sys.argv[1]), os.environ["RANK"]
seconds = 3 if rank == "1" else 0  # rank 1's checkpoint takes 3 s, rank 0's none
signal.signal(signal.SIGTERM, lambda signum, frame: (time.sleep(seconds), (out / f"saved-{rank}").touch(),
    sys.exit(75)))  # a checkpoint, then the preempted code
(out / f"ready-{rank}").touch()
time.sleep(120)
"""


@pytest.mark.faults  # signals: with the fault matrix (`make test-faults`, .ci/run's second step)
def test_a_sigterm_to_accel_dp_run_reaches_every_rank_and_it_exits_75_after_the_last(tmp_path):
    """Through the real chain (accel-dp's runner, accelerate's launcher, torchrun, 2 ranks): every rank gets the
    SIGTERM at once and writes its checkpoint, the slow one too, and accel-dp exits with their 75 only then."""
    from accel_dp.runner import PREEMPTED_EXIT_CODE

    script = tmp_path / "rank.py"
    script.write_text(RANK_THAT_CHECKPOINTS_ON_SIGTERM)
    driver = (  # what `accel-dp run` does, for a script that is not a recipe
        "import sys; from pathlib import Path; from accel_dp.launch import RunOptions, build_launch; "
        "from accel_dp.runner import run; "
        "options = RunOptions(cpu=True, procs=2, main_port=int(sys.argv[3]), recipe_args=(sys.argv[2],)); "
        "launch = build_launch(Path(sys.argv[1]), options, 0); sys.exit(run(launch.launcher_args, launch.env))"
    )
    command = [sys.executable, "-c", driver, str(script), str(tmp_path), str(free_port())]
    process = subprocess.Popen(command, env=subprocess_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"ready-{rank}").exists() for rank in (0, 1)):
            assert process.poll() is None and time.monotonic() < deadline, "the ranks never started"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
        saved = sorted(p.name for p in tmp_path.glob("saved-*"))  # as accel-dp has exited
    finally:
        kill_process_tree(process.pid)
    assert code == PREEMPTED_EXIT_CODE and saved == ["saved-0", "saved-1"]


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


def test_only_a_process_a_signal_killed_is_reported_as_killed_and_only_sigkill_blames_memory():
    """A recipe stopped by Ctrl-C exits 130 on its own, after its checkpoint: no "killed by SIGINT" line. A process
    killed by a signal gets the shell's 128 + N and one line; only SIGKILL (the out-of-memory killer) mentions
    memory."""
    import subprocess

    from accel_dp.runner import as_status, exit_status, killed_line

    code, rank = exit_status(subprocess.CalledProcessError(130, ["recipe"]))  # accelerate's one-process launcher
    assert as_status(code) == 130 and killed_line(code, rank) is None
    code, rank = exit_status(subprocess.CalledProcessError(-9, ["recipe"]))
    assert as_status(code) == 137 and "rank 0 was killed by SIGKILL" in killed_line(code, rank)
    assert "memory" in killed_line(code, rank)
    code, rank = exit_status(subprocess.CalledProcessError(-2, ["recipe"]))
    assert as_status(code) == 130 and "killed by SIGINT" in killed_line(code, rank)
    assert "memory" not in killed_line(code, rank)
