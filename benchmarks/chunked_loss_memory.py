"""Peak memory of gpt-pretrain's LM loss at GPT-2's vocabulary (50304 rows), plain against chunked, on CPU.

    python benchmarks/chunked_loss_memory.py [--tokens 8192] [--chunk 1024]

Each side runs in a fresh process: the recipe's causal_lm_loss on a 2-layer, width-256 GPT-2 (block 1024) over
--tokens positions, forward and backward, once warm; the process's peak RSS is printed, with the fp32 logits the
plain side holds (tokens x 50304 x 4 bytes) for scale. Same invocation, one side after the other.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from common import RECIPES_DIR, warn_if_busy

SIDE = """
import resource, sys, torch
sys.path.insert(0, {recipes!r})
import gpt_pretrain
from accelerate import Accelerator
from transformers import GPT2Config, GPT2LMHeadModel
torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(vocab_size=50304, n_positions=1024, n_embd=256, n_layer=2, n_head=4))
accelerator = Accelerator(cpu=True)
inputs = torch.randint(0, 50257, ({tokens} // 1024, 1024))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
loss = gpt_pretrain.causal_lm_loss(accelerator, model, inputs, inputs, 50257, {chunk})
loss.backward()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(f"{{peak / 2**20:.2f}} {{(peak - before) / 2**20:.2f}} {{loss.item():.6f}}")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--chunk", type=int, default=1024)
    args = parser.parse_args()
    warn_if_busy()
    results = {}
    for name, chunk in (("plain", None), ("chunked", args.chunk)):
        code = SIDE.format(recipes=str(RECIPES_DIR), tokens=args.tokens, chunk=chunk)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        results[name] = [float(x) for x in out.split()[-3:]]
        peak, grown, loss = results[name]
        print(f"{name:>8}: peak RSS {peak:.2f} GiB ({grown:.2f} GiB grown by the loss and its backward), loss {loss}")
    logits = args.tokens * 50304 * 4 / 2**30
    print(f"fp32 logits of {args.tokens} positions: {logits:.2f} GiB; chunk of {args.chunk} positions: "
          f"{logits * args.chunk / args.tokens:.2f} GiB")  # fmt: skip
    print(f"peak ratio chunked/plain: {results['chunked'][0] / results['plain'][0]:.2f}; "
          f"losses differ by {abs(results['chunked'][2] - results['plain'][2]):.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
