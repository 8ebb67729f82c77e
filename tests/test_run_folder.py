"""recipes/run_folder.py and heartbeat_lock.py: a run's folder belongs to one run (its lock, its identity, an
earlier run's files moved aside, never deleted), every file in it is whole or absent, and what the recipes save is a
standard Hugging Face model folder (`transformers.pipeline` uses it as it is). The full disk at each write is the
write-fault matrix, in tests/test_faults.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import heartbeat_lock
import pytest
import run_folder
import torch
from conftest import (
    accel_dp_run,
    gpt_args,
    kill_process_tree,
    load_recipe,
    recipe_command,
    reset_accelerate_state,
    subprocess_env,
)
from transformers import pipeline

GLUE_TINY = [
    "--max_train_samples", "16", "--max_eval_samples", "8", "--max_length", "64", "--max_train_steps", "1",
    "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_glue_run(tmp_path_factory):
    """MiniLM fine-tuned one step on 16 MRPC pairs: enough to have a saved classifier with MRPC's label names."""
    output_dir = tmp_path_factory.mktemp("tiny_glue") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as tests/test_glue_bert.py: one thread is faster on a shared 2-core machine
    try:
        reset_accelerate_state()
        load_recipe("glue_bert").main([*GLUE_TINY, "--output_dir", str(output_dir)])
        reset_accelerate_state()
    finally:
        torch.set_num_threads(threads)
    return output_dir


def test_gpt_pretrain_output_generates_text_with_a_text_generation_pipeline(tiny_gpt_run):
    generator = pipeline("text-generation", model=str(tiny_gpt_run), device="cpu")
    [output] = generator("First Citizen:", max_new_tokens=8, do_sample=False)
    text = output["generated_text"]
    assert text.startswith("First Citizen:") and len(text) == len("First Citizen:") + 8  # 8 characters


def test_glue_bert_output_classifies_a_sentence_pair_with_the_tasks_label_names(tiny_glue_run):
    classifier = pipeline("text-classification", model=str(tiny_glue_run), device="cpu")
    first, second = "The company's shares rose 5 percent on Monday.", "Shares of the company gained 5% on Monday."
    [prediction] = classifier([{"text": first, "text_pair": second}])
    assert prediction["label"] in ("equivalent", "not_equivalent")
    assert 0.5 <= prediction["score"] <= 1.0

    # The pipeline encoded the two sentences as a pair: its answer is the model's own on that pair.
    encoded = classifier.tokenizer(first, second, return_tensors="pt")
    with torch.no_grad():
        logits = classifier.model(**encoded).logits[0]
    assert prediction["label"] == classifier.model.config.id2label[int(logits.argmax())]
    assert prediction["score"] == pytest.approx(torch.softmax(logits, dim=-1).max().item(), abs=1e-5)


def test_every_file_a_run_writes_has_one_permission_mode(tiny_gpt_run):
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in tiny_gpt_run.rglob("*") if p.is_file()}
    assert len(set(modes.values())) == 1, modes  # (safetensors writes its files 0600, the others are 0644)


def test_results_are_strict_json_with_null_where_a_value_is_missing():
    import json

    results = {"eval_loss": float("nan"), "mfu": None, "curve": [1.0, float("inf")], "steps": 3}
    text = json.dumps(run_folder.finite_or_null(results))
    assert json.loads(text) == {"eval_loss": None, "mfu": None, "curve": [1.0, None], "steps": 3}
    assert "NaN" not in text and "Infinity" not in text


def test_a_lock_is_refused_while_its_holder_beats_and_taken_over_once_it_is_gone(tmp_path):
    lock = heartbeat_lock.HeartbeatLock(tmp_path / "run.lock")
    (tmp_path / "run.lock").write_text("otherhost:4242\n2026-12-04 03:00:00")  # another machine's run, beating
    assert not lock.claim()
    holder = lock.holder()
    assert holder.who == "otherhost:4242" and not holder.gone and "since 2026-12-04 03:00:00" in holder.describe()
    silent = time.time() - 2 * heartbeat_lock.STALE_AFTER_S
    os.utime(tmp_path / "run.lock", (silent, silent))  # its heartbeat stopped: the machine is gone
    assert lock.holder().gone and lock.claim()
    assert lock.holder().who == f"{socket.gethostname()}:{os.getpid()}"
    lock.release()
    assert not (tmp_path / "run.lock").exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "run.lock").write_text(f"{socket.gethostname()}:{dead.stdout.strip()}")  # a crashed run, here
    assert lock.holder().gone
    never_claimed = heartbeat_lock.HeartbeatLock(tmp_path / "run.lock")
    never_claimed.release()  # releasing a lock it does not hold leaves it
    assert (tmp_path / "run.lock").exists()


def test_a_lock_held_by_an_earlier_process_of_the_same_elastic_group_is_taken_over_once_it_misses_two_beats(
    tmp_path, monkeypatch
):
    """A re-formed group's new main process (maybe on another machine) takes the lock its group's earlier process held
    on a lost machine after two missed heartbeats, not sixty seconds; one that still beats is refused (a group formed
    apart never writes beside it), as is another group's or no group's."""
    lock_file = tmp_path / "run.lock"
    lock_file.write_text("lost-node:4242\n2026-12-04 03:00:00\naccel-dp-0123")
    monkeypatch.setattr(heartbeat_lock, "GROUP_WAIT_S", 0.5)
    same_group = heartbeat_lock.HeartbeatLock(lock_file, group="accel-dp-0123")
    assert not same_group.claim()  # still beating
    silent = time.time() - 2 * heartbeat_lock.HEARTBEAT_S - 1
    os.utime(lock_file, (silent, silent))
    assert not heartbeat_lock.HeartbeatLock(lock_file).claim()
    assert not heartbeat_lock.HeartbeatLock(lock_file, group="accel-dp-other").claim()
    assert same_group.claim()
    assert lock_file.read_text().splitlines()[::2] == [same_group.me, "accel-dp-0123"]
    same_group.release()


FULL_FILE = """
import resource, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import run_folder
path = Path(sys.argv[2])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit, a write fails (EFBIG) instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size + 10, resource.RLIM_INFINITY))
try:
    getattr(run_folder, sys.argv[3])(path, "x" * 100 + "\\n")
except SystemExit as stopped:
    sys.exit(stopped.code)
"""


@pytest.mark.parametrize("write", ["append_line", "write_whole"])
def test_a_write_that_fails_part_way_leaves_the_file_as_it_was_and_says_so_in_one_line(tmp_path, write):
    """A real partial write: the kernel lets 10 of the 101 bytes onto the disk (a file size limit, as a full disk
    does), then refuses the rest."""
    from conftest import RECIPES_DIR

    target = tmp_path / "metrics.jsonl"
    target.write_text('{"step": 1, "loss": 2.5}\n')
    before = target.read_bytes()
    (tmp_path / "write.py").write_text(FULL_FILE)
    result = subprocess.run([sys.executable, str(tmp_path / "write.py"), str(RECIPES_DIR), str(target), write],
                            env=subprocess_env(), capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 1, result.stderr
    [line] = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert f"could not write {target} (" in line and "MiB are free" in line and "--resume_from_checkpoint" in line
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "write.py"]  # no partial file left


def tiny_gpt(output_dir, token_cache, *extra):
    """4 steps at a global batch of 4, on 1 or 2 processes alike."""
    return gpt_args(output_dir, token_cache, "--max_train_steps", "4", "--log_every", "1", "--eval_every", "4",
                    "--sample_tokens", "0", "--per_device_train_batch_size", "2", "--global_batch_size", "4",
                    *extra)  # fmt: skip


@pytest.mark.slow
def test_a_second_run_on_a_folder_in_use_is_refused_naming_the_holder_and_may_go_on_once_it_ends(
    tmp_path, token_cache, capfd
):
    """A run holds its folder: a second one there, fresh or resuming `latest`, on 1 or 2 processes, is refused before
    any work with the holder's host and pid, and leaves the first run's files as they were. Once the holder is gone
    (killed: no one releases its lock), the folder is free again at once on the same machine."""
    out = tmp_path / "run"
    first = subprocess.Popen(recipe_command("gpt-pretrain", 1, tiny_gpt(out, token_cache, "--max_train_steps", "100000",
                             "--checkpointing_steps", "2")), env=subprocess_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "latest").is_file():
            assert first.poll() is None and time.monotonic() < deadline, "the first run did not start"
            time.sleep(0.05)
        for processes, resume in ((1, ()), (2, ("--resume_from_checkpoint", "latest"))):
            capfd.readouterr()
            code = accel_dp_run(
                "gpt-pretrain", processes, tiny_gpt(out, token_cache, "--overwrite_output_dir", *resume)
            )
            err = capfd.readouterr().err
            errors = [line for line in err.splitlines() if line.startswith("error:")]
            assert code == 2 and len(errors) == 1, err[-3000:]
            assert f"is in use by another run ({socket.gethostname()}:{first.pid}, since " in errors[0]
            assert first.poll() is None  # the first run goes on
        assert not list(out.glob("overwritten-*"))
    finally:
        kill_process_tree(first.pid)
        first.wait()
    assert (out / "run.lock").exists()  # a killed run cannot release it; its pid is gone, so the lock is
    assert accel_dp_run("gpt-pretrain", 2, tiny_gpt(out, token_cache, "--overwrite_output_dir")) == 0
    assert not (out / "run.lock").exists() and (out / "all_results.json").is_file()


def files_of(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_overwrite_moves_the_earlier_run_aside_and_latest_never_resumes_it(tmp_path, token_cache, capfd):
    """--overwrite_output_dir with --resume_from_checkpoint latest, as a Slurm requeue repeats it: the first start
    moves the earlier run's files (its checkpoints too) into overwritten-*/ byte for byte, so `latest` cannot continue
    that run; a repeat of the command before the new run's first checkpoint starts it afresh again."""
    out = tmp_path / "run"
    assert accel_dp_run("gpt-pretrain", 1, tiny_gpt(out, token_cache, "--checkpointing_steps", "2")) == 0
    earlier = files_of(out)
    assert "checkpoints/latest" in earlier and "run.json" in earlier
    command = tiny_gpt(out, token_cache, "--overwrite_output_dir", "--resume_from_checkpoint", "latest", "--seed", "7")
    for _ in range(2):
        capfd.readouterr()
        assert accel_dp_run("gpt-pretrain", 2, command) == 0
        output = capfd.readouterr()
        assert "the earlier run's files in" in output.out + output.err and "resumed from" not in output.out + output.err
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert records[0]["step"] == 1  # trained from the start, not from the earlier run's step 2
        assert not (out / "checkpoints").exists()  # (this run makes none)
    first_aside, second_aside = sorted(out.glob("overwritten-*"))
    assert files_of(first_aside) == earlier
    assert json.loads((out / "run.json").read_text())["run"] != json.loads(earlier["run.json"])["run"]
    assert "all_results.json" in files_of(second_aside)  # the first attempt's files, kept as well
