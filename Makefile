# layerscope: `make demo` traces the packaged MiniLM and draws it; `make test` runs every test.
# Both create .venv and install what they need; nothing has to be installed by hand.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU build of PyTorch; an unpinned torch would pull a multi-GB CUDA build.
TORCH  := torch==2.13.0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# core/_directc.c: the C part, compiled by the install (an editable install does not
# rebuild it when it changes)
$(VENV)/.demo-installed: pyproject.toml setup.py core/_directc.c | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[torch,minilm]"
	touch $@

# tests/toy_backend is a fourth backend installed the way a third party's would be: a
# distribution of its own, registered through the layerscope.backends entry point.
$(VENV)/.dev-installed: pyproject.toml setup.py core/_directc.c tests/toy_backend/pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps -e tests/toy_backend
	touch $@ $(VENV)/.demo-installed

demo: $(VENV)/.demo-installed
	mkdir -p demo
	$(BIN)/layerscope trace minilm -o demo/trace.zarr --overwrite
	$(BIN)/layerscope render attention demo/trace.zarr --layer 0 --head 0 -o demo/attention.png
	$(BIN)/layerscope render attention demo/trace.zarr --view grid -o demo/attention_grid.png
	$(BIN)/layerscope render attention demo/trace.zarr --view heads --layer 1 --head 0 4 7 -o demo/head_view.png
	$(BIN)/layerscope render hidden demo/trace.zarr --view norms -o demo/hidden_norms.png
	$(BIN)/layerscope render hidden demo/trace.zarr --view trajectory -o demo/trajectory.png
	$(BIN)/layerscope render activations demo/trace.zarr --view neurons --layer 2 -o demo/neurons.png
	$(BIN)/layerscope render stats demo/trace.zarr -o demo/distributions.png
	$(BIN)/layerscope report demo/trace.zarr -o demo/report.html
	@echo
	@echo "Trace:    demo/trace.zarr   (inspect it: $(BIN)/layerscope info demo/trace.zarr)"
	@echo "Pictures: $$(ls demo/*.png | tr '\n' ' ')"
	@echo "Report:   demo/report.html (one self-contained file: open it in a browser)"
	@echo "Next:     open it in Python: layerscope.open_trace('demo/trace.zarr')"

# The HTML report's browser test drives Debian's chromium (Playwright's own download is not used).
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null

# -P: the repository root is not put on sys.path, so core/, backends/ and renderers/ are
# reached only as layerscope.* (tests/conftest.py drops the root for a plain `-m pytest` too).
test: lint $(CHROMIUM)
	$(BIN)/python -P -m pytest

# ruff and mypy over the four packages (mypy checks them as the one package `layerscope`),
# and vulture for code nothing uses.
lint: $(VENV)/.dev-installed
	$(BIN)/ruff check core backends renderers layerscope tests benchmarks examples docs
	$(BIN)/mypy
	$(BIN)/vulture

bench: $(VENV)/.dev-installed
	$(BIN)/python benchmarks/capture_overhead.py
	$(BIN)/python benchmarks/capture_overhead_tensorflow.py
	$(BIN)/python benchmarks/capture_overhead_jax.py
	$(BIN)/python benchmarks/streaming_memory.py
	$(BIN)/python benchmarks/codecs.py
	$(BIN)/python benchmarks/render_one_head.py
	$(BIN)/python benchmarks/diff_memory.py

clean:
	rm -rf demo .pytest_cache
