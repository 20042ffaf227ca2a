# The single entry point: `make demo`, `make test`. Both work on a fresh clone.
VENV   ?= .venv
PY     := $(VENV)/bin/python
UV     := $(VENV)/bin/uv
DEMO_DEPS := $(VENV)/.phema-demo-deps
DEV_DEPS  := $(VENV)/.phema-dev-deps
INSTALL   := $(UV) pip install --quiet --python $(PY) -r pyproject.toml
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: demo test build lint bench fuzz clean

# Two dependency sets, each installed once, by uv (from PyPI; much faster than pip, and it skips
# byte-compiling torch): `make demo` installs only the demo's and the build's, `make test` adds the
# test extras. pyproject.toml's extras list them; maturin is the build backend it names.
$(UV):
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet uv

$(DEMO_DEPS): pyproject.toml | $(UV)
	$(INSTALL) --extra demo "maturin>=1.7,<2"
	touch $@

$(DEV_DEPS): $(DEMO_DEPS)
	$(INSTALL) --extra dev
	touch $@

# The extension in release mode, installed editable into the venv (Python sources are linked, so
# only the Rust sources and the build settings make it stale). A per-interpreter `_core` left by
# an earlier build would shadow the abi3 one, so it goes. `--uv` installs it without pip's noise.
EXT := python/phema/_core.abi3.so
$(EXT): $(DEMO_DEPS) Cargo.toml Cargo.lock pyproject.toml $(shell find rust -name '*.rs')
	rm -f python/phema/_core.cpython-*.so
	VIRTUAL_ENV=$(CURDIR)/$(VENV) $(VENV)/bin/maturin develop --release --uv --quiet
	touch $(EXT)

build: $(EXT)

demo: build
	$(VENV)/bin/phema demo

# The Rust tests reuse the extension's release build of every dependency, so only the crate itself
# compiles again: Cargo.toml's dev-dependencies make the features match, and `--lib` leaves out the
# fuzz corpus example, whose plain rlib would need every dependency again as object code instead of
# the extension's LTO bitcode (`make lint` and `make fuzz` build the example). The test build of
# the crate itself needs no full optimisation: at opt-level 1 it takes a seventh less CPU time and
# its tests run as fast (the dependencies keep the extension's profile, so they are still reused).
# pytest runs on two workers, a test file each at a time (module fixtures are made once): the
# tests are single-threaded, so two cores nearly halve the wall time.
test: build $(DEV_DEPS)
	cargo test --release --lib --quiet --config 'profile.release.package.phema.opt-level=1'
	$(PY) -m pytest -n 2 --dist loadfile

lint: $(DEV_DEPS)
	cargo fmt --check
	cargo clippy --release --all-targets --features python -- -D warnings
	$(VENV)/bin/ruff check python tests benches
	$(VENV)/bin/ruff format --check python tests benches

# Every benchmark (minutes; prints ratios, not a test). The reconstruct bench writes the store
# the Rust engine bench reads.
bench: build $(DEV_DEPS)
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
