"""The run kit: what a recipe's main() calls, one line per concern, over the modules beside it (as nanoGPT's train.py
imports model.py).

    run = Run(recipe, args, unit)          launch checks, the Accelerator, the output folder, the checkpoint to resume
    run.check_steps(max_train_steps)       a checkpoint at or past the end: refused
    run.begin(model, optimizer, scheduler) after prepare(): the folder, its log, the meter, the non-finite policy,
                                           Local SGD and the checkpointer; a checkpoint restored
    with run.training(total_steps):        the progress bar and Local SGD around the loop
        run.step_done(step, result)        after each optimizer step
        run.log_step(step, total_steps)    at log steps
        with run.evaluation(): ...         evaluation time left out of the throughput
        run.log(record, message)           a record in metrics.jsonl and the trackers
        run.save(step, state)              a checkpoint when due; after a signal, one, then the exit
    run.finish(model, tokenizer, results)  the model, all_results.json, run_args.json

Run maps the recipe's flags onto the pieces, each in its own module and each handed only what it needs: messages
(the log lines), faults (exit codes, signals, how a process leaves), run_args (the shared flags), accelerator_setup
(the Accelerator), run_folder (the output folder, the final model), run_log (metrics.jsonl, trackers), metering
(throughput, FLOPs, memory), training (optimizer, step, non-finite policy, Local SGD) and checkpointing. Together
they need torch, accelerate, transformers, safetensors, psutil and tqdm, and nothing from accel_dp, so a folder
written by `accel-dp copy` trains alone. Nothing in them is specific to one recipe: what differs (its name, its unit
of work, its model's lookups) comes in as arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

from accelerator_setup import (
    check_parallel_mode,
    check_precision,
    ddp_kwargs,
    launched_world_size,
    runs_on_cpu,
    settle_accumulation,
    start_accelerator,
    trackers_for,
)
from checkpointing import Checkpointer, CheckpointFolder, Layout, Resume, fit_of
from faults import Attempt, StopSignals
from messages import show_messages
from metering import Meter
from run_folder import (
    WriteFailed,
    check_disk,
    checkpoint_to_resume,
    command_of,
    folder_run,
    hold_folder,
    new_run_id,
    output_folder,
    save_model,
    write_json,
    write_whole,
)
from run_log import RunLog
from tqdm.auto import tqdm
from training import LocalSGD, NonFinitePolicy, Step, compile_in_place


class Run:
    """One training run's plumbing, so that a recipe's main() calls one line per concern.

    Made first in main(): it checks how this process was launched, finds the checkpoint to resume (whose global batch
    sets the accumulation steps when none are asked for), makes the Accelerator, names the output folder (created only
    once the data and the model are known to be good) and checks the checkpoint on every process, all before any
    work. Signals are kept from this moment (faults.StopSignals)."""

    def __init__(self, recipe: str, args: argparse.Namespace, unit: str, default_name: str | None = None):
        self.start_time = time.perf_counter()
        self.signals = StopSignals()
        self.recipe, self.args, self.unit = recipe, args, unit
        world_size = launched_world_size(recipe)
        on_cpu = runs_on_cpu(args.cpu, world_size)
        self.attempt = Attempt.now()
        # A restart continues from the newest checkpoint by itself (a fresh start when there is none yet).
        resume_from = args.resume_from_checkpoint or ("latest" if self.attempt.number else None)
        settings = {**vars(args), "resume_from_checkpoint": resume_from}
        previous = CheckpointFolder(Path(args.output_dir) / "checkpoints") if args.output_dir else None
        self.resume = Resume.find(checkpoint_to_resume(settings), previous, recipe)
        check_precision(args.mixed_precision, on_cpu)
        self.accelerator = start_accelerator(
            recipe,
            world_size,
            on_cpu=on_cpu,
            mixed_precision=args.mixed_precision,
            accumulation=accumulation_for(args, world_size, self.resume),
            trackers=trackers_for(args.report_to),
            project_dir=args.output_dir or "runs",
            ddp_timeout=args.ddp_timeout,
            ddp=ddp_kwargs(args.ddp_comm_hook, args.powersgd_rank, args.powersgd_start_iter, on_cpu),
        )
        check_parallel_mode(self.accelerator, args.ddp_comm_hook, args.local_sgd_steps)
        show_messages(self.accelerator)
        may_hold_files = args.overwrite_output_dir or bool(resume_from)
        self.output_dir = output_folder(args.output_dir, default_name or recipe, may_hold_files)
        accelerator = self.accelerator
        self.layout = Layout(
            args.per_device_train_batch_size, accelerator.num_processes, accelerator.gradient_accumulation_steps
        )
        if self.resume:
            if resume_from == "latest":
                self.resume.check_same_run(folder_run(self.output_dir), self.output_dir)
            self.resume.check(self.accelerator, self.layout, recipe)
        self.run_id = self.resume.run if self.resume else new_run_id()
        self.first_step = self.resume.step if self.resume else 0
        self.total_steps: int | None = None  # (training() says)
        self.recipe_state: dict | None = None  # the recipe's own, as last handed to save()

    def check_steps(self, max_train_steps: int) -> None:
        """A checkpoint at or past the last step: refused (checkpointing.Resume.check_steps)."""
        if self.resume:
            self.resume.check_steps(max_train_steps)

    @property
    def accumulation(self) -> int:
        return self.layout.gradient_accumulation_steps

    @property
    def global_batch_size(self) -> int:
        return self.layout.global_batch

    def describe(self) -> str:
        """How the run is laid out, for its first log line."""
        accelerator = self.accelerator
        defaults = getattr(self.optimizer, "optimizer", self.optimizer).defaults
        adamw = "fused" if defaults.get("fused") else "foreach" if defaults.get("foreach") else "for-loop"
        return (
            f"{self.recipe}: {accelerator.num_processes} process(es) on {accelerator.device.type}, mixed precision "
            f"{accelerator.mixed_precision}, global batch {self.global_batch_size} = {self.layout.describe()}, "
            f"AdamW {adamw}" + (", compiled (torch.compile)" if self.args.torch_compile else "")
        )

    def begin(self, model, optimizer, lr_scheduler, fit: dict | None = None) -> dict:
        """After prepare(): a checkpoint checked against the model (and `fit`, the recipe's own: what else it must
        match), the output folder held for this run and its log, the meter, the non-finite policy, Local SGD, the
        checkpointer, and the checkpoint (if resuming) restored into the prepared objects. Returns the recipe's own
        saved state ({} on a fresh start)."""
        accelerator, args = self.accelerator, self.args
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        fit = {**fit_of(accelerator.unwrap_model(model)), **(fit or {})}
        if self.resume:
            self.resume.check_fit(fit)
        parameters = sum(p.numel() for p in model.parameters())
        check_disk(accelerator, self.output_dir, parameters, checkpoints=args.checkpointing_steps is not None)
        self.signals.stop_if_any_before_training(accelerator, self.recipe)
        command, fresh = command_of(vars(args)), not self.resume
        self.folder_lock = hold_folder(accelerator, self.output_dir, self.run_id, self.recipe, command, fresh)
        resumed_step = self.resume.step if self.resume else None
        self.log = RunLog(accelerator, self.output_dir, resumed_step, args.tracker_project, vars(args))
        log_restart(self.log, self.attempt, self.recipe, self.first_step, self.resume, self.layout)
        self.meter = Meter(accelerator, self.unit, self.start_time)
        self.local_sgd = LocalSGD(accelerator, model, args.local_sgd_steps)
        folder = CheckpointFolder(self.output_dir / "checkpoints")
        self.nonfinite = NonFinitePolicy(args.nonfinite_skip_limit, self.log, folder.latest_name)
        self.checkpointer = Checkpointer(
            accelerator,
            folder,
            recipe=self.recipe,
            run_id=self.run_id,
            fit=fit,
            layout=self.layout,
            nodes=self.attempt.nodes,
            every=args.checkpointing_steps,
            keep=args.checkpoints_total_limit,
            model=model,
            optimizer=optimizer,
            local_sgd=self.local_sgd,
            parts={"meter": self.meter, "nonfinite": self.nonfinite},
            seed=args.seed,
            paused=self.meter.paused,
        )
        if args.torch_compile:
            compile_in_place(accelerator.unwrap_model(model))
        self.signals.training_began()
        return self.checkpointer.restore(self.resume) if self.resume else {}

    @contextlib.contextmanager
    def training(self, total_steps: int):
        """Around the loop: the progress bar (closed whatever ends the loop) and Local SGD's no_sync. The bar is drawn
        on a terminal only: in a log file the log lines say how far the run is."""
        hidden = True if not self.accelerator.is_main_process else None
        self.total_steps = total_steps
        bar = dict(total=total_steps, initial=self.first_step, disable=hidden, mininterval=1.0, dynamic_ncols=True)
        with tqdm(**bar, desc="train") as self.progress, self.local_sgd:
            yield self.progress

    def step_done(self, step: int, result: Step) -> None:
        """After each optimizer step: a NaN or inf gradient is skipped or stops the run, the meter counts the step,
        the LR schedule steps once per optimizer step, applied or skipped (docs/data_parallel.md), and every K-th
        step Local SGD averages the replicas."""
        self.nonfinite.check(step, result)
        self.meter.add(result)
        self.lr_scheduler.step()
        self.local_sgd.step(step)
        self.progress.update(1)

    def log_step(self, step: int, total_steps: int, **extra) -> dict | None:
        """At every --log_every-th step and the last: the mean loss since the last log, the throughput and the LR into
        metrics.jsonl, the trackers, the log and the progress bar. Every process calls it at every step."""
        if step % self.args.log_every and step != total_steps:
            return None
        record = {**self.meter.record(step), **extra, "lr": self.lr_scheduler.get_last_lr()[0]}
        loss = f"{record['loss']:.4f}" if "loss" in record else "- (steps skipped)"
        where = "".join(f" | {key} {value}" for key, value in extra.items())
        self.log(
            record,
            f"step {step}/{total_steps}{where} | loss {loss} | lr {record['lr']:.3e} | "
            f"{record[f'{self.unit}_per_second']:,.1f} {self.unit}/s | {record['tflops']:.3g} TFLOP/s",
        )
        self.progress.set_postfix(loss=loss)
        return record

    @contextlib.contextmanager
    def evaluation(self):
        """Around an evaluation: its time is left out of the throughput, and under Local SGD the replicas are
        averaged first (one model to evaluate)."""
        self.progress.set_description("eval")  # (at the last step the bar is full, and evaluation still to come)
        with self.meter.paused("eval"):
            self.local_sgd.average()
            yield
        self.progress.set_description("train")

    def save(self, step: int, state: dict | None = None, epoch_end: bool = False) -> None:
        """After every step but the last: a checkpoint when one is due (--checkpointing_steps). At log steps (the
        signal check is a collective; asking at every step would cost data parallelism a few percent), after a signal
        on any process: every process checkpoints, then the run ends (75, or 130 after Ctrl-C). `state`: the recipe's
        own, to come back from `begin` on resume."""
        self.recipe_state = state
        self.checkpointer.save(step, state, epoch_end=epoch_end)
        if epoch_end or step % self.args.log_every or not self.signals.anywhere(self.accelerator):
            return
        if self.signals.interrupted and self.args.checkpointing_steps is None:
            saved = "no checkpoint (the run makes none: --checkpointing_steps)"
        else:
            self.checkpointer.save(step, state, force=True)
            saved = "checkpoint written"
            if not self.signals.restart_follows:
                saved += "; run the same command with --resume_from_checkpoint latest to continue"
        self.accelerator.end_training()
        self.signals.end_run(f"{self.recipe}: {self.signals.describe()} at step {step}: {saved}")

    def finish(self, model, tokenizer, results: dict) -> dict:
        """The end of training: the model and tokenizer in Hugging Face format, all_results.json (strict JSON, null
        where a value is missing) and run_args.json, and the trackers closed. Every process calls it."""
        try:
            save_model(self.accelerator, model, tokenizer, self.output_dir)
        except WriteFailed as failed:  # the training is not lost: a checkpoint of the final state, then the line
            self.checkpointer.keep_final_state(self.total_steps, self.recipe_state, str(failed))
        results = {**results, "total_runtime_s": time.perf_counter() - self.start_time}
        if self.accelerator.is_main_process:
            write_json(self.output_dir / "all_results.json", results)
            write_json(self.output_dir / "run_args.json", vars(self.args))
        self.accelerator.end_training()
        self.folder_lock.release()
        return results

    def write_file(self, name: str, text: str) -> None:
        """A file of the recipe's own in the output folder, whole or not at all (main process)."""
        write_whole(self.output_dir / name, text)


def accumulation_for(args: argparse.Namespace, world_size: int, resume: Resume | None) -> int:
    """nanoGPT's rule (the flags' global batch on this many processes); with neither flag given, a checkpoint's
    global batch is kept on another layout."""
    batch = args.per_device_train_batch_size
    accumulation = settle_accumulation(batch, world_size, args.gradient_accumulation_steps, args.global_batch_size)
    pinned = args.gradient_accumulation_steps is not None or args.global_batch_size is not None
    if resume and not pinned:
        return resume.accumulation_keeping_global_batch(batch, world_size) or accumulation
    return accumulation


def log_restart(log: RunLog, attempt: Attempt, recipe: str, step: int, resume: Resume | None, now: Layout) -> None:
    """A restart by torch's elastic agent, or its group re-formed on other nodes (one joined): a line, and a record
    in metrics.jsonl, of when, why, the nodes and layout before and after, where it resumed and how many logged steps
    it trains again (none known when no checkpoint was written yet: it starts afresh). Nothing on a start that is
    neither (a fresh run, a resume by hand)."""
    restarted = attempt.number > log.last_restart
    # (a group re-formed on more nodes: torch counts no restart)
    if not restarted and not (resume and attempt.max_restarts and resume.nodes != attempt.nodes):
        return
    why = attempt.previous_ending() if restarted else "a node joined"
    before = (resume.nodes, resume.layout) if resume else (attempt.nodes, now)
    replayed = max(0, log.last_forgotten_step - step) if resume else None
    record = {"step": step, "event": "restart" if restarted else "regroup", "restart": attempt.number,
              "max_restarts": attempt.max_restarts, "resumed_step": step, "replayed_steps": replayed, "reason": why,
              "nodes": [before[0], attempt.nodes], "processes": [before[1].processes, now.processes],
              "time": time.time()}  # fmt: skip
    what = f"restart {attempt.number} of {attempt.max_restarts} after {why}" if restarted else why
    where = f"resuming at step {step}" if resume else "starting afresh"
    if before != (attempt.nodes, now):
        accumulation = f"accumulation {before[1].gradient_accumulation_steps} -> {now.gradient_accumulation_steps}"
        where = f"{before[0]} -> {attempt.nodes} nodes: {where} on {now.processes} process(es), {accumulation}"
    trained_again = f" ({replayed} logged step(s) trained again)" if resume else ""
    log.event(record, f"{recipe}: {what}: {where}{trained_again}")
