# The only entry points: demo, test, bench, lint. Each sets up what it needs from nothing
# and reuses what is already there (.venv, cargo's target/).

VENV      := .venv
PY        := $(VENV)/bin/python
PIP       := $(PY) -m pip
DEPS      := $(VENV)/.deps-installed
EXT       := $(VENV)/.extension-built
RUST_SRC  := $(shell find rust -name '*.rs' -o -name Cargo.toml) Cargo.toml pyproject.toml

.PHONY: all demo test test-rust test-python bench lint clean

all: test

$(PY):
	python3 -m venv $(VENV)

# Python dependencies (runtime and test). Re-run when pyproject.toml changes.
$(DEPS): pyproject.toml | $(PY)
	$(PIP) install --quiet --upgrade pip
	$(PY) -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
	  print('\n'.join(p['dependencies'] + p['optional-dependencies']['test']))" > $(VENV)/requirements.txt
	$(PIP) install --quiet "maturin>=1.5,<2" ruff -r $(VENV)/requirements.txt
	touch $@

# The Rust extension, built in release mode into the package (editable install).
$(EXT): $(DEPS) $(RUST_SRC)
	$(VENV)/bin/maturin develop --release --quiet
	touch $@

demo: $(EXT)
	$(PY) -m bigmodel demo

test: test-rust test-python

test-rust:
	cargo test -p bigmodel-store --release

test-python: $(EXT)
	$(PY) -m pytest -q

bench: $(EXT)
	$(PY) benchmarks/run_all.py

lint: $(DEPS)
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	$(VENV)/bin/ruff check python tests benchmarks
	$(VENV)/bin/ruff format --check python tests benchmarks

clean:
	cargo clean
	rm -rf $(VENV)
