"""Run a recipe in this process and save this rank's final parameters, for tests launched under torchrun.

    torchrun --nproc_per_node 2 tests/record_final_parameters.py RECORD_DIR RECIPE_NAME [recipe args ...]

Each rank writes RECORD_DIR/rank<i>.pt with its world size and its flattened parameters just before the recipe
shuts accelerate down, so a test can compare replicas independently of anything the recipe reports.
"""

import importlib.util
import os
import sys
from pathlib import Path

import accelerate
import torch

record_dir, recipe_name, recipe_args = sys.argv[1], sys.argv[2], sys.argv[3:]
finish = accelerate.Accelerator.end_training


def record_then_finish(self):
    flat = torch.cat([p.detach().flatten().float() for p in self._models[0].parameters()])
    record = {"world_size": self.num_processes, "parameters": flat}
    torch.save(record, os.path.join(record_dir, f"rank{self.process_index}.pt"))
    finish(self)


accelerate.Accelerator.end_training = record_then_finish
path = Path(__file__).resolve().parents[1] / "recipes" / f"{recipe_name}.py"
spec = importlib.util.spec_from_file_location(recipe_name, path)
recipe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(recipe)
recipe.main(recipe_args)
