"""A non-editable install carries its recipes, configs and data: `accel-dp run` works from any folder."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import CONFIGS_DIR, REPO_ROOT, subprocess_env


@pytest.mark.slow
def test_installed_wheel_runs_a_recipe_from_another_folder(tmp_path: Path):
    dist, site, elsewhere = tmp_path / "dist", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", dist, REPO_ROOT], check=True, timeout=300)
    wheel = next(dist.glob("accel_dp-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("accel_dp/_bundle/recipes/gpt_pretrain.py", "accel_dp/_bundle/data/tinyshakespeare/input.txt"):
        assert required in names
    assert {f"accel_dp/_bundle/accelerate_configs/{p.name}" for p in CONFIGS_DIR.glob("*.yaml")} <= names
    subprocess.run([*pip, "install", "--no-deps", "--target", site, wheel], check=True, timeout=300)

    # Only the installed copy is importable: PYTHONPATH puts it ahead of the editable checkout.
    env = subprocess_env(PYTHONPATH=str(site))
    accel_dp = [sys.executable, "-m", "accel_dp"]
    dry = subprocess.run([*accel_dp, "run", "gpt-pretrain", "--dry-run", "--cpu"], cwd=elsewhere, env=env,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    assert str(site / "accel_dp" / "_bundle" / "recipes" / "gpt_pretrain.py") in " ".join(dry.stdout.split())

    tiny = ["--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--block_size", "16", "--max_train_steps", "3",
            "--eval_iters", "2", "--sample_tokens", "0", "--cache_dir", str(tmp_path / "cache"),
            "--output_dir", "out"]  # fmt: skip
    run = subprocess.run([*accel_dp, "run", "gpt-pretrain", "--cpu", "--", *tiny], cwd=elsewhere, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((elsewhere / "out" / "all_results.json").read_text())
    assert results["optimizer_steps"] == 3
    meta = json.loads(next((tmp_path / "cache").glob("*/meta.json")).read_text())
    assert meta["source"]["data"]["train"][0][0] == str(
        site / "accel_dp" / "_bundle" / "data" / "tinyshakespeare" / "input.txt"
    )
