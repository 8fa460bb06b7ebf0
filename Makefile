# The two set-up commands of the README. Each creates .venv if needed and installs the package into it.
#   make demo   install, then measure collapse on the bundled checkpoints (prints per-block tables)
#   make test   install with test extras, then run the whole test suite (what .ci/run does)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision pinned to builds known to work together (CPU use of the CUDA wheel); override for other machines
TORCH ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?= -n 2

.PHONY: demo test install clean

$(VENV)/.installed-%: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[$*]"
	touch $@

install: $(VENV)/.installed-test

demo: $(VENV)/.installed-test
	$(VENV)/bin/collapse-probe similarity checkpoints/vit_micro_d32.safetensors --threshold 0.9 --images builtin:digits
	$(VENV)/bin/collapse-probe similarity checkpoints/deepvit_micro_d32.safetensors --threshold 0.9 --images builtin:digits

test: $(VENV)/.installed-test
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
