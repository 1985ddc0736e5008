# Set-up and entry points. Each target creates or reuses the virtual environment .venv.
#
# torch and torchvision are installed as a matching pair from the package registry with
# `pip --isolated`: a machine-wide pip configuration may prefer a local CPU-only torch
# wheel, with which registry torchvision wheels fail at import
# ("operator torchvision::nms does not exist").
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --isolated --disable-pip-version-check
TORCH_PAIR ?= torch==2.13.0 torchvision==0.28.0
STAMP := $(VENV)/.tbfeat-installed

.PHONY: setup test demo browser bench docs clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) $(TORCH_PAIR)
	$(PIP) -e ".[ultralytics,lightning,dev]" $(TORCH_PAIR)
	$(BIN)/python -c "import torch, torchvision; torchvision.ops.nms(torch.rand(2, 4), torch.rand(2), 0.5)"
	touch $(STAMP)

# Debian's chromium + chromium-driver for the TensorBoard browser test (apt, as root).
# Without them that test is skipped locally and fails under CI=true.
browser:
	-bash scripts/install_browser.sh

test: $(STAMP) browser
	$(BIN)/ruff check tbfeat tests scripts
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/tbfeat demo --dir runs/demo

bench: $(STAMP)
	$(BIN)/python scripts/bench.py --json bench.json

docs: $(STAMP) browser
	$(BIN)/python scripts/screenshots.py

clean:
	rm -rf $(VENV) runs .pytest_cache
