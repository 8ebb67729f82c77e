"""The `accel-dp` commands as a user types them: listing, copying, dry runs and one-line errors."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from conftest import KIT_MODULES, RECIPES_DIR, REPO_ROOT, subprocess_env
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
    folder = sorted(["gpt_pretrain.py", "token_cache.py", *KIT_MODULES])
    assert sorted(p.name for p in tmp_path.iterdir()) == folder
    for name in folder:
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
    for module in ("run-kit", "token-cache", "glue-data", "faults", "checkpointing"):
        assert module not in listed
        refused = runner.invoke(app, ["run", module, "--dry-run"])
        assert refused.exit_code == 2 and "unknown recipe" in refused.output
    assert [m.name for m in get_recipe("gpt-pretrain").modules()] == sorted(["token_cache.py", *KIT_MODULES])
    assert [m.name for m in get_recipe("glue-bert").modules()] == sorted(["glue_data.py", "glue_metric.py",
                                                                          *KIT_MODULES])  # fmt: skip


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


def test_restarts_get_a_fixed_output_folder_where_a_restarted_run_finds_its_checkpoints(no_gpu, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["run", "gpt-pretrain", "--cpu", "--procs", "2", "--max-restarts", "2", "--dry-run"]
    line = " ".join(runner.invoke(app, base).output.split())
    assert "--max_restarts 2" in line
    assert re.search(rf"--output_dir {re.escape(str(tmp_path))}/runs/gpt-pretrain-\d{{8}}-\d{{6}}\b", line), line
    line = " ".join(runner.invoke(app, [*base, "--", "--output_dir=mine"]).output.split())
    assert line.count("--output_dir") == 1 and "--output_dir=mine" in line  # the user's own folder stands


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


def test_console_script_works_from_another_folder(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "-m", "accel_dp", "run", "gpt-pretrain", "--cpu", "--dry-run"],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert str(REPO_ROOT / "recipes" / "gpt_pretrain.py") in " ".join(result.stdout.split())


runner = CliRunner()

COMMANDS = sorted(typer.main.get_command(app).commands)


def test_all_commands_are_registered():
    assert {"list", "configs", "copy", "run", "prepare", "report", "env", "sample", "slurm"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_command_shows_an_example_of_it(command):
    result = runner.invoke(app, [command, "--help"], prog_name="accel-dp", env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "Example" in text
    after = text[text.index("Example") :]
    assert f"accel-dp {command}" in after  # the example uses the command it documents


def test_top_level_help_shows_an_example():
    result = runner.invoke(app, ["--help"], prog_name="accel-dp", env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "Example: accel-dp run" in result.output


@pytest.mark.parametrize(
    ("shell", "expected"),
    [
        ("bash", "complete -o default -F _accel_dp_completion accel-dp"),
        ("zsh", "#compdef accel-dp"),
    ],
)
def test_show_completion_prints_the_shell_script_of_the_installed_command(shell, expected):
    command = [shutil.which("accel-dp")] if shutil.which("accel-dp") else [sys.executable, "-m", "accel_dp"]
    # Typer detects the user's shell from the process tree; with detection off, --show-completion takes the shell's
    # name, so the test asks for bash and zsh whatever runs it.
    env = subprocess_env(_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION="1")
    result = subprocess.run([*command, "--show-completion", shell], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout
    assert "_ACCEL_DP_COMPLETE=complete_" in result.stdout  # the variable that asks the command for completions


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        ("accel-dp r", {"run", "report"}),
        ("accel-dp run gpt", {"gpt-pretrain"}),
        ("accel-dp copy g", {"glue-bert", "gpt-pretrain"}),
        ("accel-dp slurm glue-bert --config multi", {"multi_cpu", "multi_gpu", "multi_node"}),
    ],
)
def test_completion_offers_commands_recipes_and_configs(words, expected):
    """What bash's completion function asks the command: COMP_WORDS and COMP_CWORD in, one candidate a line out."""
    env = {"_ACCEL_DP_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(len(words.split()) - 1)}
    result = runner.invoke(app, [], prog_name="accel-dp", env=env)
    assert result.exit_code == 0, result.output
    assert set(result.output.split()) == expected


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
