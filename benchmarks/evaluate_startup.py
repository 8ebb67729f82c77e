"""What `import evaluate` adds to a glue-bert run's start-up, side by side in one invocation.

    python benchmarks/evaluate_startup.py [--rounds 7]

Alternates two fresh Python processes, ROUNDS times each: one imports what glue_bert.py imports before it trains
(torch, accelerate, transformers, datasets, and its modules), the other the same and then evaluate, as glue-bert
does where it loads its metric. Prints each side's median wall time, the difference, and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from common import RECIPES_DIR, warn_if_busy

RECIPE_IMPORTS = f"import sys; sys.path.insert(0, {str(RECIPES_DIR)!r}); import glue_bert"


def seconds(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    warn_if_busy()
    seconds(RECIPE_IMPORTS + "; import evaluate")  # warm the file cache for both
    sides = {"recipe": [], "recipe + evaluate": []}
    for _ in range(args.rounds):
        sides["recipe"].append(seconds(RECIPE_IMPORTS))
        sides["recipe + evaluate"].append(seconds(RECIPE_IMPORTS + "; import evaluate"))
    medians = {name: statistics.median(times) for name, times in sides.items()}
    for name, times in sides.items():
        print(
            f"{name:>18}: median {medians[name]:.2f} s (min {min(times):.2f}, max {max(times):.2f}, {len(times)} runs)"
        )
    added, ratio = medians["recipe + evaluate"] - medians["recipe"], medians["recipe + evaluate"] / medians["recipe"]
    print(f"import evaluate adds {added:.2f} s to the recipe's imports: ratio {ratio:.2f}")


if __name__ == "__main__":
    main()
