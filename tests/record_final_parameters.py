"""Run a recipe in this process and record what each rank did, for tests launched under torchrun.

    torchrun --nproc_per_node 2 tests/record_final_parameters.py RECORD_DIR RECIPE_NAME [recipe args ...]

Each rank writes RECORD_DIR/rank<i>.pt just before the recipe shuts accelerate down, with its world size, its
flattened final parameters, how many gradient all-reduces DDP ran (counted by a communication hook, since DDP's
reducer is C++) in how many rounds over the buckets, and how many optimizer steps AdamW took. A test can then check
replicas
and communication independently of anything the recipe reports about itself.

If the recipe registered a communication hook of its own (--ddp_comm_hook), the counting hook is left out (DDP takes
one hook) and the record names the recipe's hook instead. Every rank also counts the bytes it hands to
torch.distributed.all_reduce, by who calls it: "gradients" (DDP communication hooks, compressed or not), "parameters"
(training.py's LocalSGD.average) and "other" (the recipe's loss and trigger reductions). Under Local SGD it also keeps
the parameters as they were right after the last `local_sgd.step(...)`, before the final averaging.
"""

import importlib.util
import os
import sys
from pathlib import Path

import accelerate
import torch
import torch.distributed
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

record_dir, recipe_name, recipe_args = sys.argv[1], sys.argv[2], sys.argv[3:]
allreduce = {"calls": 0, "rounds": 0}
allreduce_bytes = {"gradients": 0, "parameters": 0, "other": 0}
comm_hook = {"name": None}
local_sgd = {"steps": 0, "parameters": None, "averaged": None}
original_prepare, original_end_training = accelerate.Accelerator.prepare, accelerate.Accelerator.end_training
original_all_reduce = torch.distributed.all_reduce


def caller_kind() -> str:
    """Who called all_reduce: a DDP communication hook (also from a future's callback, as PowerSGD's second
    all-reduce runs), the run kit's LocalSGD.average, or anything else."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename.replace(os.sep, "/")
        if "/ddp_comm_hooks/" in name:
            return "gradients"
        if name.endswith("recipes/training.py") and frame.f_code.co_name == "average":
            return "parameters"
        frame = frame.f_back
    return "other"


def counting_all_reduce(tensor, *args, **kwargs):
    allreduce_bytes[caller_kind()] += tensor.numel() * tensor.element_size()
    return original_all_reduce(tensor, *args, **kwargs)


def local_sgd_step_and_keep(self, step):
    original_local_sgd_step(self, step)
    local_sgd["steps"] += 1
    local_sgd["parameters"] = torch.cat([p.detach().flatten().float() for p in self.model.parameters()])
    if self.enabled and step % self.every == 0:  # this step averaged
        local_sgd["averaged"] = local_sgd["parameters"]


def counting_allreduce(process_group, bucket):
    allreduce["calls"] += 1
    allreduce["rounds"] += bucket.is_last()  # DDP rebuilds its buckets after the first step: count rounds
    return default_hooks.allreduce_hook(process_group, bucket)


def prepare_and_count(self, *objects, **kwargs):
    prepared = original_prepare(self, *objects, **kwargs)
    for model in prepared if isinstance(prepared, tuple) else (prepared,):
        # DDP takes one hook: count rounds only when the recipe runs plain all-reduce (no hook of its own).
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            comm_hook["name"] = model._get_ddp_logging_data().get("comm_hook")
            if comm_hook["name"] is None:
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
        "comm_hook": comm_hook["name"],  # the recipe's own hook, as DDP names it; None: plain all-reduce
        "allreduce_bytes": dict(allreduce_bytes),
        "local_sgd_steps": local_sgd["steps"],
        "parameters_after_last_local_sgd_step": local_sgd["parameters"],
        "parameters_after_last_average": local_sgd["averaged"],
    }
    torch.save(record, os.path.join(record_dir, f"rank{self.process_index}.pt"))
    original_end_training(self)


accelerate.Accelerator.prepare = prepare_and_count
accelerate.Accelerator.end_training = record_then_finish
torch.distributed.all_reduce = counting_all_reduce
path = Path(__file__).resolve().parents[1] / "recipes" / f"{recipe_name}.py"
sys.path.insert(0, str(path.parent))  # the modules the recipe imports, beside it
spec = importlib.util.spec_from_file_location(recipe_name, path)
recipe = importlib.util.module_from_spec(spec)
sys.modules[recipe_name] = recipe
spec.loader.exec_module(recipe)
import training  # noqa: E402  (the module the recipe imports, beside it)

original_local_sgd_step = training.LocalSGD.step
training.LocalSGD.step = local_sgd_step_and_keep
recipe.main(recipe_args)
