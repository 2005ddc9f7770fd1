# moa: `make train` and `make test` set everything up on a fresh machine.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU wheel of torch; an unpinned torch would pull several GB of CUDA packages.
TORCH_SPEC ?= torch==2.13.0
export TOKENIZERS_PARALLELISM := false

.PHONY: install lock train test test-all smoke sweep dashboard chromium bench mutate lint clean

# $(call venv_with_torch,DIR): the venv DIR (made if missing) with pip upgraded and TORCH_SPEC.
define venv_with_torch
@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: set PYTHON=python3.x (>= 3.10)"; exit 1; }
test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
$(1)/bin/pip install --quiet --upgrade pip
$(1)/bin/pip install --quiet "$(TORCH_SPEC)"
endef

install: $(STAMP)

# constraints.txt pins every other package to the versions CI last passed with, so a new
# release upstream cannot change a fresh install; `make lock` moves them to the newest.
$(STAMP): pyproject.toml constraints.txt
	$(call venv_with_torch,$(VENV))
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	# the CPU kernels (ball pruning, causal conv), compiled now rather than at first use
	$(BIN)/python -c "from moa.kernels import causal_conv, pruned_attention; \
	  pruned_attention.compiled(); causal_conv.compiled()"
	touch $(STAMP)

LOCK_VENV := .venv-lock
lock:  ## resolve pyproject.toml's ranges afresh into constraints.txt (then run make test)
	rm -rf $(LOCK_VENV)
	$(call venv_with_torch,$(LOCK_VENV))
	$(LOCK_VENV)/bin/pip install --quiet -e ".[dev]"
	{ echo "# Written by \`make lock\`: the versions \`make install\` installs (torch: TORCH_SPEC)."; \
	  $(LOCK_VENV)/bin/pip freeze --exclude-editable | grep -v '^torch=='; } > constraints.txt
	rm -rf $(LOCK_VENV)

train: $(STAMP)  ## train and evaluate the default model on the built-in corpus
	$(BIN)/python train.py $(ARGS)

smoke: $(STAMP)  ## a few steps of a tiny model (under a minute)
	$(BIN)/python train.py trainer=smoke $(ARGS)

sweep: $(STAMP)  ## a small multirun: the four dot-product schemes on the gpt baseline, smoke-sized
	$(BIN)/python train.py -m trainer=smoke model=gpt attention=mha,gqa,mqa,sqa $(ARGS)

DIRS ?= outputs
dashboard: $(STAMP)  ## compare the runs under DIRS (default outputs/) in dashboard.html
	$(BIN)/python -m moa.dashboard $(DIRS) --out dashboard.html

# Tests run in TEST_WORKERS processes (pytest-xdist; 0: in this one, for pdb or -s).
TEST_WORKERS ?= 2
test: $(STAMP)  ## the fast suite (what CI runs)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) $(ARGS)

test-all: $(STAMP)  ## everything, slow tests included
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m "not gpu" $(ARGS)

# The dashboard's browser test runs where `chromium` is on PATH and is skipped elsewhere;
# this installs Debian's package for it (as root; a machine without apt says so and stops).
chromium:  ## install Debian's chromium for the dashboard's headless-browser test
	@command -v chromium >/dev/null || { command -v apt-get >/dev/null \
	  || { echo "no apt-get here: install chromium another way"; exit 1; }; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium; }

bench: $(STAMP)  ## print the benchmark tables; JSON records go to bench/results/
	mkdir -p bench/results
	$(BIN)/python bench/attention.py --device cpu --json bench/results/attention-cpu.json
	$(BIN)/python bench/alcca.py --json bench/results/alcca.json
	$(BIN)/python bench/throughput.py --json bench/results/throughput-cpu.json
	$(BIN)/python bench/generate.py --json bench/results/generate-cpu.json
	$(BIN)/python bench/host_memory.py --json bench/results/host_memory.json
	$(BIN)/python bench/output_positions.py --json bench/results/output_positions.json
	$(BIN)/python bench/gelu.py --json bench/results/gelu.json
	$(BIN)/python bench/decode_attention.py --json bench/results/decode_attention.json

# Mutation testing (mutmut, in a venv of its own: never in CI nor `make test`). The modules
# and the tests they run are [tool.mutmut] in pyproject.toml; each mutant runs only the
# tests that execute its function. About 40 minutes on 2 free cores; MUTANTS narrows it, as
# `make mutate MUTANTS='moa.layers.balance*'`. The report: docs/mutation.md's table.
MUTATE_VENV := .venv-mutate
MUTMUT_SPEC ?= mutmut==3.8.1
MUTANTS ?=
MUTATE_JOBS ?= 2
$(MUTATE_VENV)/.installed: pyproject.toml constraints.txt
	$(call venv_with_torch,$(MUTATE_VENV))
	$(MUTATE_VENV)/bin/pip install --quiet -c constraints.txt -e ".[dev]" "$(MUTMUT_SPEC)"
	touch $@

mutate: $(MUTATE_VENV)/.installed  ## mutation score of the math and guarantees (about 40 minutes)
	CI=true OMP_NUM_THREADS=1 $(MUTATE_VENV)/bin/mutmut run --max-children $(MUTATE_JOBS) $(MUTANTS)
	$(MUTATE_VENV)/bin/python tests/mutation_report.py --out mutants/report.md

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf outputs/*/ .cache .pytest_cache .ruff_cache mutants
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
