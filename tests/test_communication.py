"""Beyond plain all-reduce: compressed gradient hooks (--ddp_comm_hook), Local SGD (--local_sgd_steps), and FSDP on CPU.

Each multi-process test runs real gloo processes under torchrun through tests/record_final_parameters.py, which
records on every rank the hook DDP really runs, the bytes handed to all_reduce by who sent them, and the parameters.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import (
    FP32_STEPS,
    assert_refused_before_any_work,
    fp32_gpt_args,
    launch_and_record,
    load_recipe,
    read_metrics,
    reset_accelerate_state,
    saved_parameters,
    tiny_bert,
)


def losses(output_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(output_dir) if "loss" in r]


def final_eval_loss(output_dir: Path) -> float:
    return json.loads((output_dir / "all_results.json").read_text())["eval_loss"]


def launch(tmp_path: Path, name: str, args: list[str], recipe: str = "gpt_pretrain") -> list[dict]:
    record_dir = tmp_path / f"{name}-records"
    record_dir.mkdir()
    completed, records = launch_and_record(recipe, args, record_dir)
    assert completed.returncode == 0 and len(records) == 2, completed.stderr[-3000:]
    return records


# Width 128: 1.6 MB of gradients, more than DDP's first bucket (1 MiB). Over gloo, PowerSGD's chained all-reduces of
# two buckets complete, and are issued, in different orders on the two ranks, and gloo aborts (a collective
# mismatch): the recipe asks DDP for one bucket on CPU, and the PowerSGD case below shows that it trains.
WIDE = ("--n_embd", "128")


@pytest.fixture(scope="module")
def plain(tmp_path_factory, token_cache) -> tuple[Path, list[dict]]:
    """The reference: 2 processes, DDP's plain fp32 all-reduce."""
    tmp_path = tmp_path_factory.mktemp("plain")
    return tmp_path / "run", launch(tmp_path, "plain", fp32_gpt_args(tmp_path / "run", token_cache, *WIDE))


@pytest.mark.parametrize(
    ("flags", "hook"),
    [(["--ddp_comm_hook", "fp16"], "fp16_compress_hook"),
     (["--ddp_comm_hook", "powersgd", "--powersgd_start_iter", "2", "--powersgd_rank", "1"], "powerSGD_hook")],
    ids=["fp16", "powersgd"],
)  # fmt: skip
@pytest.mark.xdist_group("plain")  # the `plain` reference run is made once per worker
def test_gpt_compressing_hook_is_on_sends_fewer_bytes_and_still_trains(tmp_path, token_cache, plain, flags, hook):
    plain_dir, plain_records = plain
    records = launch(tmp_path, "hooked", fp32_gpt_args(tmp_path / "run", token_cache, *WIDE, *flags))
    parameter_bytes = plain_records[0]["parameters"].numel() * 4
    assert parameter_bytes > 2**20  # several of DDP's default buckets
    # Plain all-reduce: every step sends every fp32 gradient once (counted by the recorder's own hook).
    assert plain_records[0]["comm_hook"] is None
    assert plain_records[0]["allreduce_bytes"]["gradients"] == FP32_STEPS * parameter_bytes
    for record in records:
        assert record["comm_hook"] == hook  # what DDP itself reports it runs
        sent = record["allreduce_bytes"]["gradients"]
        if hook == "fp16_compress_hook":
            assert sent == FP32_STEPS * parameter_bytes // 2
        else:  # 2 steps of plain all-reduce (DDP rebuilds its buckets after step 1), then rank-1 factors P and Q
            compressed = sent - 2 * parameter_bytes
            assert 0 < compressed < (FP32_STEPS - 2) * parameter_bytes / 8
    # Both ranks applied the same (decompressed) gradient; it is not plain all-reduce's, but training still works.
    assert torch.equal(records[0]["parameters"], records[1]["parameters"])
    assert (records[0]["parameters"] - plain_records[0]["parameters"]).abs().max() > 0
    curve = losses(tmp_path / "run")
    assert len(curve) == FP32_STEPS and curve[-1] < curve[0] - 0.1
    assert abs(final_eval_loss(tmp_path / "run") - final_eval_loss(plain_dir)) < 0.05


def test_gpt_local_sgd_replicas_agree_after_each_average_drift_between_and_end_averaged(tmp_path, token_cache):
    """K = 3, 4 steps of 2 accumulated micro-batches: the replicas agree right after the average at step 3, drift
    apart at step 4, and the end averages them; no gradient is ever all-reduced, neither on micro-steps nor at the
    accumulation boundaries."""
    records = launch(tmp_path, "local", fp32_gpt_args(tmp_path / "run", token_cache, "--local_sgd_steps", "3",
                                                 "--max_train_steps", "4", "--eval_every", "4",
                                                 "--gradient_accumulation_steps", "2"))  # fmt: skip
    parameter_bytes = records[0]["parameters"].numel() * 4
    averaged = [r["parameters_after_last_average"] for r in records]
    assert torch.equal(averaged[0], averaged[1])
    before = [r["parameters_after_last_local_sgd_step"] for r in records]
    assert (before[0] - before[1]).abs().max() > 1e-4
    assert torch.equal(records[0]["parameters"], records[1]["parameters"])
    assert (records[0]["parameters"] - (before[0] + before[1]) / 2).abs().max() <= 1e-6
    for record in records:
        assert record["local_sgd_steps"] == 4 and record["optimizer_steps"] == 4
        assert record["allreduce_calls"] == 0  # DDP's gradient all-reduce never ran
        assert record["allreduce_bytes"]["gradients"] == 0
        # Whole parameters after step 3, before the evaluation at step 4, and once more at the end.
        assert record["allreduce_bytes"]["parameters"] == 3 * parameter_bytes
    curve = losses(tmp_path / "run")
    assert len(curve) == 4 and curve[-1] < curve[0]


GLUE_ARGS = ["--task", "mrpc", "--model_name_or_path", tiny_bert(), "--max_train_samples", "37",
             "--max_eval_samples", "8", "--max_length", "32",
             "--num_train_epochs", "1", "--dropout", "0", "--mixed_precision", "no", "--log_every", "1",
             "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8"]  # fmt: skip


def test_glue_local_sgd_is_on(tmp_path):
    """K = 2 over 5 optimizer steps: step 5 runs alone after the average at step 4; the end averages."""
    records = launch(tmp_path, "local", [*GLUE_ARGS, "--output_dir", str(tmp_path / "run"), "--local_sgd_steps", "2"],
                     "glue_bert")  # fmt: skip
    before = [r["parameters_after_last_local_sgd_step"] for r in records]
    assert (before[0] - before[1]).abs().max() > 0
    assert torch.equal(records[0]["parameters"], records[1]["parameters"])
    assert records[0]["allreduce_calls"] == 0 and records[0]["local_sgd_steps"] == 5
    results = json.loads((tmp_path / "run" / "all_results.json").read_text())
    assert results["local_sgd_steps"] == 2 and results["optimizer_steps"] == 5


def test_gpt_bf16_hook_is_refused_on_cpu(tmp_path, token_cache):
    """torch registers the bf16 hook only with CUDA and NCCL >= 2.10: say so before anything runs."""
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    args = fp32_gpt_args(tmp_path / "run", token_cache, "--ddp_comm_hook", "bf16")
    completed, records = launch_and_record("gpt_pretrain", args, record_dir, timeout=120)
    assert records == []
    assert_refused_before_any_work(completed, "--ddp_comm_hook bf16 needs GPUs with NCCL", tmp_path / "run")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--powersgd_rank", "2"], "only apply with --ddp_comm_hook powersgd"),
        (["--ddp_comm_hook", "powersgd", "--powersgd_rank", "0"], "--powersgd_rank must be a positive integer"),
        (["--ddp_comm_hook", "powersgd", "--powersgd_start_iter", "1"], "--powersgd_start_iter must be at least 2"),
        (["--local_sgd_steps", "0"], "--local_sgd_steps must be a positive integer"),
        (["--local_sgd_steps", "4", "--ddp_comm_hook", "fp16"], "would have nothing to compress"),
    ],
    ids=["rank-without-powersgd", "rank-0", "start-1", "local-0", "local-and-hook"],
)
@pytest.mark.parametrize("recipe", ["gpt_pretrain", "glue_bert"])
def test_bad_communication_flags_are_refused_before_anything_is_written(tmp_path, token_cache, capsys, recipe,
                                                                        flags, message):  # fmt: skip
    out = tmp_path / "run"
    args = fp32_gpt_args(out, token_cache) if recipe == "gpt_pretrain" else ["--output_dir", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        load_recipe(recipe).main([*args, *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not out.exists()


def test_gpt_one_process_ignores_communication_flags_with_a_note(tmp_path, token_cache, capsys):
    """One process has nothing to communicate: the flags change nothing, and the recipe says so."""
    recipe = load_recipe("gpt_pretrain")
    recipe.main(fp32_gpt_args(tmp_path / "plain", token_cache, "--max_train_steps", "2"))
    reset_accelerate_state()
    capsys.readouterr()
    recipe.main(fp32_gpt_args(tmp_path / "flags", token_cache, "--max_train_steps", "2", "--ddp_comm_hook", "powersgd"))
    assert "note: --ddp_comm_hook ignored: one process alone has nothing to communicate" in capsys.readouterr().err
    assert torch.equal(saved_parameters(tmp_path / "plain"), saved_parameters(tmp_path / "flags"))
