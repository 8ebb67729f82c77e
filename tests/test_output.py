"""What a newcomer sees, through accel-dp run with the output going to a file: one device name, rank prefixes only
with several processes, no escape codes, no progress bars, and none of the libraries' expected and harmless notices
(shared tensors dropped at a checkpoint, a fresh classifier head, a BPE trainer's blank progress lines)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import DATA_DIR, SHAKESPEARE, free_port, gpt_args, subprocess_env, tiny_bert

NOISE = ("\x1b", "\r", "[RANK", "Removed shared tensor", "LOAD REPORT", "Loading weights", "Writing model shards",
         "tokenizing", "The following values were not passed")  # fmt: skip


def run_to_file(tmp_path, recipe: str, processes: int, args: list[str]) -> str:
    log = tmp_path / "output.log"
    command = [sys.executable, "-m", "accel_dp.cli", "run", recipe, "--cpu", "--procs", str(processes),
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
