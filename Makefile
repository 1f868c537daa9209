# `make test` sets everything up on a fresh machine, then runs the whole suite.
VENV ?= .venv
PYTHON ?= python3
# A CPU build of torch (from local disk on our dev/CI machines); override for CUDA hosts.
TORCH_SPEC ?= torch==2.13.0
# torchvision (Qwen2-VL's fast processors): the release built for TORCH_SPEC's torch, installed with --no-deps so pip
# never swaps torch for another build. PyPI's torchvision wheels are CUDA builds, which fail to import beside a CPU
# torch ("operator torchvision::nms does not exist"); with a CPU torch only a +cpu build is taken (from an index that
# has one, e.g. PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu), else none: Qwen2-VL then uses
# transformers' PIL image processor (src/triton_vlm/models/qwen2_vl/processor.py).
TORCHVISION_SPEC ?= torchvision==0.28.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install browser test unit integration docker-test clean

install: browser $(STAMP) $(VENV)/bin/perf_analyzer

# Headless Chromium for the playground's browser tests (tests/integration/test_playground.py): Debian's packages,
# installed only where missing and only as root (CI runs as root). Elsewhere those tests skip, and fail under CI=true.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium and chromium-driver (apt-get)"; \
		apt-get install -y -qq chromium chromium-driver >/dev/null || \
		{ apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
		echo "warning: could not install chromium: the browser tests will skip (and fail under CI=true)"; \
	else echo "note: chromium/chromedriver missing (not root): the browser tests will skip"; fi

# No pip cache: the venv is ~3 GB already, and a cached copy of every wheel would nearly double what a fresh
# machine needs on disk (a CI run once failed with "No space left on device" while installing torch).
PIP_INSTALL := $(PY) -m pip install --quiet --no-cache-dir

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP_INSTALL) "$(TORCH_SPEC)"
	$(PIP_INSTALL) -e ".[server,test]"
	@if $(PY) -c "import torchvision" 2>/dev/null; then :; \
	elif $(PY) -c "import sys, torch; sys.exit(torch.version.cuda is None)"; then \
		$(PIP_INSTALL) --no-deps "$(TORCHVISION_SPEC)"; \
	else $(PIP_INSTALL) --no-deps "$(TORCHVISION_SPEC)+cpu" 2>/dev/null || \
		echo "note: no CPU build of $(TORCHVISION_SPEC) on the configured indexes: Qwen2-VL uses its PIL processor"; fi
	touch $(STAMP)

# Triton's perf_analyzer (bench/README.md): the last tritonclient wheel that ships it, 2.51, holds the binary.
$(VENV)/bin/perf_analyzer: $(STAMP)
	rm -rf $(VENV)/perf-wheel && $(PY) -m pip download --quiet --no-cache-dir --no-deps tritonclient==2.51.0 -d $(VENV)/perf-wheel
	$(PY) -c "import pathlib, sys; from triton_vlm.bench.perf_analyzer import extract_binary; \
	extract_binary(next(pathlib.Path('$(VENV)/perf-wheel').glob('tritonclient-*.whl')), pathlib.Path('$(VENV)/bin'))"
	rm -rf $(VENV)/perf-wheel

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

unit: install
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

integration: install
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

# The CPU image for real (deploy/docker-test.sh, docs/deployment.md): build, start with tiny weights, ask from the
# host, check the metrics, restart, stop. Starts dockerd as root where none runs. Exit 77: skipped, no engine here.
docker-test: install
	PYTHON=$(abspath $(PY)) bash deploy/docker-test.sh

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info src/*.egg-info .docker-build
