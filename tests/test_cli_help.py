"""Every `accel-dp` command's --help shows an example, and shell completion works (script and completions)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import typer
from conftest import subprocess_env
from typer.testing import CliRunner

from accel_dp.cli import app

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
    command = [shutil.which("accel-dp")] if shutil.which("accel-dp") else [sys.executable, "-m", "accel_dp.cli"]
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
