"""recipes/run_log.py and what a run shows: the records of metrics.jsonl (in this process); what a newcomer sees
through accel-dp run with the output going to a file (one device name, rank prefixes only with several processes, no
escape codes, no progress bars, none of the libraries' expected and harmless notices: shared tensors dropped at a
checkpoint, a fresh classifier head, a BPE trainer's blank progress lines); and --report_to: both recipes log their
metrics and full config through accelerate's trackers, one tracker run per job however many processes (read back from
what tensorboard and wandb, offline, recorded)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    DATA_DIR,
    RECIPES_DIR,
    SHAKESPEARE,
    free_port,
    gpt_args,
    load_recipe,
    read_metrics,
    subprocess_env,
    tiny_bert,
)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def test_each_record_is_one_line_and_a_resume_forgets_what_came_after_its_checkpoint(tmp_path):
    from accelerate import Accelerator
    from run_log import RunLog

    accelerator, run = Accelerator(cpu=True), tmp_path / "run"
    log = RunLog(accelerator, run, resumed_step=None, tracker_project="accel-dp", config={})
    assert run.is_dir()  # made by the log: the data and the model were good
    for step in (1, 2, 3):
        log({"step": step, "loss": 1.0 / step})
    log({"step": 3, "eval_loss": 0.5}, "step 3 | val loss 0.5")
    assert read_metrics(run) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}, {"step": 3, "loss": 1 / 3},
                                 {"step": 3, "eval_loss": 0.5}]  # fmt: skip
    RunLog(accelerator, run, resumed_step=2, tracker_project="accel-dp", config={})  # resumed at step 2
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    RunLog(accelerator, run, resumed_step=None, tracker_project="accel-dp", config={})  # a fresh start
    assert not (run / "metrics.jsonl").exists()


def test_a_resume_skips_a_blank_line_and_a_last_line_cut_short_and_says_so(tmp_path, caplog):
    """What a crash or a full disk can leave in metrics.jsonl: a blank line, a last record cut off part way."""
    from accelerate import Accelerator
    from run_log import RunLog

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    with caplog.at_level("WARNING"):
        RunLog(Accelerator(cpu=True), run, resumed_step=2, tracker_project="accel-dp", config={})
    assert read_metrics(run) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    assert "line 4 is not a whole record (cut short?); skipped" in caplog.text


@pytest.mark.slow
def test_a_run_whose_log_was_cut_short_resumes_through_accel_dp_run(tmp_path, token_cache, capfd):
    from conftest import accel_dp_run

    run = tmp_path / "run"
    args = gpt_args(run, token_cache, "--max_train_steps", "4", "--checkpointing_steps", "2", "--log_every", "1",
                    "--sample_tokens", "0")  # fmt: skip
    assert accel_dp_run("gpt-pretrain", 2, args) == 0
    with open(run / "metrics.jsonl", "a") as f:
        f.write('\n{"step": 5, "loss"')  # a crash mid-line, then a resume
    capfd.readouterr()
    assert accel_dp_run("gpt-pretrain", 2, [*args, "--max_train_steps", "6", "--resume_from_checkpoint", "latest"]) == 0
    output = capfd.readouterr()
    assert "is not a whole record (cut short?); skipped" in output.out + output.err
    steps = [record["step"] for record in read_metrics(run) if "loss" in record]
    assert steps == [1, 2, 3, 4, 5, 6]


NOISE = ("\x1b", "\r", "[RANK", "Removed shared tensor", "LOAD REPORT", "Loading weights", "Writing model shards",
         "tokenizing", "The following values were not passed")  # fmt: skip


def run_to_file(tmp_path, recipe: str, processes: int, args: list[str]) -> str:
    log = tmp_path / "output.log"
    command = [sys.executable, "-m", "accel_dp", "run", recipe, "--cpu", "--procs", str(processes),
               "--main-port", str(free_port()), "--", *args]  # fmt: skip
    with open(log, "w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=subprocess_env(), timeout=300)
    text = log.read_text()
    assert done.returncode == 0, text[-3000:]
    return text


@pytest.mark.slow
def test_a_gpt_run_into_a_file_shows_only_what_the_user_needs(tmp_path, token_cache):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SHAKESPEARE.read_text()[:40_000])
    args = gpt_args(tmp_path / "run", token_cache, "--train_file", str(corpus), "--tokenizer", "bpe:300",
                    "--max_train_steps", "10", "--checkpointing_steps", "5", "--eval_every", "10")  # fmt: skip
    text = run_to_file(tmp_path, "gpt-pretrain", 1, args)
    assert not [noise for noise in NOISE if noise in text], text[:3000]
    assert "\n\n\n" not in text and "[rank" not in text
    assert "gpt-pretrain: 1 process(es) on cpu," in text and "checkpoint " in text and "final val loss" in text


@pytest.mark.slow
def test_a_two_process_glue_run_into_a_file_prefixes_ranks_and_drops_the_expected_notices(tmp_path):
    args = ["--model_name_or_path", tiny_bert(), "--data_dir", str(DATA_DIR / "glue" / "MRPC"), "--max_train_samples",
            "32", "--max_eval_samples", "16", "--max_length", "32", "--per_device_train_batch_size", "8",
            "--max_train_steps", "2", "--output_dir", str(tmp_path / "run")]  # fmt: skip
    text = run_to_file(tmp_path, "glue-bert", 2, args)
    assert not [noise for noise in NOISE if noise in text], text[:3000]
    assert "[rank 0] glue-bert: 2 process(es) on cpu," in text and "[rank 1]" not in text  # the main process logs
    assert "[rank 0] glue-bert: final eval_" in text and f"; saved to {tmp_path / 'run'}" in text


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
