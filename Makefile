# Set-up and entry points. Each target creates or reuses the virtual environment .venv.
#
# torch and torchvision are installed as a matching pair from the package registry with
# `pip --isolated`: a machine-wide pip configuration may prefer a local CPU-only torch
# wheel, with which registry torchvision wheels fail at import
# ("operator torchvision::nms does not exist").
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# --isolated ignores the machine's pip configuration (see above); behind a package mirror
# or with a configuration of your own, keep it: `make setup PIP_FLAGS=`.
PIP_FLAGS ?= --isolated
PIP := $(BIN)/python -m pip install $(PIP_FLAGS) --disable-pip-version-check
TORCH_PAIR ?= torch==2.13.0 torchvision==0.28.0
# The newest Ultralytics release, tested by `make test`; `make test-compat` tests another.
ULTRALYTICS_PIN ?= ultralytics==8.4.190
STAMP := $(VENV)/.tbfeat-installed

.PHONY: setup test test-compat test-compat-hf demo browser bench docs clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) $(TORCH_PAIR)
	$(PIP) -e ".[ultralytics,lightning,timm,transformers,dev]" $(TORCH_PAIR) $(ULTRALYTICS_PIN)
	$(BIN)/python -c "import torch, torchvision; torchvision.ops.nms(torch.rand(2, 4), torch.rand(2), 0.5)"
	touch $(STAMP)

# Debian's chromium + chromium-driver for the TensorBoard browser test (apt, as root).
# Without them that test is skipped locally and fails under CI=true.
browser:
	-bash scripts/install_browser.sh

# Two pytest-xdist workers, one test file each at a time (the files share fixtures
# such as a trained YOLO); `make test TEST_WORKERS=0` runs the suite in one process.
TEST_WORKERS ?= 2
test: $(STAMP) browser
	$(BIN)/ruff check tbfeat tests scripts
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

# The Ultralytics tests against another release, e.g. the oldest pyproject.toml allows:
#   make test-compat ULTRALYTICS=8.3.0
# That release goes into its own folder (.compat/), ahead of the pinned one on PYTHONPATH;
# pandas is what releases before 8.4 need beyond the pinned one's requirements. Its
# settings file lives there too: an older release rewrites the user's own to its defaults.
ULTRALYTICS ?= 8.3.0
COMPAT := .compat/ultralytics-$(ULTRALYTICS)
test-compat: $(STAMP)
	test -f $(COMPAT)/.installed || { \
	  $(PIP) -q --no-deps --target $(COMPAT) "ultralytics==$(ULTRALYTICS)" \
	    pandas python-dateutil pytz tzdata && touch $(COMPAT)/.installed; }
	PYTHONPATH=$(abspath $(COMPAT)) YOLO_CONFIG_DIR=$(abspath $(COMPAT))/settings \
	  $(BIN)/python -c "import ultralytics; print('testing ultralytics', ultralytics.__version__)"
	PYTHONPATH=$(abspath $(COMPAT)) YOLO_CONFIG_DIR=$(abspath $(COMPAT))/settings \
	  $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_ultralytics.py tests/test_regressions.py

# The transformer tests against the oldest transformers and timm pyproject.toml allows
# (or others: make test-compat-hf TRANSFORMERS=4.57.3 TOKENIZERS=0.22.1), in their own
# folder ahead of the pinned ones; the tokenizers and huggingface_hub that release takes.
TRANSFORMERS ?= 4.48.0
TOKENIZERS ?= 0.21.0
HUB ?= 0.36.0
TIMM ?= 1.0.12
COMPAT_HF := .compat/transformers-$(TRANSFORMERS)-timm-$(TIMM)
HF_TESTS := tests/test_transformers.py tests/test_transformers_hf.py tests/test_hf_trainer.py \
	tests/test_sweep_hf.py tests/test_stages_shapes.py
test-compat-hf: $(STAMP)
	test -f $(COMPAT_HF)/.installed || { \
	  $(PIP) -q --no-deps --target $(COMPAT_HF) "transformers==$(TRANSFORMERS)" \
	    "tokenizers==$(TOKENIZERS)" "huggingface_hub==$(HUB)" "timm==$(TIMM)" \
	    && touch $(COMPAT_HF)/.installed; }
	PYTHONPATH=$(abspath $(COMPAT_HF)) $(BIN)/python -c \
	  "import transformers, timm; print('testing transformers', transformers.__version__, 'timm', timm.__version__)"
	PYTHONPATH=$(abspath $(COMPAT_HF)) $(BIN)/python -m pytest -q -p no:cacheprovider $(HF_TESTS)

demo: $(STAMP)
	$(BIN)/tbfeat demo --dir runs/demo

bench: $(STAMP)
	$(BIN)/python scripts/bench.py --json bench.json

docs: $(STAMP) browser
	$(BIN)/python scripts/screenshots.py

clean:
	rm -rf $(VENV) runs .pytest_cache .compat
