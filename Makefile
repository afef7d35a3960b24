# The two entry points: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean bench-serving

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[train,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/loopfm demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench-serving: $(STAMP)  # runs the demo first if needed; ~6 min; writes docs/benchmarks.{md,json}
	test -f runs/demo/vm/loopfm_kd/onnx/model.onnx || $(BIN)/loopfm demo
	$(BIN)/loopfm bench serving --run-dir runs/demo --out docs

clean:
	rm -rf runs .pytest_cache
