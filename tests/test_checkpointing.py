"""recipes/checkpointing.py: the Checkpointer alone (save, restore, prune, `latest`, another layout) on a tiny model
in this process; then whole runs: a run killed with SIGKILL and resumed from its last checkpoint ends exactly where
an uninterrupted run ends, for both recipes, mid-epoch included, on 1 and 2 processes; a checkpoint is never
half-visible, never runs code, and resumes on another number of processes (elastic resume)."""

from __future__ import annotations

import contextlib
import json
import pickle
from pathlib import Path

import checkpointing
import manifest
import pytest
import torch
from conftest import (
    accel_dp_run,
    fp32_gpt_args,
    glue_args,
    glue_resumable_args,
    gpt_args,
    gpt_resumable_args,
    load_recipe,
    logged_curve,
    read_metrics,
    reset_accelerate_state,
    run_and_kill_after_first_checkpoint,
    run_to_the_end,
    saved_parameters,
)


class Counter:
    """A stateful part of a run, as the meter and the non-finite policy are."""

    def __init__(self):
        self.value = 0

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


def tiny_run(root: Path, every=2, keep=None, layout=(4, 1, 1)):
    """A linear model, its AdamW, a Counter and their Checkpointer in <root>/checkpoints, on one CPU process."""
    from accelerate import Accelerator
    from training import LocalSGD

    reset_accelerate_state()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=layout[2])
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=0.1))
    counter = Counter()
    checkpointer = checkpointing.Checkpointer(
        accelerator, checkpointing.CheckpointFolder(root / "checkpoints"), recipe="test",
        run_id="run-a", fit={"size": 4}, layout=checkpointing.Layout(*layout), every=every, keep=keep, model=model,
        optimizer=optimizer,
        local_sgd=LocalSGD(accelerator, model, None), parts={"counter": counter}, seed=0,
        paused=lambda what: contextlib.nullcontext(),
    )  # fmt: skip
    return model, optimizer, counter, checkpointer


def train_one_step(model, optimizer) -> None:
    model(torch.randn(3, 4)).square().sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def saved_steps(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "checkpoints").iterdir())


def test_a_checkpoint_is_written_when_due_and_latest_names_the_newest_whole_one(tmp_path):
    model, optimizer, counter, checkpointer = tiny_run(tmp_path, every=2)
    for step in range(1, 6):
        train_one_step(model, optimizer)
        checkpointer.save(step)
    assert saved_steps(tmp_path) == ["latest", "step-0000002", "step-0000004"]
    assert checkpointer.folder.latest_name() == "step-0000004"
    checkpointer.save(5, force=True)  # after a signal: a checkpoint whatever the cadence, once
    checkpointer.save(5, force=True)
    assert saved_steps(tmp_path) == ["latest", "step-0000002", "step-0000004", "step-0000005"]
    state = json.loads((tmp_path / "checkpoints" / "step-0000005" / "training_state.json").read_text())
    assert state["step"] == 5 and state["layout"] == {"per_device_train_batch_size": 4, "processes": 1,
                                                      "gradient_accumulation_steps": 1}  # fmt: skip
    for name, (size, digest) in state["files"].items():  # the manifest: every file at its size and checksum
        assert (tmp_path / "checkpoints" / "step-0000005" / name).stat().st_size == size
        assert manifest.sha256_of(tmp_path / "checkpoints" / "step-0000005" / name) == digest
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()}
    assert len(set(modes.values())) == 1, modes  # (safetensors writes its files 0600, the others are 0644)


def test_a_second_ctrl_c_during_a_save_leaves_no_partial_checkpoint_and_latest_as_it_was(tmp_path, monkeypatch):
    model, optimizer, counter, checkpointer = tiny_run(tmp_path, every=1)
    train_one_step(model, optimizer)
    checkpointer.save(1)
    real_save_state = checkpointer.accelerator.save_state

    def interrupted_save_state(folder):
        real_save_state(folder)  # the files are written, the manifest not yet
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpointer.accelerator, "save_state", interrupted_save_state)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save(2)
    assert saved_steps(tmp_path) == ["latest", "step-0000001"]
    assert checkpointer.folder.latest_name() == "step-0000001"


def test_only_the_newest_checkpoints_are_kept_and_never_the_one_latest_names(tmp_path):
    model, optimizer, counter, checkpointer = tiny_run(tmp_path, every=1, keep=2)
    for step in range(1, 5):
        train_one_step(model, optimizer)
        checkpointer.save(step)
    assert saved_steps(tmp_path) == ["latest", "step-0000003", "step-0000004"]
    _, _, _, never = tiny_run(tmp_path / "never", every=None)
    never.save(1)
    assert not (tmp_path / "never" / "checkpoints").exists()  # --checkpointing_steps not given: none


def test_restore_brings_back_the_weights_the_optimizer_the_parts_and_the_recipes_state(tmp_path):
    model, optimizer, counter, checkpointer = tiny_run(tmp_path, every=2)
    for _ in (1, 2):
        train_one_step(model, optimizer)
    counter.value = 7
    checkpointer.save(2, {"epoch": 1, "order": torch.tensor([3, 1, 2])})
    weights = [p.detach().clone() for p in model.parameters()]
    moments = [v["exp_avg"].clone() for v in optimizer.optimizer.state.values()]
    for step in (3, 4):  # a timeline that the resume abandons
        train_one_step(model, optimizer)
        checkpointer.save(step)

    resume = checkpointing.Resume.find(str(tmp_path / "checkpoints" / "step-0000002"), None, "test")
    model, optimizer, counter, checkpointer = tiny_run(tmp_path, every=2)
    assert checkpointer.restore(resume) == {"epoch": 1, "order": [3, 1, 2]}
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), weights, strict=True))
    assert all(torch.equal(v["exp_avg"], m) for v, m in zip(optimizer.optimizer.state.values(), moments, strict=True))
    assert counter.value == 7
    assert saved_steps(tmp_path)[1:] == ["latest", "step-0000002"]
    [aside] = (tmp_path / "checkpoints").glob("abandoned-*")
    assert sorted(p.name for p in aside.iterdir()) == ["step-0000004"]  # moved aside, never deleted
    assert checkpointer.folder.latest_name() == "step-0000002"


def test_another_layout_resumes_with_the_same_global_batch_and_refuses_another(tmp_path, capsys):
    from accelerate import Accelerator
    from messages import show_messages

    model, optimizer, counter, checkpointer = tiny_run(tmp_path, every=1)  # 4 per device x 1 x 1
    train_one_step(model, optimizer)
    checkpointer.save(1)
    folder = checkpointing.CheckpointFolder(tmp_path / "checkpoints")
    resume = checkpointing.Resume.find("latest", folder, "test")
    assert resume.step == 1 and resume.layout.global_batch == 4
    assert resume.accumulation_keeping_global_batch(2, 1) == 2
    assert resume.accumulation_keeping_global_batch(1, 2) == 2
    assert resume.accumulation_keeping_global_batch(3, 1) is None  # 4 is not a multiple of 3
    accelerator = Accelerator(cpu=True)
    show_messages(accelerator)
    resume.check(accelerator, checkpointing.Layout(2, 1, 2), "test")
    assert "resuming on 2 per device x 1 process(es) x 2 accumulation" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        resume.check(accelerator, checkpointing.Layout(2, 1, 1), "test")
    assert exit_info.value.code == 2
    assert "written with a global batch of 4 (4 per device x 1 process(es) x 1 accumulation)" in capsys.readouterr().err
    assert checkpointing.Resume.find("latest", checkpointing.CheckpointFolder(tmp_path / "none"), "test") is None


@pytest.mark.faults  # kill-and-resume: with the fault matrix (`make test-faults`, .ci/run's second step)
@pytest.mark.xdist_group("gpt-2")  # with the other tests of the same reference run: it is made once per worker
def test_killed_gpt_run_resumed_from_latest_checkpoint_ends_bitwise_equal(tmp_path, token_cache, uninterrupted):
    """2 processes. (One process resumes exactly too: the preemption test below, gpt-pretrain-1-SIGUSR1.)"""
    procs = 2
    whole, killed = uninterrupted("gpt-pretrain", procs), tmp_path / "killed"
    # Checkpoints at steps 25, 50, ..., between log steps (every 10): each rank's losses not yet logged come back.
    checkpointing = ["--checkpointing_steps", "25", "--checkpoints_total_limit", "2"]
    run_and_kill_after_first_checkpoint(
        "gpt-pretrain", procs, gpt_resumable_args(killed, token_cache, *checkpointing), killed
    )
    run_to_the_end(
        "gpt-pretrain",
        procs,
        gpt_resumable_args(killed, token_cache, *checkpointing, "--resume_from_checkpoint", "latest"),
    )

    assert torch.equal(saved_parameters(killed), saved_parameters(whole))
    assert logged_curve(killed) == logged_curve(whole)
    checkpoints = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert checkpoints == ["latest", "step-0000075", "step-0000100"]  # --checkpoints_total_limit 2, nothing partial
    assert (killed / "checkpoints" / "latest").read_text() == "step-0000100"


@pytest.mark.faults  # kill-and-resume: with the fault matrix (`make test-faults`, .ci/run's second step)
def test_killed_local_sgd_run_resumed_from_latest_checkpoint_ends_bitwise_equal(tmp_path, token_cache):
    """Under Local SGD the replicas' optimizer moments differ between averages: each rank saves and gets back its
    own. (Checkpoints at multiples of K, as the uninterrupted run averages only there.) The run kit does this for
    both recipes alike; gpt-pretrain shows it."""
    recipe, local_sgd, every = "gpt-pretrain", "4", "20"

    def args(out, *extra):
        return gpt_resumable_args(out, token_cache, *extra)

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run_to_the_end(recipe, 2, args(whole, "--local_sgd_steps", local_sgd))
    checkpointing = ["--local_sgd_steps", local_sgd, "--checkpointing_steps", every]
    run_and_kill_after_first_checkpoint(recipe, 2, args(killed, *checkpointing), killed)
    first = killed / "checkpoints" / f"step-{int(every):07d}"
    assert sorted(p.name for p in first.glob("optimizer_rank_*.bin")) == [
        "optimizer_rank_0.bin",
        "optimizer_rank_1.bin",
    ]
    run_to_the_end(recipe, 2, args(killed, *checkpointing, "--resume_from_checkpoint", "latest"))

    assert torch.equal(saved_parameters(killed), saved_parameters(whole))
    assert logged_curve(killed) == logged_curve(whole)


@pytest.mark.faults  # kill-and-resume: with the fault matrix (`make test-faults`, .ci/run's second step)
@pytest.mark.parametrize(
    ("procs", "checkpointing_steps", "first_checkpoint"),
    # On 2 processes the checkpoint (step 3) falls between log steps (every 2): each rank's losses not yet logged
    # must come back to that rank.
    # The xdist groups keep the tests of one reference run (the `uninterrupted` fixture) on one worker.
    # (One process, mid-epoch: the preemption test below, glue-bert-1-SIGTERM, resumes there.)
    [
        pytest.param(2, "3", "step-0000003", marks=pytest.mark.xdist_group("glue-2")),
        pytest.param(1, "epoch", "step-0000012", marks=pytest.mark.xdist_group("glue-1")),
    ],
    ids=["2-processes-mid-epoch", "1-process-epoch"],
)
def test_killed_glue_run_resumed_from_latest_checkpoint_ends_bitwise_equal(
    tmp_path, uninterrupted, procs, checkpointing_steps, first_checkpoint
):
    whole, killed = uninterrupted("glue-bert", procs), tmp_path / "killed"
    checkpointing = ["--checkpointing_steps", checkpointing_steps]
    run_and_kill_after_first_checkpoint("glue-bert", procs, glue_resumable_args(killed, *checkpointing), killed)
    state = json.loads((killed / "checkpoints" / first_checkpoint / "training_state.json").read_text())
    if checkpointing_steps != "epoch":  # killed in the middle of the first epoch
        assert state["recipe"]["epoch"] == 0 and 0 < state["recipe"]["epoch_step"] < {1: 12, 2: 6}[procs]
    resumed = glue_resumable_args(killed, *checkpointing, "--resume_from_checkpoint", "latest")
    run_to_the_end("glue-bert", procs, resumed)

    assert torch.equal(saved_parameters(killed), saved_parameters(whole))
    assert logged_curve(killed) == logged_curve(whole)
    assert (killed / "eval_predictions.tsv").read_text() == (whole / "eval_predictions.tsv").read_text()
    whole_results = json.loads((whole / "all_results.json").read_text())
    killed_results = json.loads((killed / "all_results.json").read_text())
    for key in ("eval_accuracy", "eval_f1", "eval_loss", "train_loss", "optimizer_steps", "epochs"):
        assert killed_results[key] == whole_results[key], key


def test_resume_from_latest_with_no_checkpoint_starts_fresh_and_a_bad_path_is_refused(tmp_path, token_cache, capsys):
    recipe = load_recipe("gpt_pretrain")
    args = gpt_resumable_args(
        tmp_path / "run", token_cache, "--max_train_steps", "3", "--resume_from_checkpoint", "latest"
    )
    assert recipe.main(args)["optimizer_steps"] == 3
    not_a_checkpoint = tmp_path / "empty"
    not_a_checkpoint.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        recipe.main(
            gpt_resumable_args(tmp_path / "other", token_cache, "--resume_from_checkpoint", str(not_a_checkpoint))
        )
    assert exit_info.value.code == 2
    assert "is not a gpt-pretrain checkpoint" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "all_results.json").read_text())["optimizer_steps"] == 3


def fail_on_second(original, matches):
    """`original`, except that its second call for which `matches(*args)` holds raises, as a crash or a full disk
    would at that point."""
    calls = []

    def wrapper(*args, **kwargs):
        if matches(*args):
            calls.append(args)
            if len(calls) == 2:
                raise RuntimeError("unexpected pos 1454016 vs 1453904 (injected)")
        return original(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("point", ["in save_state", "before the manifest", "before the rename", "before latest"])
def test_a_save_that_fails_at_any_point_leaves_latest_whole_and_the_resume_exact(tmp_path, token_cache, point,
                                                                                 monkeypatch, capsys):  # fmt: skip
    """Each point of a checkpoint save failed on purpose, at the second save (step 4 of 6): `latest` still names a
    whole checkpoint (step 2), and resuming from it ends bitwise where an uninterrupted run ends."""
    import accelerate
    import checkpointing
    from conftest import reset_accelerate_state

    recipe = load_recipe("gpt_pretrain")
    args = gpt_args(tmp_path / "run", token_cache, "--max_train_steps", "6", "--checkpointing_steps", "2",
                    "--eval_every", "6", "--sample_tokens", "0", "--dropout", "0.1")  # fmt: skip
    recipe.main(gpt_args(tmp_path / "whole", token_cache, *args[-10:]))
    reset_accelerate_state()
    injected = {
        "in save_state": (accelerate.Accelerator, "save_state", lambda *a: True),
        "before the manifest": (Path, "write_text", lambda path, *a: path.name == "training_state.json"),
        "before the rename": (Path, "rename", lambda path, *a: path.name.endswith(".partial")),
        "before latest": (checkpointing.os, "replace", lambda source, target, *a: str(target).endswith("latest")),
    }[point]
    with monkeypatch.context() as patched:
        patched.setattr(injected[0], injected[1], fail_on_second(getattr(injected[0], injected[1]), injected[2]))
        with pytest.raises((RuntimeError, SystemExit)):
            recipe.main(args)
    reset_accelerate_state()
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step-0000002"
    assert json.loads((checkpoints / "step-0000002" / "training_state.json").read_text())["step"] == 2
    if point == "in save_state":  # the failed save says why, and removed what it wrote
        error = capsys.readouterr().err
        assert "could not write checkpoint" in error and "MiB are free on its file system" in error
        assert not (checkpoints / "step-0000004.partial").exists()
    recipe.main([*args, "--resume_from_checkpoint", "latest"])
    assert torch.equal(saved_parameters(tmp_path / "run"), saved_parameters(tmp_path / "whole"))


def fake_checkpoint(folder: Path, files: dict[str, bytes], layout: dict) -> Path:
    """A checkpoint folder with `files` (as FSDP's or DeepSpeed's save_state lays them out) and its own state."""
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    files = {n: [len(d), manifest.sha256_of(folder / n)] for n, d in files.items()}
    state = {"format": checkpointing.CHECKPOINT_FORMAT, "step": 4, "layout": layout, "per_process_optimizer": False,
             "parts": {}, "recipe": {}, "files": files, "written_by": {"recipe": "gpt-pretrain", "run": "run-a"},
             "fit": {}, "final": False}  # fmt: skip
    (folder / "training_state.json").write_text(json.dumps(state))
    return folder


def tensors_file() -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save({"step": torch.tensor(4)}, buffer)
    return buffer.getvalue()


LAYOUTS = {
    # FSDP with SHARDED_STATE_DICT, as fsdp.yaml asks: a distributed-checkpoint folder for the model and one for
    # the optimizer (no model.safetensors, no optimizer.bin).
    "fsdp": {"pytorch_model_fsdp_0/__0_0.distcp": b"m" * 300, "pytorch_model_fsdp_0/.metadata": b"x" * 40,
             "optimizer_0/__0_0.distcp": b"o" * 600, "optimizer_0/.metadata": b"y" * 40},
    # DeepSpeed: its engine's own checkpoint folder.
    "deepspeed": {"pytorch_model/mp_rank_00_model_states.pt": b"m" * 300,
                  "pytorch_model/zero_pp_rank_0_mp_rank_00_optim_states.pt": b"o" * 600, "latest": b"pytorch_model"},
}  # fmt: skip


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_resume_checks_the_files_that_fsdp_and_deepspeed_save_state_wrote(tmp_path, layout, capsys):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    files = {**LAYOUTS[layout], "scheduler.bin": tensors_file(), "random_states_0.pkl": tensors_file()}
    batch = {"per_device_train_batch_size": 4, "processes": 1, "gradient_accumulation_steps": 1}
    now = checkpointing.Layout(**batch)
    whole = checkpointing.Resume.find(str(fake_checkpoint(tmp_path / "whole", files, batch)), None, "gpt-pretrain")
    whole.check(accelerator, now, "gpt-pretrain")
    assert whole.step == 4

    cut = fake_checkpoint(tmp_path / "cut", files, batch)
    shard = next(name for name in LAYOUTS[layout] if "optim" in name)
    (cut / shard).write_bytes(b"o" * 100)  # a save cut short
    with pytest.raises(SystemExit):
        checkpointing.Resume.find(str(cut), None, "gpt-pretrain").check(accelerator, now, "gpt-pretrain")
    assert f"is corrupted or incomplete (OSError: {shard} is missing or has another size" in capsys.readouterr().err


def test_resuming_from_an_older_checkpoint_moves_the_newer_ones_aside_and_latest_stays_whole(
    tmp_path, token_cache, capsys
):
    """Issue: pruning kept the last K folders by name, so resuming from step 10 of a run that had 10/20/30 with a
    limit of 1 deleted the new step 20 in favour of the old 30, and `latest` named a folder that was gone."""
    recipe = load_recipe("gpt_pretrain")
    out = tmp_path / "run"
    args = gpt_args(out, token_cache, "--max_train_steps", "35", "--checkpointing_steps", "10", "--sample_tokens", "0")
    recipe.main(args)
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-0000010", "step-0000020", "step-0000030"]
    old_timeline = {p.name: (p / "training_state.json").read_text() for p in checkpoints.glob("step-*")}

    from conftest import reset_accelerate_state

    reset_accelerate_state()
    recipe.main(
        [*args, "--checkpoints_total_limit", "1", "--resume_from_checkpoint", str(checkpoints / "step-0000010")]
    )
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-0000030"]  # this timeline's newest
    assert (checkpoints / "latest").read_text() == "step-0000030"
    assert json.loads((checkpoints / "step-0000030" / "training_state.json").read_text())["step"] == 30
    [aside] = checkpoints.glob("abandoned-*")
    assert {p.name: (p / "training_state.json").read_text() for p in aside.iterdir()} == {
        name: text for name, text in old_timeline.items() if name != "step-0000010"
    }  # the abandoned timeline is kept whole, not deleted
    assert "moved to" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(out) if "eval_loss" in r] == [15, 30, 35]  # no record from the old run


class RunsCode:
    """A pickle that runs a command when unpickled: what a malicious checkpoint file would hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("poisoned", ["optimizer.bin", "random_states_0.pkl"])
def test_a_checkpoint_holding_code_is_refused_without_running_it(tmp_path, token_cache, capsys, poisoned):
    recipe = load_recipe("gpt_pretrain")
    out = tmp_path / "run"
    recipe.main(
        gpt_args(out, token_cache, "--max_train_steps", "2", "--checkpointing_steps", "1", "--sample_tokens", "0")
    )
    reset_accelerate_state()
    checkpoint, marker = out / "checkpoints" / "step-0000001", tmp_path / "code-ran"
    with open(checkpoint / poisoned, "wb") as f:
        pickle.dump({"state": RunsCode(marker)}, f)
    # The attacker also fixes the file's size in the checkpoint's list, so that only loading it can tell.
    state = json.loads((checkpoint / "training_state.json").read_text())

    state["files"][poisoned] = [(checkpoint / poisoned).stat().st_size, manifest.sha256_of(checkpoint / poisoned)]
    (checkpoint / "training_state.json").write_text(json.dumps(state))
    assert pickle.loads((checkpoint / poisoned).read_bytes()) and marker.exists()  # the payload does work...
    marker.unlink()

    with pytest.raises(SystemExit) as exit_info:
        recipe.main(gpt_args(tmp_path / "resumed", token_cache, "--max_train_steps", "2", "--resume_from_checkpoint",
                             str(checkpoint)))  # fmt: skip
    assert exit_info.value.code == 2
    assert "is corrupted or incomplete (UnpicklingError" in capsys.readouterr().err
    assert not marker.exists()  # ...but loading with weights_only=True never ran it


# ---------------------------------------------------------------------------------------------------------------
# Elastic resume: a checkpoint written by K processes continues on K' processes at the same global batch, optimizer
# step, data position and LR schedule, and ends within 1e-5 of the run that never changed (dropout off); with dropout
# on it continues and says that the random stream is a new one. Refused with a message: another global batch, and
# Local SGD's per-process optimizer state on another number of processes (docs/errors.md, tests/test_bad_input.py).


def accel_dp_run_ok(recipe: str, processes: int, args: list[str]) -> None:
    assert accel_dp_run(recipe, processes, args) == 0


STEPS, CHECKPOINT = 20, 10


def elastic_gpt_args(output_dir: Path, token_cache: Path, *extra: str) -> list[str]:
    """20 fp32 steps at a global batch of 8 sequences, however many processes; a checkpoint at step 10."""
    return fp32_gpt_args(output_dir, token_cache, "--max_train_steps", str(STEPS), "--per_device_train_batch_size",
                         "4", "--global_batch_size", "8", "--checkpointing_steps", str(CHECKPOINT), "--eval_every",
                         str(STEPS), *extra)  # fmt: skip


def logged_losses(output_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(output_dir) if "loss" in r]


def assert_same_run(resumed: Path, whole: Path) -> None:
    """The resumed run (in a folder of its own: it logged from its checkpoint on) ends where `whole` ends."""
    assert (saved_parameters(resumed) - saved_parameters(whole)).abs().max() <= 1e-5
    logged = dict(logged_losses(resumed))
    reference = {step: loss for step, loss in logged_losses(whole) if step in logged}
    assert sorted(logged) == sorted(reference) and max(logged) == max(step for step, _ in logged_losses(whole))
    assert [logged[s] for s in sorted(logged)] == pytest.approx([reference[s] for s in sorted(logged)], rel=1e-5)
    results = [json.loads((d / "all_results.json").read_text()) for d in (resumed, whole)]
    # The validation set is eval_iters global batches of windows: the same windows on any layout, whatever the
    # per-device eval batch (the resumed runs below use 3, which does not divide the 16 windows evenly).
    assert abs(results[0]["eval_loss"] - results[1]["eval_loss"]) <= 1e-6


@pytest.mark.slow
def test_gpt_checkpoint_of_two_processes_resumes_on_one_and_one_on_two(tmp_path, token_cache, capsys):
    two = tmp_path / "two"
    accel_dp_run_ok("gpt-pretrain", 2, elastic_gpt_args(two, token_cache))  # the reference; it checkpoints at 10
    checkpoint_of_two = two / "checkpoints" / f"step-{CHECKPOINT:07d}"

    # Fewer processes: 2 -> 1, with 2 accumulation steps for the same global batch (the recipe run directly).
    fewer = tmp_path / "fewer"
    reset_accelerate_state()
    capsys.readouterr()
    load_recipe("gpt_pretrain").main(
        elastic_gpt_args(
            fewer, token_cache, "--resume_from_checkpoint", str(checkpoint_of_two), "--per_device_eval_batch_size", "3"
        )  # fmt: skip
    )
    reset_accelerate_state()
    output = " ".join(capsys.readouterr().out.split())
    assert "written by 4 per device x 2 process(es) x 1 accumulation; resuming on 4 per device x 1 process(es) x 2" in (
        output
    )
    assert "random numbers" not in output  # dropout is off: nothing to say about its stream
    assert_same_run(fewer, two)

    # More processes: 1 -> 2. The one-process run's checkpoint, written in this process.
    one = tmp_path / "one"
    reset_accelerate_state()
    load_recipe("gpt_pretrain").main(elastic_gpt_args(one, token_cache))
    reset_accelerate_state()
    more = tmp_path / "more"
    checkpoint_of_one = one / "checkpoints" / f"step-{CHECKPOINT:07d}"
    more_args = elastic_gpt_args(more, token_cache, "--resume_from_checkpoint", str(checkpoint_of_one),
                                 "--per_device_eval_batch_size", "3")  # fmt: skip
    accel_dp_run_ok("gpt-pretrain", 2, more_args)
    assert_same_run(more, two)
    assert_same_run(one, two)  # (and the uninterrupted runs agree: K processes at B = 1 process at K x B)


def test_gpt_resume_with_dropout_on_another_layout_continues_and_says_the_random_stream_is_new(
    tmp_path, token_cache, capsys
):
    """The same global batch split another way (here 2 x 4 accumulation instead of 4 x 2, one process): dropout's
    masks cannot be carried over, so the run continues with a new, seeded stream, and says so."""
    recipe = load_recipe("gpt_pretrain")
    first = elastic_gpt_args(tmp_path / "first", token_cache, "--dropout", "0.1")
    recipe.main(first)
    reset_accelerate_state()
    capsys.readouterr()
    checkpoint = tmp_path / "first" / "checkpoints" / f"step-{CHECKPOINT:07d}"
    other = elastic_gpt_args(tmp_path / "other", token_cache, "--dropout", "0.1", "--per_device_train_batch_size", "2",
                "--resume_from_checkpoint", str(checkpoint))  # fmt: skip
    results = recipe.main(other)
    out = " ".join(capsys.readouterr().out.split())
    assert "resuming on 2 per device x 1 process(es) x 4 accumulation" in out
    assert "random numbers (dropout) continue from a new stream" in out
    assert results["optimizer_steps"] == STEPS and results["gradient_accumulation_steps"] == 4
    assert [step for step, _ in logged_losses(tmp_path / "other")] == list(range(CHECKPOINT + 1, STEPS + 1))
    lr = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "other") if "lr" in r}
    lr_first = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "first") if "lr" in r}
    assert lr == pytest.approx({step: lr_first[step] for step in lr})  # the same schedule, step for step


# 37 MRPC pairs, a global batch of 8 (the last step of the epoch holds 5), 2 epochs, dropout off: 10 steps, a
# checkpoint mid-epoch at step 3.
ELASTIC_GLUE = ("--num_train_epochs", "2", "--dropout", "0", "--mixed_precision", "no", "--global_batch_size", "8",
                "--learning_rate", "1e-4", "--checkpointing_steps", "3")  # fmt: skip


@pytest.mark.slow
def test_glue_checkpoint_of_two_processes_resumes_on_one_mid_epoch(tmp_path):
    """GLUE's order of global batches does not depend on the number of processes (one shuffle, the same global
    batch, each step's loss weighted by its real examples): mid-epoch, 2 -> 1 ends where 2 processes end."""
    two = tmp_path / "two"
    accel_dp_run_ok("glue-bert", 2, glue_args(two, *ELASTIC_GLUE))
    one = tmp_path / "one"
    reset_accelerate_state()
    checkpoint = two / "checkpoints" / "step-0000003"
    load_recipe("glue_bert").main(glue_args(one, *ELASTIC_GLUE, "--resume_from_checkpoint", str(checkpoint)))
    reset_accelerate_state()
    assert json.loads((one / "all_results.json").read_text())["optimizer_steps"] == 10
    assert_same_run(one, two)
    assert (one / "eval_predictions.tsv").read_text() == (two / "eval_predictions.tsv").read_text()
