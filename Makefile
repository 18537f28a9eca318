# ldot: two commands do all set-up on a fresh machine.
#   make demo   synthetic data -> 2-rank DeepSpeed training -> FAISS recall table in MLflow, then the
#               second stage: mine hard negatives -> train a small re-ranker -> its row beside the first
#   make test   the test suite
PYTHON   ?= python3
VENV     := .venv
BIN      := $(VENV)/bin
STAMP    := $(VENV)/.ldot-installed
DEMO_OUT ?= out/demo
NPROC    ?= 2
TORCH    ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast test-torchrun test-mlflow test-slurm lock clean

setup: $(STAMP)

# Reinstalls only when the dependency files change. torch first: here 2.13.0 is the local CPU
# build, on a GPU machine the CUDA build; then the project, editable, pinned by constraints.txt.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	# clip-benchmark is a second recall implementation for tests only; its own dependencies are heavy
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -c constraints.txt clip-benchmark
	touch $@

demo: setup
	@start=$$(date +%s); set -e; \
	if [ -f $(DEMO_OUT)/data/test/manifest.json ]; then echo "reusing $(DEMO_OUT)/data (synth is deterministic; make clean to redo)"; \
	else $(BIN)/ldot data synth --out $(DEMO_OUT)/data; fi; \
	$(BIN)/ldot data inspect $(DEMO_OUT)/data/train > $(DEMO_OUT)/inspect-train.txt; \
	$(BIN)/torchrun --standalone --nproc_per_node $(NPROC) -m ldot.train --config train/configs/demo.yaml \
		output_dir=$(DEMO_OUT)/run data.train=$(DEMO_OUT)/data/train; \
	$(BIN)/ldot eval mine --checkpoint $(DEMO_OUT)/run/checkpoints/final --data $(DEMO_OUT)/data/train \
		--out $(DEMO_OUT)/mined --k 20 --exclude-same-text; \
	$(BIN)/torchrun --standalone --nproc_per_node $(NPROC) -m ldot.train --config train/configs/rerank-demo.yaml \
		output_dir=$(DEMO_OUT)/rerank data.train=$(DEMO_OUT)/data/train rerank.mined=$(DEMO_OUT)/mined \
		rerank.init_from=$(DEMO_OUT)/run/checkpoints/final; \
	$(BIN)/ldot eval recall --checkpoint $(DEMO_OUT)/run/checkpoints/final --data $(DEMO_OUT)/data/test \
		--rerank $(DEMO_OUT)/rerank/checkpoints/final --rerank-top 20; \
	echo; echo "demo finished in $$(( $$(date +%s) - start )) s; outputs under $(DEMO_OUT)/"

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# One tier at a time (markers: pyproject.toml; slurm and mlflow_server are applied by tests/conftest.py).
# `make test` above runs every tier; CI calls it.
FAST_TIER := not torchrun and not mlflow_server and not slurm and not slow

test-fast: setup
	$(BIN)/python -m pytest -m "$(FAST_TIER)" $(PYTEST_ARGS)

test-torchrun: setup
	$(BIN)/python -m pytest -m torchrun $(PYTEST_ARGS)

test-mlflow: setup
	$(BIN)/python -m pytest -m mlflow_server $(PYTEST_ARGS)

test-slurm: setup
	$(BIN)/python -m pytest -m slurm $(PYTEST_ARGS)

# Re-resolve the lock after changing dependencies in pyproject.toml.
lock: setup
	$(BIN)/python -m pip freeze --exclude-editable | sed 's/^torch==\([0-9.]*\)+.*/torch==\1/' > constraints.txt

clean:
	rm -rf $(DEMO_OUT)
