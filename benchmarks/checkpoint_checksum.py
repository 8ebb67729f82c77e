"""What the checkpoint manifest's SHA-256 per file costs, at GPT-2 124M's size, side by side with the save itself.

    python benchmarks/checkpoint_checksum.py [--rounds 3]

Writes what a checkpoint of GPT-2 124M holds (fp32 weights and AdamW's two moments: 3 x 124M x 4 bytes, 1.5 GB)
with torch.save into a temporary folder, then times, each round: the save, the SHA-256 of its files (the run kit's
sha256_of, as Checkpointer.save computes them) and a plain read of the same files (what resuming pays to check
them, beyond the load). Prints seconds and GB/s for each, and the checksum's cost relative to the save.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import recipe_module, warn_if_busy

manifest = recipe_module("manifest")  # beside the recipes


def gpt2_124m_tensors() -> dict[str, torch.Tensor]:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=50304, n_positions=1024, n_embd=768, n_layer=12, n_head=12))
    weights = {name: p.detach() for name, p in model.named_parameters()}
    return weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    warn_if_busy()
    weights = gpt2_124m_tensors()
    parameters = sum(t.numel() for t in weights.values())
    files = {"model.bin": weights, "optimizer.bin": {f"{n}.{m}": t.clone() for n, t in weights.items() for m in "ab"}}
    times = {"save": [], "sha256": [], "read": []}
    with tempfile.TemporaryDirectory(dir=".") as folder:
        paths = [Path(folder) / name for name in files]
        for _ in range(args.rounds):
            start = time.perf_counter()
            for path, tensors in zip(paths, files.values(), strict=True):
                torch.save(tensors, path)
            times["save"].append(time.perf_counter() - start)
            start = time.perf_counter()
            for path in paths:
                manifest.sha256_of(path)
            times["sha256"].append(time.perf_counter() - start)
            start = time.perf_counter()
            for path in paths:
                with open(path, "rb") as f:
                    while f.read(2**20):
                        pass
            times["read"].append(time.perf_counter() - start)
        gigabytes = sum(p.stat().st_size for p in paths) / 1e9
    print(f"GPT-2 124M: {parameters / 1e6:.1f}M parameters, checkpoint files {gigabytes:.2f} GB, {args.rounds} rounds")
    medians = {what: statistics.median(seconds) for what, seconds in times.items()}
    for what, seconds in medians.items():
        print(f"{what:>7}: median {seconds:.2f} s ({gigabytes / seconds:.2f} GB/s; min {min(times[what]):.2f} s)")
    print(f"sha256 / save: {medians['sha256'] / medians['save']:.2f}; per GB: {medians['sha256'] / gigabytes:.2f} s")


if __name__ == "__main__":
    main()
