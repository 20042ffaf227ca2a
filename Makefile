# The single entry point: `make demo`, `make test`. Both work on a fresh clone.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.phema-deps
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: demo test build lint bench fuzz clean

# Python environment with the runtime and dev dependencies (torch included, installed once).
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch>=2.2" "numpy>=1.24" "safetensors>=0.4" "tqdm>=4.60" \
		"matplotlib>=3.7" "pytest>=8" "ruff>=0.6" "mpmath>=1.3" "maturin>=1.7,<2" \
		"lightning>=2.0" "transformers>=4.41" "accelerate>=0.26" "distributed>=2024.1" \
		"diffusers>=0.31" "scikit-learn>=1.3"
	# Test-only: the experiment trackers sweep(log_to=...) writes to (not needed by the demo).
	$(PY) -m pip install -q "tensorboard>=2.14" "mlflow-skinny>=2.10" "wandb>=0.16"
	touch $(STAMP)

# The extension in release mode, installed editable into the venv (Python sources are linked, so
# only the Rust sources and the build settings make it stale). A per-interpreter `_core` left by
# an earlier build would shadow the abi3 one, so it goes.
EXT := python/phema/_core.abi3.so
$(EXT): $(STAMP) Cargo.toml Cargo.lock pyproject.toml $(wildcard rust/*.rs)
	rm -f python/phema/_core.cpython-*.so
	VIRTUAL_ENV=$(CURDIR)/$(VENV) $(VENV)/bin/maturin develop --release --quiet
	touch $(EXT)

build: $(EXT)

demo: build
	$(VENV)/bin/phema demo

test: build
	cargo test --release --quiet
	$(PY) -m pytest

lint: $(STAMP)
	cargo fmt --check
	cargo clippy --release --all-targets --features python -- -D warnings
	$(VENV)/bin/ruff check python tests benches
	$(VENV)/bin/ruff format --check python tests benches

# Every benchmark (minutes; prints ratios, not a test). The reconstruct bench writes the store
# the Rust engine bench reads.
bench: build
	$(PY) benches/bench_solve.py
	$(PY) benches/bench_update.py
	$(PY) benches/bench_reconstruct.py
	cargo bench --bench engine
	$(PY) benches/bench_average.py
	$(PY) benches/bench_update_sharded.py
	$(PY) benches/bench_distributed.py
	$(PY) benches/bench_sweep.py

# The fuzz target over everything read from a file (docs/fuzzing.md): nightly Rust and cargo-fuzz
# (`cargo install cargo-fuzz`). Not part of `test`: building the fuzzer takes many minutes.
FUZZ_RUNS ?= 10000000
fuzz:
	cargo run --release --quiet --example fuzz_seed_corpus fuzz/corpus/headers
	cd fuzz && cargo +nightly fuzz run -O headers corpus/headers -- \
		-runs=$(FUZZ_RUNS) -rss_limit_mb=2048 -malloc_limit_mb=1024 -max_len=65536 -timeout=10

clean:
	rm -rf $(VENV) target
