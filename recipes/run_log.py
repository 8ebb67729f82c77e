"""The run's record: <output_dir>/metrics.jsonl, one JSON object a line ({"step": N, ...}), and accelerate's trackers
(tensorboard, wandb: one tracker run per job, with the whole config), written by the main process.
"""

from __future__ import annotations

import json
from pathlib import Path

from accelerate import Accelerator
from messages import logger
from run_folder import append_line, write_whole


class RunLog:
    """Making it creates the output folder: do it once the data and the model are known to be good, so that bad input
    leaves nothing behind. On a resume, what the interrupted run logged after its checkpoint (`resumed_step`) is
    forgotten; on a fresh start, an earlier metrics.jsonl is. `config` goes to the trackers."""

    def __init__(
        self,
        accelerator: Accelerator,
        output_dir: Path,
        resumed_step: int | None,
        tracker_project: str,
        config: dict,
    ):
        self.accelerator, self.path = accelerator, output_dir / "metrics.jsonl"
        self.last_forgotten_step = 0  # the last step logged after the checkpoint resumed from (main process)
        self.last_restart = 0  # the number of the last restart logged (main process)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            output_dir.mkdir(parents=True, exist_ok=True)
            if resumed_step is None:
                self.path.unlink(missing_ok=True)
            elif self.path.is_file():
                records = read_records(self.path)
                write_whole(self.path, "".join(json.dumps(r) + "\n" for r in records if r["step"] <= resumed_step))
                self.last_forgotten_step = max((r["step"] for r in records), default=0)
                self.last_restart = max((r.get("restart", 0) for r in records if r.get("event")), default=0)
        if accelerator.log_with:
            accelerator.project_configuration.set_directories(str(output_dir))  # tensorboard logs go under it
            plain = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}
            accelerator.init_trackers(
                tracker_project,
                config={
                    **plain,
                    "world_size": accelerator.num_processes,
                    "gradient_accumulation_steps": accelerator.gradient_accumulation_steps,
                },
                init_kwargs={"wandb": {"dir": str(output_dir), "name": output_dir.name}},
            )

    def __call__(self, record: dict, message: str | None = None) -> None:
        """A record ({"step": N, ...}) in metrics.jsonl and the trackers, and a line for the user."""
        if self.accelerator.is_main_process:
            append_line(self.path, json.dumps(record) + "\n")
        self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        if message:
            logger.info(message)

    def event(self, record: dict, message: str) -> None:
        """Something that happened to the run (a restart), not a measurement: metrics.jsonl and the log only."""
        if self.accelerator.is_main_process:
            append_line(self.path, json.dumps(record) + "\n")
        logger.info(message)


def read_records(path: Path) -> list[dict]:
    """metrics.jsonl's records. A line that is not one (a blank line, or the last line cut short by a crash or a full
    disk) is skipped, and the log says so."""
    records = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        elif line.strip():
            logger.warning(f"{path}: line {number} is not a whole record (cut short?); skipped")
    return records
