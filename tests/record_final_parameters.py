"""Run a recipe in this process and record what each rank did, for tests launched under torchrun.

    torchrun --nproc_per_node 2 tests/record_final_parameters.py RECORD_DIR RECIPE_NAME [recipe args ...]

Each rank writes RECORD_DIR/rank<i>.pt just before the recipe shuts accelerate down, with its world size, its
flattened final parameters, how many gradient all-reduces DDP ran (counted by a communication hook, since DDP's
reducer is C++) in how many rounds over the buckets, and how many optimizer steps AdamW took. A test can then check replicas
and communication independently of anything the recipe reports about itself.
"""

import importlib.util
import os
import sys
from pathlib import Path

import accelerate
import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

record_dir, recipe_name, recipe_args = sys.argv[1], sys.argv[2], sys.argv[3:]
allreduce = {"calls": 0, "rounds": 0}
original_prepare, original_end_training = accelerate.Accelerator.prepare, accelerate.Accelerator.end_training


def counting_allreduce(process_group, bucket):
    allreduce["calls"] += 1
    allreduce["rounds"] += bucket.is_last()  # DDP rebuilds its buckets after the first step: count rounds
    return default_hooks.allreduce_hook(process_group, bucket)


def prepare_and_count(self, *objects, **kwargs):
    prepared = original_prepare(self, *objects, **kwargs)
    for model in prepared if isinstance(prepared, tuple) else (prepared,):
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model.register_comm_hook(state=None, hook=counting_allreduce)
    return prepared


def record_then_finish(self):
    optimizer = self._optimizers[0].optimizer
    steps = {int(state["step"]) for state in optimizer.state.values() if "step" in state}
    record = {
        "world_size": self.num_processes,
        "parameters": torch.cat([p.detach().flatten().float() for p in self._models[0].parameters()]),
        "allreduce_calls": allreduce["calls"],
        "allreduce_rounds": allreduce["rounds"],
        "optimizer_steps": steps.pop() if len(steps) == 1 else steps,
        "last_lr": self._schedulers[0].get_last_lr()[0] if self._schedulers else None,
    }
    torch.save(record, os.path.join(record_dir, f"rank{self.process_index}.pt"))
    original_end_training(self)


accelerate.Accelerator.prepare = prepare_and_count
accelerate.Accelerator.end_training = record_then_finish
path = Path(__file__).resolve().parents[1] / "recipes" / f"{recipe_name}.py"
spec = importlib.util.spec_from_file_location(recipe_name, path)
recipe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(recipe)
recipe.main(recipe_args)
