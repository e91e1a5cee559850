# cdcca — two commands do everything on a fresh machine:
#   make demo   # installs, then runs one full cloud-device round on the embedded models
#   make test   # installs, then runs the test suite
PY        ?= python3
VENV      ?= .venv
BIN       := $(VENV)/bin
WHEELS    ?= $(HOME)/.cache/cdcca/wheels
SDIST     ?= $(HOME)/.cache/cdcca/sdist
LLAMA_VER := 0.3.36
STAMP     := $(VENV)/.cdcca-installed

.PHONY: setup demo test bench models clean postgres

setup: $(STAMP)

# llama-cpp-python compiles from source (~5 min on 2 cores) and pip does not reuse that build,
# so we build its wheel once into a cache outside the clone and install from there.
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel setuptools
	$(BIN)/pip install -q "torch==2.13.0"
	mkdir -p $(WHEELS)
	ls $(WHEELS)/llama_cpp_python-$(LLAMA_VER)-*.whl >/dev/null 2>&1 || \
	  $(BIN)/pip wheel --no-deps -w $(WHEELS) llama-cpp-python==$(LLAMA_VER)
	# the sdist also carries llama.cpp's official HF->GGUF converter (cloud/converter.py runs it)
	ls $(SDIST)/llama_cpp_python-$(LLAMA_VER).tar.gz >/dev/null 2>&1 || \
	  $(BIN)/pip download -q --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_VER) -d $(SDIST)
	$(BIN)/pip install -q --find-links $(WHEELS) -e ".[test]"
	@if $(BIN)/pip list 2>/dev/null | grep -qi '^nvidia'; then echo "error: CUDA packages were pulled in; torch must stay the pinned CPU build" >&2; exit 1; fi
	touch $(STAMP)

demo: setup
	$(BIN)/cdcca demo

# The store tests also run against a real PostgreSQL server that the test fixture starts in a
# temp folder (tests/cloud/conftest.py); Debian's `postgresql` package provides the binaries.
postgres:
	@command -v pg_ctl >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; \
	  else echo "note: PostgreSQL is not installed, its store tests will be skipped" \
	            "(install Debian's postgresql package)" >&2; fi

test: setup postgres
	$(BIN)/python -m pytest -n 2 --dist loadgroup --durations=15

bench: setup
	$(BIN)/cdcca bench --out results

models: setup
	$(BIN)/cdcca models build

clean:
	rm -rf $(VENV) .pytest_cache results
