"""Resumable checkpoints in <output_dir>/checkpoints/step-N, and resuming from them exactly, also on another layout.

A checkpoint is accelerate's save_state (model, optimizer, LR schedule, every process's RNG state) plus
training_state.json: the step, the batch layout that wrote it, the state of the run's other parts (the meter's
unlogged window, the non-finite policy's count), the recipe's own state, and the size and SHA-256 of every file
save_state wrote (so any layout, DDP's, FSDP's or DeepSpeed's, is checked whole).

    CheckpointFolder   the folder: step-N checkpoints, `latest`, pruning, abandoned timelines set aside
    Resume             the checkpoint to resume from: found and read before the Accelerator is made (its global
                       batch sets the accumulation steps), checked on every process before any work
    Checkpointer       saves when one is due, and restores a Resume into the prepared objects

A save is written into step-N.partial and renamed into place; `latest` is replaced atomically; old checkpoints are
pruned only after a new one is whole, and never the one `latest` names. So a kill at any moment leaves the previous
checkpoint whole. Checkpoints newer than the one resumed from belong to an abandoned timeline: moved aside, never
deleted.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import NamedTuple, NoReturn

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, load, set_seed
from faults import fail, stop, undone_if_leaving
from manifest import check_manifest, manifest_of
from messages import first_line, logger
from run_folder import no_room, with_usual_mode
from safetensors import safe_open

CHECKPOINT_FORMAT = 3  # training_state.json's layout; other formats are refused with a message


class Layout(NamedTuple):
    """How a global batch is split: per-device batch x processes x accumulation steps."""

    per_device_train_batch_size: int
    processes: int
    gradient_accumulation_steps: int

    @property
    def global_batch(self) -> int:
        return math.prod(self)

    def describe(self) -> str:
        return (
            f"{self.per_device_train_batch_size} per device x {self.processes} process(es) x "
            f"{self.gradient_accumulation_steps} accumulation"
        )


class CheckpointFolder:
    """<output_dir>/checkpoints: the step-N checkpoints, `latest` (the name of the newest whole one), and the
    abandoned-* folders that hold timelines a resume left behind."""

    def __init__(self, root: Path):
        self.root = root

    def latest_name(self) -> str | None:
        pointer = self.root / "latest"
        return pointer.read_text().strip() if pointer.is_file() else None

    def latest(self) -> Path | None:
        name = self.latest_name()
        return self.root / name if name else None

    def point_latest_to(self, checkpoint: Path) -> None:
        (self.root / "latest.partial").write_text(checkpoint.name)
        os.replace(self.root / "latest.partial", self.root / "latest")  # atomic: latest names a whole checkpoint

    @staticmethod
    def step_of(path: Path) -> int:
        name = path.name.removeprefix("step-")
        return int(name) if name.isdigit() else -1

    def complete(self) -> list[Path]:
        """The whole checkpoints, oldest first (a step-N.partial is not one)."""
        found = self.root.glob("step-*") if self.root.is_dir() else []
        return sorted((p for p in found if self.step_of(p) >= 0), key=self.step_of)

    def prune(self, keep: int | None, newest: Path) -> None:
        """Keep the newest `keep` checkpoints (all when None), and `newest` whatever its place."""
        for old in self.complete()[:-keep] if keep else []:
            if old != newest:
                shutil.rmtree(old)

    def set_aside_newer_than(self, step: int) -> str | None:
        """Move the checkpoints past `step` into abandoned-<time>, and point `latest` at the newest left. Returns a
        line saying what moved where, or None when nothing was newer."""
        newer = [p for p in self.complete() if self.step_of(p) > step]
        if not newer:
            return None
        aside = self.root / f"abandoned-{datetime.now():%Y%m%d-%H%M%S}"
        aside.mkdir()
        for folder in newer:
            folder.rename(aside / folder.name)
        if kept := self.complete():  # `latest` never names a folder that is gone
            self.point_latest_to(kept[-1])
        else:
            (self.root / "latest").unlink(missing_ok=True)
        return f"the newer checkpoints ({', '.join(sorted(p.name for p in newer))}) moved to {aside}"


class Resume:
    """The checkpoint a run continues from, and what it recorded."""

    def __init__(self, path: Path, state: dict):
        self.path, self.state = path, state
        self.step: int = state["step"]
        self.layout = Layout(**state["layout"])
        self.run: str = state["written_by"]["run"]
        self.nodes: int = state["written_by"].get("nodes", 1)  # the machines it was written on
        self.fit: dict = state["fit"]

    @classmethod
    def find(cls, spec: str | None, folder: CheckpointFolder | None, recipe: str) -> Resume | None:
        """--resume_from_checkpoint: a checkpoint folder, or `latest` of `folder` (None when there is none yet, or no
        folder: a fresh start). A path that is not a checkpoint, or one that cannot be read, is refused."""
        if spec is None or (spec == "latest" and (folder is None or folder.latest() is None)):
            return None
        path = folder.latest() if spec == "latest" else Path(spec)
        if not path.is_dir():
            fail(
                f"--resume_from_checkpoint: {path} does not exist; give a checkpoint folder "
                "(<output_dir>/checkpoints/step-N) or `latest`"
            )
        if not (path / "training_state.json").is_file():
            fail(f"{path} is not a {recipe} checkpoint (no training_state.json): give a checkpoint folder or `latest`")
        try:
            state = json.loads((path / "training_state.json").read_text())
        except (OSError, ValueError) as e:
            fail(corrupted(path, e))
        written = state.get("format", 1) if isinstance(state, dict) else None
        if written != CHECKPOINT_FORMAT:
            fail(
                f"{path} was written by {'an older' if (written or 0) < CHECKPOINT_FORMAT else 'a newer'} version of "
                f"this recipe (checkpoint format {written}, this one reads {CHECKPOINT_FORMAT}): resume it with the "
                "version that wrote it, or start a new run"
            )
        try:
            return cls(path, state)
        except (KeyError, TypeError) as e:
            fail(corrupted(path, e))

    def accumulation_keeping_global_batch(self, per_device_batch: int, processes: int) -> int | None:
        """The accumulation steps that give this checkpoint's global batch on another layout, if any do."""
        per_round = per_device_batch * processes
        return self.layout.global_batch // per_round if self.layout.global_batch % per_round == 0 else None

    def check(self, accelerator: Accelerator, now: Layout, recipe: str) -> None:
        """On every process, before any work: the checkpoint is this recipe's, its files are whole and load, and this
        run can continue it (the same global batch; Local SGD's per-process moments on as many processes). One line
        otherwise."""
        writer = self.state["written_by"]["recipe"]
        if writer != recipe:
            fail(f"{self.path} is a {writer} checkpoint, and this is {recipe}: give one of {recipe}'s checkpoints")
        try:
            verify_files(self.path, self.state["files"], accelerator.process_index)
            problem = self._layout_problem(now)
        except Exception as e:  # a truncated or overwritten file: say which checkpoint, suggest an older one
            problem = corrupted(self.path, e)
        problems = [p for p in gather_object([problem]) if p]
        if problems:
            fail(problems[0])
        if now != self.layout:
            logger.info(
                f"{recipe}: the checkpoint was written by {self.layout.describe()}; resuming on {now.describe()}: "
                "the same global batches, optimizer step and LR schedule"
            )

    def check_steps(self, max_train_steps: int) -> None:
        """A checkpoint at or past the last step has nothing left to train: refused, not reported as a success (but
        one of the final state, written when the final model could not be, goes on to save the model)."""
        if self.step > max_train_steps or (self.step == max_train_steps and not self.state["final"]):
            fail(
                f"{self.path} is at step {self.step}, and the run ends at step {max_train_steps}: nothing to train; "
                "raise --max_train_steps (or --num_train_epochs) to go on"
            )

    def check_same_run(self, owner: dict | None, output_dir: Path) -> None:
        """`latest` continues the run its folder belongs to (`owner`, from run.json), never one whose files another
        run has replaced."""
        if owner and owner["run"] != self.run:
            fail(
                f"{self.path} belongs to run {self.run}, and {output_dir} now to run {owner['run']} (started "
                f"{owner.get('started', '?')}): give the checkpoint's path to continue the earlier run"
            )

    def check_fit(self, fit: dict) -> None:
        """The model and data this run built are the ones the checkpoint was trained with (its shape, its tokenizer):
        refused otherwise, before any file of the run is touched."""
        differs = [
            f"{key} {self.fit.get(key)!r} there, {fit.get(key)!r} here"
            for key in sorted({*fit, *self.fit})
            if fit.get(key) != self.fit.get(key)
        ]
        if differs:
            fail(
                f"{self.path} does not fit this run: {'; '.join(differs[:4])}: resume with the flags that wrote it "
                "(run_args.json of its run), or start a new run in another --output_dir"
            )

    def _layout_problem(self, now: Layout) -> str | None:
        saved = self.layout
        if saved.global_batch != now.global_batch:
            return (
                f"{self.path} was written with a global batch of {saved.global_batch} ({saved.describe()}) and this "
                f"run's is {now.global_batch} ({now.describe()}): resume with --global_batch_size {saved.global_batch}"
            )
        if self.state["per_process_optimizer"] and saved.processes != now.processes:
            return (
                f"{self.path} holds Local SGD's optimizer state of {saved.processes} processes, one each: resume it "
                f"on {saved.processes} processes"
            )
        return None


def fit_of(model) -> dict:
    """What a checkpoint's model must match to resume into this one: its class and its configuration's sizes (layers,
    widths, heads, vocabulary, positions, labels)."""
    config = model.config.to_dict()
    sizes = {key: value for key, value in config.items() if type(value) is int}
    return {"model": type(model).__name__, **sizes, "labels": len(config.get("id2label") or {})}


def corrupted(path: Path, error: BaseException) -> str:
    return (
        f"checkpoint {path} is corrupted or incomplete ({type(error).__name__}: {first_line(error)}); resume from an "
        f"earlier one in {path.parent}"
    )


def verify_files(path: Path, files: dict[str, list], process_index: int) -> None:
    """Every file save_state wrote is there at its size and with its SHA-256; pickles load with weights_only (one
    holding code is refused, never run), safetensors headers parse. (accelerate's load_state would skip an unreadable
    RNG file silently, and resume inexactly.)"""
    check_manifest(path, files)
    for name in files:
        file = path / name
        if file.suffix in (".bin", ".pkl") and not name.startswith("random_states_"):
            load(file, map_location="cpu")
        elif file.suffix == ".safetensors":
            with safe_open(file, "pt") as tensors:
                tensors.keys()
    own_rng = path / f"random_states_{process_index}.pkl"
    if own_rng.is_file():
        load(own_rng)


class Checkpointer:
    """Saves a checkpoint when one is due (`every`: a number of optimizer steps, `epoch`, or None for never), keeps
    the newest `keep`, and restores one. `parts`: the run's other stateful pieces by name, each with state_dict() and
    load_state_dict(); their state goes into training_state.json. `paused("checkpoint")` is held while a save runs
    (the meter leaves it out of the throughput). Every process must call save and restore."""

    def __init__(
        self,
        accelerator: Accelerator,
        folder: CheckpointFolder,
        *,
        recipe: str,
        run_id: str,
        fit: dict,
        layout: Layout,
        nodes: int = 1,
        every: int | str | None,
        keep: int | None,
        model,
        optimizer,
        local_sgd,
        parts: dict,
        seed: int,
        paused: Callable[[str], contextlib.AbstractContextManager],
    ):
        self.accelerator, self.folder, self.recipe, self.layout = accelerator, folder, recipe, layout
        self.run_id, self.fit, self.nodes = run_id, fit, nodes
        self.every, self.keep, self.seed, self.paused = every, keep, seed, paused
        self.model, self.optimizer, self.local_sgd, self.parts = model, optimizer, local_sgd, parts
        self.last_saved: int | None = None

    def due(self, step: int, epoch_end: bool = False) -> bool:
        return (isinstance(self.every, int) and step % self.every == 0) or (self.every == "epoch" and epoch_end)

    def save(
        self, step: int, recipe_state: dict | None = None, epoch_end: bool = False, force: bool = False, final=False
    ) -> None:
        """A checkpoint if one is due at this step, or if `force`. `recipe_state`: the recipe's own, JSON-serialisable
        (tensors become lists), given back by restore. `final`: the end of training, when the model could not be
        saved (a resume saves it)."""
        if step == self.last_saved or not (force or self.due(step, epoch_end)):
            return
        staging = self.folder.root / f"step-{step:07d}.partial"
        try:
            with self.paused("checkpoint"):
                self._save(step, recipe_state or {}, final)
        except KeyboardInterrupt:  # a second Ctrl-C: stopped at once, and nothing half-written is kept
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self.last_saved = step

    def _save(self, step: int, recipe_state: dict, final: bool) -> None:
        accelerator = self.accelerator
        is_final, final = final, self.folder.root / f"step-{step:07d}"
        staging = self.folder.root / f"step-{step:07d}.partial"
        self.local_sgd.average()  # rank 0's model is what is saved: make it the replicas' mean
        parts = {name: part.state_dict() for name, part in self.parts.items()}  # collectives: on every process
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)  # the leftover of a save that was killed
        accelerator.wait_for_everyone()
        # A process that leaves mid-save (its own failure, or a peer's: the collective after it fails) removes what
        # is there: a peer may write its files after the failing process removed the folder.
        with undone_if_leaving(lambda: shutil.rmtree(staging, ignore_errors=True)):
            try:
                accelerator.save_state(str(staging))  # every process writes its own RNG state
            except Exception as error:  # a full disk shows as torch's "unexpected pos ..." as often as ENOSPC
                self._failed_save(staging, final, error)
            if self.local_sgd.enabled:  # each replica's optimizer moments (save_state keeps rank 0's only)
                torch.save(self.optimizer.state_dict(), staging / f"optimizer_rank_{accelerator.process_index}.bin")
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                try:
                    self._publish(staging, final, step, parts, recipe_state, is_final)
                except OSError as error:  # the manifest or `latest`: the checkpoint is not whole, and is not named
                    (self.folder.root / "latest.partial").unlink(missing_ok=True)
                    self._failed_save(staging, final, error)  # (renamed into place already, it is whole: kept)
            accelerator.wait_for_everyone()
        logger.info(f"{self.recipe}: checkpoint {final}")

    def _publish(self, staging: Path, final: Path, step: int, parts: dict, recipe_state: dict, is_final: bool) -> None:
        """The manifest written last, the folder renamed into place, `latest` pointed at it, old ones pruned."""
        written = sorted(p for p in staging.rglob("*") if p.is_file())
        for file in written:
            with_usual_mode(file)
        files = manifest_of(staging, written)
        state = {
            "format": CHECKPOINT_FORMAT,
            "written_by": {"recipe": self.recipe, "run": self.run_id, "nodes": self.nodes},
            "fit": self.fit,
            "step": step,
            "final": is_final,
            "layout": self.layout._asdict(),
            "per_process_optimizer": self.local_sgd.enabled,
            "parts": parts,
            "recipe": {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in recipe_state.items()},
            "files": files,
        }
        (staging / "training_state.json").write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        self.folder.point_latest_to(final)
        self.folder.prune(self.keep, newest=final)

    def _failed_save(self, staging: Path, final: Path, error: Exception) -> NoReturn:
        """Remove what the save wrote (the previous checkpoint and `latest` are untouched), and say why it failed:
        the space a checkpoint takes (the last one's size, or the model's) against the space there is."""
        shutil.rmtree(staging, ignore_errors=True)
        previous = self.folder.latest()
        size = sum(p.stat().st_size for p in previous.rglob("*") if p.is_file()) if previous else 0
        size = size or 12 * sum(p.numel() for p in self.model.parameters())
        stop(
            f"{no_room(f'checkpoint {final}', self.folder.root, size, error)}. The partial checkpoint was removed and "
            f"the last whole one kept ({previous.name if previous else 'none yet'}): free some space, then resume "
            "with --resume_from_checkpoint latest"
        )

    def keep_final_state(self, step: int, recipe_state: dict | None, failure: str) -> NoReturn:
        """The final model could not be written: the training is kept in a checkpoint of the final state (unless one
        is there already), and the run ends with a line saying which it was."""
        last = self.folder.latest()
        if last is None or self.folder.step_of(last) != step:
            logger.warning(f"{failure}; writing a checkpoint of the final state instead")
            self.save(step, recipe_state, force=True, final=True)
            last = self.folder.latest()
        stop(
            f"{failure}. The trained state is kept in checkpoint {last}: free some space, then run the same command "
            "with --resume_from_checkpoint latest to write the model"
        )

    def restore(self, resume: Resume) -> dict:
        """Restore `resume` into the prepared objects and the parts. Returns the recipe's own saved state."""
        accelerator = self.accelerator
        if accelerator.is_main_process and (moved := self.folder.set_aside_newer_than(resume.step)):
            logger.info(f"{self.recipe}: resuming from step {resume.step}; {moved}")
        accelerator.wait_for_everyone()
        accelerator.load_state(str(resume.path))
        if resume.layout != self.layout:
            # load_state brought back the writer's micro-batch count, which places accumulation windows; with other
            # accumulation steps it would close this run's first window early. A checkpoint is taken at an optimizer
            # step's boundary: count afresh. (accelerate 1.15 has no public setter for it.)
            accelerator.step = 0
            # The saved RNG states belong to other processes: a new stream, the same on every rerun.
            set_seed(self.seed + resume.step, device_specific=True)
            if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in self.model.modules()):
                logger.info(
                    f"{self.recipe}: random numbers (dropout) continue from a new stream: they cannot be carried over "
                    "exactly to another layout"
                )
        if self.local_sgd.enabled:
            own = resume.path / f"optimizer_rank_{accelerator.process_index}.bin"
            if own.is_file():  # this replica's moments, not rank 0's (they differ between averages)
                self.optimizer.load_state_dict(load(own, map_location="cpu"))
            else:
                logger.warning(f"{resume.path} has no per-process optimizer state: every process resumes with rank 0's")
        for name, part in self.parts.items():
            part.load_state_dict(resume.state["parts"][name])
        logger.info(f"{self.recipe}: resumed from {resume.path} at step {resume.step}")
        return resume.state["recipe"]
