"""The run's output folder: naming it, checking before the first step that it can hold what the run will write, and
what a finished run leaves in it (the model and tokenizer in Hugging Face format, strict-JSON results).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from datetime import datetime
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from faults import fail
from training import no_transformers_progress_bars


def output_folder(output_dir: str | None, default_name: str, may_hold_files: bool) -> Path:
    """The run's folder, named on the main process and shared (each rank's clock could tick to another second). A run
    never writes into an earlier run's folder unless asked to (`may_hold_files`: --overwrite_output_dir,
    --resume_from_checkpoint). Every process must call it."""
    name = [output_dir or os.path.join("runs", f"{default_name}-{datetime.now():%Y%m%d-%H%M%S}")]
    broadcast_object_list(name)
    folder = Path(name[0])
    if folder.exists() and not folder.is_dir():
        fail(f"--output_dir {folder} is a file: choose a folder")
    if folder.is_dir() and any(folder.iterdir()) and not may_hold_files:
        fail(
            f"--output_dir {folder} already holds files: choose a new folder, pass --overwrite_output_dir, or "
            "continue it with --resume_from_checkpoint latest"
        )
    return folder


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


def save_model(accelerator: Accelerator, model, tokenizer, output_dir: Path) -> None:
    """The trained model and its tokenizer in Hugging Face format (from_pretrained loads them). Every process takes
    part: get_state_dict gathers the full weights when FSDP or ZeRO-3 shard them."""
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    with no_transformers_progress_bars():
        accelerator.unwrap_model(model).save_pretrained(
            output_dir,
            is_main_process=accelerator.is_main_process,
            save_function=accelerator.save,
            state_dict=state_dict,
        )
    if accelerator.is_main_process:
        tokenizer.save_pretrained(output_dir)


def write_json(path: Path, content: dict) -> None:
    """Strict JSON (null where a value is NaN or infinite), indented for reading."""
    path.write_text(json.dumps(finite_or_null(content), indent=2) + "\n")


def finite_or_null(value):
    """NaN and infinity, which JSON has no word for, as null (json.dumps would write NaN, which no parser reads)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(item) for item in value]
    return value
