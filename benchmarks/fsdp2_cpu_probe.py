"""Does torch's own FSDP2 (`fully_shard`) shard and train on CPU over gloo, outside accelerate? A tiny experiment.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 benchmarks/fsdp2_cpu_probe.py [--steps 5]

accelerate does not use it on CPU (with an FSDP config and ACCELERATE_USE_CPU=1 it silently runs plain DDP, which
the recipes refuse), so this calls torch directly: a GPT-2 of 2 layers, width 32 (the tests' tiny model), each
block and then the whole model wrapped with `fully_shard` on a CPU device mesh of all ranks. Every rank trains on
its shard of each global batch with AdamW; rank 0 also trains an unsharded copy on the whole global batch in one
process. Each rank prints one line `FSDP2_RESULT {json}`: whether every parameter became a sharded DTensor, the
parameter count it holds locally against the full count, and the largest difference between the gathered FSDP2
parameters and the single-process ones after --steps steps.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import GPT2Config, GPT2LMHeadModel


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--per_rank_batch", type=int, default=4)
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    config = GPT2Config(vocab_size=65, n_positions=32, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    reference = GPT2LMHeadModel(config)
    reference.load_state_dict(model.state_dict())
    full = sum(p.numel() for p in model.parameters())
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    sharded = all(isinstance(p, DTensor) for p in model.parameters())
    local = sum(p.to_local().numel() for p in model.parameters())

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(args.steps):
        batch = torch.randint(0, config.vocab_size, (args.per_rank_batch * world, 32), generator=generator)
        mine = batch[rank * args.per_rank_batch : (rank + 1) * args.per_rank_batch]
        loss = model(input_ids=mine, labels=mine).loss
        loss.backward()  # FSDP2 reduce-scatters the gradients: each rank keeps its shard's average
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if rank == 0:  # equal shards: the mean of the ranks' losses is the whole batch's mean
            reference(input_ids=batch, labels=batch).loss.backward()
            reference_optimizer.step()
            reference_optimizer.zero_grad()
    gathered = torch.cat([p.full_tensor().flatten() for p in model.parameters()])  # a collective: every rank
    result = {
        "rank": rank,
        "world_size": world,
        "torch": torch.__version__,
        "backend": dist.get_backend(),
        "threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads(),
        "all_parameters_sharded_dtensors": sharded,
        "parameters_full": full,
        "parameters_local": local,
        "losses": [round(x, 4) for x in losses],
    }
    if rank == 0:
        single = torch.cat([p.detach().flatten() for p in reference.parameters()])
        result["max_abs_diff_vs_one_process_whole_batch"] = (gathered - single).abs().max().item()
    print("FSDP2_RESULT " + json.dumps(result), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
