"""The README and docs as a user reads them: the README's exit-code table is docs/errors.md's, and their shell
examples work as written."""

from __future__ import annotations

import re
import shlex
import subprocess

import pytest
from conftest import REPO_ROOT, load_recipe, subprocess_env

README = REPO_ROOT / "README.md"
# What this machine cannot run: GPUs, several machines, Slurm, data paths of a cluster, a tokenizer from the Hub,
# the Makefile's own targets (CI runs them), and what changes the user's shell.
NEEDS_MORE = ("--gpus", "--nodes", "torchrun", "sbatch", "/data/", "/shared/", "--tokenizer gpt2", "make ",
              "--install-completion", "runs/")  # fmt: skip


def exit_code_table(path) -> str:
    text = path.read_text()
    start = text.index("| code | meaning | what to do |")
    return text[start : text.index("\n\n", start)]


def test_the_readme_and_docs_errors_give_one_exit_code_table():
    assert exit_code_table(README) == exit_code_table(REPO_ROOT / "docs" / "errors.md")
    assert "| 128 + N |" in exit_code_table(README) and "| 75 |" in exit_code_table(README)


def documented_commands() -> list[str]:
    commands = []
    text = "".join(path.read_text() for path in (README, *sorted((REPO_ROOT / "docs").glob("*.md"))))
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            command = line.split("  #")[0].split(" # ")[0].strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


RUNNABLE = sorted({c for c in documented_commands() if not any(marker in c for marker in NEEDS_MORE)})


def test_the_docs_have_examples_this_machine_can_run():
    assert len(RUNNABLE) >= 10, RUNNABLE


@pytest.mark.parametrize("command", RUNNABLE)
def test_a_documented_example_runs_as_written_in_an_empty_folder(command, tmp_path):
    """Training commands are checked by their own parsers (the recipe's argument checks; accel-dp run's --dry-run,
    which resolves the recipe, the config and the launch): running them through would take minutes each. Every
    other command runs as written, in an empty folder."""
    words = [w for w in shlex.split(command.split(">")[0]) if "=" not in w or w.startswith("-")]  # (VAR=value)
    recipe = next((w for w in words if w.startswith("recipes/") and w.endswith(".py")), None)
    if recipe:  # python recipes/x.py ..., accelerate launch recipes/x.py ...
        flags = words[words.index(recipe) + 1 :]
        load_recipe(recipe.removeprefix("recipes/").removesuffix(".py")).parse_args(flags)
        return
    if words[:2] == ["accel-dp", "run"]:
        command = command.replace("accel-dp run", "accel-dp run --dry-run", 1)
    # As typed at a bash prompt: bash stays the command's parent (a lone `bash -c` command would replace bash), as
    # Typer's completion commands find the user's shell in the process tree, not in whatever shell started pytest.
    done = subprocess.run(["/bin/bash", "-c", f"{command}\nexit $?"], cwd=tmp_path, env=subprocess_env(),
                          capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, f"{command}: {done.stderr[-2000:]}"
    if ">" in command:
        assert (tmp_path / command.split(">")[-1].strip()).stat().st_size > 0
