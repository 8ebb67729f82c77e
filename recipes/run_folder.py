"""The run's output folder: naming it, holding it for one run, checking before the first step that it can hold what
the run will write, and writing into it so that every file is whole or absent (the model and tokenizer in Hugging
Face format, strict-JSON results, a line of the log).

A run holds <output_dir>/run.lock (a heartbeat lock: heartbeat_lock.py) while it runs, and run.json names the run
the folder belongs to (its id goes into every checkpoint). A fresh start in a folder that holds an earlier run's
files moves them into overwritten-<time>/, never deletes them. A write that fails (a full disk) ends the run with one
line naming the file, the space it needed and the space free; what was half-written is removed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import socket
import tempfile
import uuid
from datetime import datetime
from pathlib import Path
from typing import NoReturn

from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list, gather_object
from faults import before_leaving, fail, stop
from heartbeat_lock import HeartbeatLock
from messages import first_line, logger
from training import no_transformers_progress_bars

# The process's umask, read once at import, while no other thread can create a file (reading it means setting it).
UMASK = os.umask(0)
os.umask(UMASK)

LOCK_NAME, IDENTITY_NAME, SET_ASIDE_PREFIX = "run.lock", "run.json", "overwritten-"


def output_folder(output_dir: str | None, default_name: str, may_hold_files: bool) -> Path:
    """The run's folder, named on the main process and shared (each rank's clock could tick to another second). A run
    never writes into an earlier run's folder unless asked to (`may_hold_files`: --overwrite_output_dir,
    --resume_from_checkpoint). Every process must call it."""
    name = [output_dir or os.path.join("runs", f"{default_name}-{datetime.now():%Y%m%d-%H%M%S}")]
    broadcast_object_list(name)
    folder = Path(name[0])
    if folder.exists() and not folder.is_dir():
        fail(f"--output_dir {folder} is a file: choose a folder")
    problem = [in_use(folder) if PartialState().is_main_process else None]  # before the data and the model
    broadcast_object_list(problem)
    if problem[0]:
        fail(problem[0])
    if folder.is_dir() and any(folder.iterdir()) and not may_hold_files:
        fail(
            f"--output_dir {folder} already holds files: choose a new folder, pass --overwrite_output_dir, or "
            "continue it with --resume_from_checkpoint latest"
        )
    return folder


def in_use(folder: Path) -> str | None:
    """Why this folder cannot be run in now: another run holds its lock (None when none does)."""
    holder = HeartbeatLock(folder / LOCK_NAME).holder()
    if holder is None or holder.gone or holder.who == f"{socket.gethostname()}:{os.getpid()}":
        return None
    return (
        f"--output_dir {folder} is in use by another run ({holder.describe()}): wait for it to end, or choose "
        "another --output_dir"
    )


def new_run_id() -> str:
    """A fresh run's identity, the same on every process (each would draw its own). Every process must call it."""
    run_id = [f"{datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:8]}"]
    broadcast_object_list(run_id)
    return run_id[0]


def command_of(settings: dict) -> str:
    """A fingerprint of a run's flags (all but --resume_from_checkpoint): a requeued job repeats them exactly."""
    flags = {key: value for key, value in settings.items() if key != "resume_from_checkpoint"}
    return hashlib.sha256(json.dumps(flags, sort_keys=True, default=str).encode()).hexdigest()[:16]


def checkpoint_to_resume(settings: dict) -> str | None:
    """--resume_from_checkpoint, but with --overwrite_output_dir, `latest` continues only a run of this very command
    (a requeue of it): any other run's files are set aside (hold_folder), and this one starts afresh."""
    spec, output_dir = settings["resume_from_checkpoint"], settings["output_dir"]
    if spec != "latest" or not settings["overwrite_output_dir"]:
        return spec
    owner = folder_run(Path(output_dir)) if output_dir else None
    return spec if owner is not None and owner.get("command") == command_of(settings) else None


def folder_run(folder: Path) -> dict | None:
    """What run.json says of the run this folder belongs to (None without one, or one that cannot be read)."""
    try:
        identity = json.loads((folder / IDENTITY_NAME).read_text())
    except (OSError, ValueError):
        return None
    return identity if isinstance(identity, dict) and "run" in identity else None


def hold_folder(
    accelerator: Accelerator, folder: Path, run_id: str, recipe: str, command: str, fresh: bool
) -> HeartbeatLock:
    """Create the folder and take its lock for this run (released when the process leaves, or earlier with the lock's
    release()), on the main process; another run holding it is refused. On a fresh start, an earlier run's files are
    moved aside. Every process must call it."""
    group = os.environ.get("TORCHELASTIC_RUN_ID", "none")  # (torchrun's default id, "none", names no group)
    problem, lock = None, HeartbeatLock(folder / LOCK_NAME, group="" if group == "none" else group)
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        if lock.claim():
            before_leaving(lock.release)
            if fresh and (moved := set_aside_earlier_run(folder)):
                logger.info(f"{recipe}: the earlier run's files in {folder} moved to {moved}")
            if fresh or folder_run(folder) is None:
                started, host = f"{datetime.now():%Y-%m-%d %H:%M:%S}", socket.gethostname()
                identity = {"run": run_id, "recipe": recipe, "command": command, "started": started, "host": host}
                write_whole(folder / IDENTITY_NAME, json.dumps(identity) + "\n")
        else:
            problem = in_use(folder) or f"--output_dir {folder}: its lock was taken by another run; choose another"
    problem = [problem]
    broadcast_object_list(problem)
    if problem[0]:
        fail(problem[0])
    return lock


def set_aside_earlier_run(folder: Path) -> Path | None:
    """Move what an earlier run left in the folder into overwritten-<time>/ (its lock and the earlier set-aside
    folders stay). Returns where they went, or None when there was nothing."""
    earlier = [p for p in folder.iterdir() if p.name != LOCK_NAME and not p.name.startswith(SET_ASIDE_PREFIX)]
    if not earlier:
        return None
    aside = folder / f"{SET_ASIDE_PREFIX}{datetime.now():%Y%m%d-%H%M%S-%f}"
    aside.mkdir()
    for path in earlier:
        path.rename(aside / path.name)
    return aside


def check_disk(accelerator: Accelerator, output_dir: Path, parameters: int, checkpoints: bool) -> None:
    """Before the first step, on every process: the output folder can be written, and its file system has room for
    the final model (fp32: 4 bytes a parameter) and, if the run makes them, a checkpoint (fp32 weights and AdamW's
    two moments, 12 bytes per parameter, shared out under FSDP or DeepSpeed). Every process decides alike."""
    existing = next(p for p in (output_dir.absolute(), *output_dir.absolute().parents) if p.exists())
    shards = accelerator.num_processes if accelerator.distributed_type.name in ("FSDP", "DEEPSPEED") else 1
    need = 4 * parameters + (12 * parameters / shards if checkpoints else 0)
    problem = None
    try:  # (os.access says yes to root, also on a read-only file system's folder)
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        problem = f"--output_dir {output_dir}: {existing} cannot be written to ({e.strerror}): choose another folder"
    if problem is None and (free := shutil.disk_usage(existing).free) < need:
        problem = (
            f"--output_dir {output_dir}: the model{' and a checkpoint' if checkpoints else ''} need about "
            f"{need / 2**30:.2f} GiB, and its file system has {free / 2**30:.2f} GiB free: free some space or choose "
            "another folder"
        )
    problems = [p for p in gather_object([problem]) if p]
    if problems:
        fail(problems[0])


class WriteFailed(Exception):
    """A file of the run could not be written; the message is the one line to show."""


def save_model(accelerator: Accelerator, model, tokenizer, output_dir: Path) -> None:
    """The trained model and its tokenizer in Hugging Face format (from_pretrained loads them), written into
    final-model.partial/ and each file then renamed into place, so that every file is whole or absent. Every process
    takes part: get_state_dict gathers the full weights when FSDP or ZeRO-3 shard them. Raises WriteFailed (on every
    process) when it could not be written, with what was half-written removed."""
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    staging, problem = output_dir / "final-model.partial", None
    if accelerator.is_main_process:
        try:
            shutil.rmtree(staging, ignore_errors=True)
            with no_transformers_progress_bars():
                accelerator.unwrap_model(model).save_pretrained(
                    staging, is_main_process=True, save_function=accelerator.save, state_dict=state_dict
                )
            tokenizer.save_pretrained(staging)
            for file in sorted(staging.iterdir(), key=lambda p: p.suffix == ".safetensors"):  # the weights last
                with_usual_mode(file)
                os.replace(file, output_dir / file.name)
            staging.rmdir()
        except Exception as error:  # a full disk: safetensors' and torch's own errors as often as OSError
            need = 4 * sum(p.numel() for p in accelerator.unwrap_model(model).parameters())
            shutil.rmtree(staging, ignore_errors=True)
            problem = no_room(f"the final model in {output_dir}", output_dir, need, error)
    problem = [problem]
    broadcast_object_list(problem)
    if problem[0]:
        raise WriteFailed(problem[0])


def with_usual_mode(path: Path) -> None:
    """The permissions a new file gets here (0644 under the usual umask): safetensors writes its files 0600."""
    os.chmod(path, 0o666 & ~UMASK)


def no_room(what: str, where: Path, need: int, error: BaseException) -> str:
    free = shutil.disk_usage(next(p for p in (where, *where.parents) if p.exists())).free
    return (
        f"could not write {what} ({first_line(error)}): it takes about {need / 2**20:,.1f} MiB, and "
        f"{free / 2**20:,.1f} MiB are free on its file system"
    )


def write_whole(path: Path, text: str) -> None:
    """Write a file whole or not at all: into a partial file beside it, renamed into place. Ends the run with one
    line (exit 1) when it cannot be written."""
    partial, data = path.with_name(f"{path.name}.partial"), text.encode()
    try:
        with open(partial, "wb") as f:
            f.write(data)
        os.replace(partial, path)
    except OSError as error:
        partial.unlink(missing_ok=True)
        stop_on_write(path, len(data), error)


def append_line(path: Path, line: str) -> None:
    """Append one line whole or not at all: a write that fails is cut back off the file."""
    data = line.encode()
    with open(path, "ab", buffering=0) as f:
        size = f.seek(0, os.SEEK_END)
        try:
            written = 0
            while written < len(data):  # (an unbuffered write may write part, and fail only on the next)
                written += f.write(data[written:])
        except OSError as error:
            f.truncate(size)
            stop_on_write(path, len(data), error)


def stop_on_write(path: Path, need: int, error: OSError) -> NoReturn:
    stop(
        f"{no_room(str(path), path.parent, need, error)}: free some space, then resume with --resume_from_checkpoint "
        "latest"
    )


def write_json(path: Path, content: dict) -> None:
    """Strict JSON (null where a value is NaN or infinite), indented for reading, whole or not at all."""
    write_whole(path, json.dumps(finite_or_null(content), indent=2) + "\n")


def finite_or_null(value):
    """NaN and infinity, which JSON has no word for, as null (json.dumps would write NaN, which no parser reads)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(item) for item in value]
    return value
