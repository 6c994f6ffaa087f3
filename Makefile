# camx developer tasks. `make help` lists them.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# torch/torchvision pinned for the install step only (pyproject keeps honest ranges).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
STAMP   = $(VENV)/.installed

.PHONY: help install test test-quick lint format demo bench bench-localisation clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-20s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install $(TORCH_PINS)
	$(BIN)/pip install -e '.[test,demo,timm,hf,clip]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv with camx, its test and demo extras

test: $(STAMP)  ## run the whole test suite (the largest models included)
	CAMX_SLOW=1 $(BIN)/python -m pytest -q

test-quick: $(STAMP)  ## the edit-test loop: everything but the tests marked slow
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)  ## ruff (lint + format check) and mypy
	$(BIN)/ruff check cam_cli tests bench
	$(BIN)/ruff format --check cam_cli tests bench
	$(BIN)/mypy cam_cli

format: $(STAMP)  ## apply ruff's formatting and safe fixes
	$(BIN)/ruff check --fix cam_cli tests bench
	$(BIN)/ruff format cam_cli tests bench

demo: $(STAMP)  ## explain sample_images with the offline pretrained EfficientNet-Lite0
	$(BIN)/camx explain sample_images -o out/demo --model efficientnet_lite0 --method gradcam,gradcam++,eigencam,random
	$(BIN)/camx explain sample_images -o out/demo --model efficientnet_lite0 --method cam --boxes --draw-boxes
	$(BIN)/camx evaluate out/demo --boxes-from tests/data/boxes.json
	$(BIN)/camx report out/demo
	@echo "overlays and maps: out/demo/*.METHOD.jpg/.npy; manifest: out/demo/manifest.jsonl; metrics: out/demo/metrics.jsonl; page: out/demo/report/index.html"

bench: $(STAMP)  ## throughput against the forward-only floor and the peers
	$(BIN)/python bench/throughput.py --model resnet18 --images 64
	$(BIN)/python bench/throughput.py --model resnet50 --images 64

bench-localisation: $(STAMP)  ## pointing game and box IoU on the sample photos
	$(BIN)/python bench/localisation.py

clean:  ## remove the venv and outputs
	rm -rf $(VENV) out .pytest_cache .ruff_cache .mypy_cache
