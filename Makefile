# sdserve: `make demo` runs the demo end to end, `make test` runs the tests.
# Every target installs what it needs into .venv on first use.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SOURCE ?= build/demo-pipeline
REPOSITORY ?= build/model_repository
UI_STAMP := $(VENV)/.installed-ui
UI_HOST ?= 127.0.0.1
UI_PORT ?= 7860
GRPC_URL ?= 127.0.0.1:8001
METRICS_URL ?= http://127.0.0.1:8002/metrics

.PHONY: demo test serve repository demo-pipeline lint clean ui chromium bench bench-full

$(STAMP): requirements.txt model_repository/pyproject.toml export/pyproject.toml client/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install --no-deps open-clip-torch==3.3.0  # only for its CLIP vocabulary file
	$(PY) -m pip install --no-deps -e model_repository -e client -e export
	touch $@

# The web UI's dependencies beyond requirements.txt, pinned, without their resolver (gradio's
# pillow cap and pandas 3's numpy 2 would fight the server's pins; see client/requirements-ui.txt).
$(UI_STAMP): $(STAMP) client/requirements-ui.txt
	$(PY) -m pip install --no-deps -r client/requirements-ui.txt
	touch $@

# Debian's chromium for the browser tests (never `playwright install`); needs root or sudo.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
		sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$sudo apt-get update -qq && $$sudo apt-get install -y -qq chromium; \
	} || { [ -z "$$CI" ] && echo "[chromium] not installed: the browser tests will skip"; }

build/demo-pipeline/model_index.json: $(STAMP)
	$(PY) -m sdserve_export demo-pipeline --out build/demo-pipeline

# Rebuilt when the Triton model files it copies change (a stale copy fails to import).
$(REPOSITORY)/inpaint/config.pbtxt: $(STAMP) $(wildcard model_repository/sdserve_pipeline/triton_models/*/model.py) $(if $(filter build/demo-pipeline,$(SOURCE)),build/demo-pipeline/model_index.json)
	$(PY) -m sdserve_export repository --source $(SOURCE) --out $(REPOSITORY)

demo-pipeline: build/demo-pipeline/model_index.json

repository: $(REPOSITORY)/inpaint/config.pbtxt

demo: repository
	$(PY) -m sdserve_export.demo --repository $(REPOSITORY)

serve: repository
	$(PY) -m sdserve_pipeline.serve --repository $(REPOSITORY) --build-dir build

# The UI lists every model when it has the operator's key: the one `make serve` generated
# (build/admin-key-<grpc port>) for a running server, else one made here for both.
ui: repository $(UI_STAMP)
	@key=build/admin-key-$(lastword $(subst :, ,$(GRPC_URL))); \
	if $(PY) -c "import sys, tritonclient.grpc as g; sys.exit(not g.InferenceServerClient('$(GRPC_URL)').is_server_live())" 2>/dev/null; then \
		echo "[ui] using the Triton server already running at $(GRPC_URL)"; \
	else \
		key=build/admin-key-ui; \
		(umask 077; $(PY) -c "import secrets; print(secrets.token_hex(32))" > $$key); \
		SDSERVE_ADMIN_KEY_FILE=$$key $(PY) -m sdserve_pipeline.serve --repository $(REPOSITORY) --build-dir build & \
		server=$$!; \
		trap 'kill -TERM $$server 2>/dev/null; wait $$server' EXIT; \
		trap 'exit 130' INT TERM; \
	fi; \
	$(PY) -m sdserve_client.webui --server $(GRPC_URL) --metrics-url $(METRICS_URL) \
		--host $(UI_HOST) --port $(UI_PORT) --wait-ready 600 \
		$$([ -r $$key ] && echo --admin-key-file $$key)

# Throughput/latency sweep on the demo pipeline (a few minutes); bench-full adds the full-size
# SD 1.5-inpainting architecture (random weights, built once under build/bench). Results go to
# benchmarks/results/ (json, md, png).
bench: repository
	$(PY) benchmarks/throughput.py --skip-full

bench-full: repository
	$(PY) benchmarks/throughput.py

test: $(STAMP) $(UI_STAMP) chromium
	$(PY) -m pytest tests -q

lint: $(STAMP) $(UI_STAMP)
	$(PY) -m pip install -q ruff mypy
	$(PY) -m ruff check model_repository export client tests benchmarks
	$(PY) -m ruff format --check model_repository export client tests benchmarks
	cd client && ../$(PY) -m mypy sdserve_protocol sdserve_client
	cd model_repository && ../$(PY) -m mypy sdserve_pipeline

clean:
	rm -rf build
