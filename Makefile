# sdserve: `make demo` runs the demo end to end, `make test` runs the tests.
# Every target installs what it needs into .venv on first use.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SOURCE ?= build/demo-pipeline
REPOSITORY ?= build/model_repository

.PHONY: demo test serve repository demo-pipeline lint clean

$(STAMP): requirements.txt model_repository/pyproject.toml export/pyproject.toml client/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install --no-deps open-clip-torch==3.3.0  # only for its CLIP vocabulary file
	$(PY) -m pip install --no-deps -e model_repository -e client -e export
	touch $@

build/demo-pipeline/model_index.json: $(STAMP)
	$(PY) -m sdserve_export demo-pipeline --out build/demo-pipeline

$(REPOSITORY)/inpaint/config.pbtxt: $(STAMP) $(if $(filter build/demo-pipeline,$(SOURCE)),build/demo-pipeline/model_index.json)
	$(PY) -m sdserve_export repository --source $(SOURCE) --out $(REPOSITORY)

demo-pipeline: build/demo-pipeline/model_index.json

repository: $(REPOSITORY)/inpaint/config.pbtxt

demo: repository
	$(PY) -m sdserve_export.demo --repository $(REPOSITORY)

serve: repository
	$(PY) -m sdserve_pipeline.serve --repository $(REPOSITORY) --build-dir build

test: $(STAMP)
	$(PY) -m pytest tests -q

lint: $(STAMP)
	$(PY) -m pip install -q ruff mypy
	$(PY) -m ruff check model_repository export client tests benchmarks
	$(PY) -m mypy client/sdserve_client export/sdserve_export

clean:
	rm -rf build
