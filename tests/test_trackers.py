"""--report_to and logging: both recipes log their metrics and full config through accelerate's trackers, one tracker
run per job however many processes; the tests read back what tensorboard and wandb (offline) recorded."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import DATA_DIR, RECIPES_DIR, free_port, gpt_args, load_recipe, read_metrics, subprocess_env
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tensorboard_scalars(output_dir: Path, project: str = "accel-dp") -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from the run's main events file."""
    (events,) = (output_dir / project).glob("events.out.tfevents.*")  # one run: one main events file
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def wandb_offline_run(output_dir: Path, logged_losses: int) -> tuple[list[dict], dict]:
    """History rows and config of the run's offline wandb file, once `logged_losses` loss rows are in it: wandb's
    service process can still be writing the file for a moment after the run finished."""
    for _ in range(60):
        history, config = read_wandb_file(output_dir)
        if len([row for row in history if "loss" in row]) >= logged_losses:
            break
        time.sleep(0.5)
    return history, config


def read_wandb_file(output_dir: Path) -> tuple[list[dict], dict]:
    """History rows and config of the run's offline wandb file (leveldb-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = (output_dir / "wandb").glob("offline-run-*/run-*.wandb")  # one run per job
    data, pos, pending, block = path.read_bytes(), 7, b"", 32768  # 7: the ":W&B" file header
    history, config = [], {}
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # full, first; middle, last
        if kind not in (1, 4):
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        if record.WhichOneof("record_type") == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        elif record.WhichOneof("record_type") == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
    return history, config


def test_gpt_run_logs_every_metric_and_its_config_to_tensorboard_and_wandb(tmp_path, token_cache, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    load_recipe("gpt_pretrain").main(gpt_args(out, token_cache, "--report_to", "all", "--sample_tokens", "0"))
    metrics = read_metrics(out)
    train = [(r["step"], r["loss"]) for r in metrics if "loss" in r]
    evaluation = [(r["step"], r["eval_loss"]) for r in metrics if "eval_loss" in r]
    assert len(train) == 6 and len(evaluation) == 2

    scalars = tensorboard_scalars(out)
    assert [(s, pytest.approx(v)) for s, v in scalars["loss"]] == train
    assert [(s, pytest.approx(v)) for s, v in scalars["eval_loss"]] == evaluation
    assert {"lr", "tokens_per_second"} <= set(scalars)

    history, config = wandb_offline_run(out, len(train))
    assert [(row["_step"], pytest.approx(row["loss"])) for row in history if "loss" in row] == train
    assert [(row["_step"], pytest.approx(row["eval_loss"])) for row in history if "eval_loss" in row] == evaluation
    assert config["learning_rate"] == 3e-3 and config["n_layer"] == 2 and config["world_size"] == 1
    assert config["report_to"] == "all" and config["output_dir"] == str(out)


def test_glue_run_logs_eval_metrics_to_tensorboard(tmp_path):
    out = tmp_path / "run"
    load_recipe("glue_bert").main(["--data_dir", str(DATA_DIR / "glue" / "MRPC"), "--max_train_samples", "16",
                                   "--max_eval_samples", "8", "--max_length", "32", "--per_device_train_batch_size",
                                   "8", "--num_train_epochs", "2", "--log_every", "1", "--report_to", "tensorboard",
                                   "--output_dir", str(out)])  # fmt: skip
    scalars = tensorboard_scalars(out)
    metrics = read_metrics(out)
    assert [v for _, v in scalars["eval_accuracy"]] == pytest.approx(
        [r["eval_accuracy"] for r in metrics if "eval_accuracy" in r]
    )
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3, 4]


def test_two_processes_make_one_tracker_run(tmp_path, token_cache):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(RECIPES_DIR / "gpt_pretrain.py"),
               *gpt_args(out, token_cache, "--report_to", "all", "--sample_tokens", "0")]  # fmt: skip
    env = subprocess_env(OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1", WANDB_MODE="offline")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    history, config = wandb_offline_run(out, 6)  # exactly one wandb run (the unpacking fails otherwise)...
    assert config["world_size"] == 2 and len([row for row in history if "loss" in row]) == 6
    assert len(tensorboard_scalars(out)["loss"]) == 6  # ...and one tensorboard run
    assert len(list(out.rglob("offline-run-*"))) == 1
    # accelerate's logger: one copy of each message, from rank 0, not one per process
    assert result.stdout.count("gpt-pretrain: final val loss") == 1 and result.stdout.count("val loss") == 3
    assert "[rank 0]" in result.stdout and "[rank 1]" not in result.stdout + result.stderr


def test_wandb_without_login_or_offline_mode_says_what_to_do_and_writes_nothing(
    tmp_path, token_cache, monkeypatch, capsys
):
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with pytest.raises(SystemExit) as exit_info:
        load_recipe("gpt_pretrain").main(gpt_args(tmp_path / "run", token_cache, "--report_to", "wandb"))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "wandb is not logged in; run `wandb login`, or set WANDB_MODE=offline" in error
    assert list(tmp_path.iterdir()) == []
