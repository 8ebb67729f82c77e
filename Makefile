# accel-dp developer tasks. `make install` then `accel-dp run gpt-pretrain` is the whole quickstart.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
# Tests never touch the network: the Hugging Face Hub is unreachable on CI and stalls for ~50 s per call.
TEST_ENV = HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false

.PHONY: install dev-tools test test-faults lint bench
# nanoGPT's benchmark runs nanoGPT's own train.py beside the recipe: a checkout, prepared (benchmarks/nanogpt_cpu.py).
NANOGPT_DIR ?= ../nanoGPT

install:
	# torch first, pinned, so that no dependency pulls a newer build with gigabytes of CUDA.
	$(PYTHON) -m pip install "torch==$(TORCH_VERSION)"
	$(PYTHON) -m pip install -e .

# The test tools (pytest, pytest-xdist, ruff, hatchling, the trackers the tests drive), installed on first use.
dev-tools:
	@$(PYTHON) -c "import pytest, xdist, ruff, hatchling, tensorboard, wandb" 2>/dev/null || \
		$(PYTHON) -m pip install -e ".[dev]"

# Two workers (pytest-xdist): much of the suite waits on process start-up, one core at a time. Tests sharing a
# reference run are kept on one worker (xdist_group).
# PYTEST_ARGS narrows either suite: make test PYTEST_ARGS="-k resume".
PYTEST_ARGS ?=
test: dev-tools
	$(TEST_ENV) $(PYTHON) -m pytest -q -n 2 --dist loadgroup -m "not faults and not compile and not launch_matrix" \
		tests $(PYTEST_ARGS)

# The fault matrix: Ctrl-C, SIGTERM and SIGKILL at every phase of a run, and a full disk at every write, on 1 and 2
# processes (tests/test_faults.py), the other signal and kill tests, the compiled runs, and every bad-input row
# through accel-dp run on 2 processes (.ci/run's second step).
test-faults: dev-tools
	$(TEST_ENV) $(PYTHON) -m pytest -q -n 2 --dist loadgroup -m "faults or compile or launch_matrix" tests $(PYTEST_ARGS)

lint: dev-tools
	$(PYTHON) -m ruff check accel_dp recipes tests benchmarks
	$(PYTHON) -m ruff format --check accel_dp recipes tests benchmarks

bench:
	$(TEST_ENV) $(PYTHON) benchmarks/nanogpt_cpu.py --nanogpt_dir $(NANOGPT_DIR)
	$(TEST_ENV) $(PYTHON) benchmarks/cpu_bf16.py
	$(TEST_ENV) $(PYTHON) benchmarks/overhead.py
	$(TEST_ENV) $(PYTHON) benchmarks/dp_efficiency.py
	$(TEST_ENV) $(PYTHON) benchmarks/glue_padding.py
	$(PYTHON) benchmarks/prepare_corpus.py
