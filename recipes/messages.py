"""What the user reads while a run goes on: the log lines, printed once for all processes, above the progress bar.

`logger` is accelerate's logger (the main process prints; a rank prefix only where there are several processes to
tell apart). `show_messages(accelerator)` sets it up once the Accelerator says how the run is laid out, and keeps the
libraries' chatter to one copy. An error's own line is the faults module's (faults.report_error).
"""

from __future__ import annotations

import logging

from accelerate import Accelerator, PartialState
from accelerate.logging import MultiProcessAdapter
from tqdm.auto import tqdm


class RankLogger(MultiProcessAdapter):
    """accelerate's logger, with a rank prefix where there are several processes."""

    def process(self, msg, kwargs):
        kwargs.setdefault("stacklevel", 2)
        state = PartialState()
        return (f"[rank {state.process_index}] {msg}" if state.num_processes > 1 else msg), kwargs


logger = RankLogger(logging.getLogger("run_kit"), {})


class AboveProgressBar(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record))


def show_messages(accelerator: Accelerator) -> None:
    """The run's lines at INFO, above the progress bar; on the other processes, transformers' and datasets' warnings
    silenced (one copy of them, not one per process)."""
    logger.logger.setLevel(logging.INFO)
    if not logger.logger.handlers:
        logger.logger.addHandler(AboveProgressBar())
    if not accelerator.is_main_process:
        for library in ("transformers", "datasets"):
            logging.getLogger(library).setLevel(logging.ERROR)


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type's name if it has none), cut to `limit` characters: what an
    error line quotes of a library's failure."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]
