# The two entry points: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean bench-serving bench-stream results results-real container-test

venv: $(STAMP)

# uv installs the extras (pip stays in the venv, for users). uv reads no pip.conf, so the local
# wheels folder it names (WHEELS: torch's CPU build, which wins over PyPI's CUDA one) is passed on.
# --compile-bytecode: uv, unlike pip, writes no .pyc files, and where PYTHONDONTWRITEBYTECODE is set
# Python never writes them either, so every process would compile Feast, torch and pandas from
# source again (`import feast` 8.3 s against 5.0 s, docs/developing.md "Test time").
UV := 'uv>=0.13,<0.14'
WHEELS ?= /opt/wheels

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(UV)
	$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python $(if $(wildcard $(WHEELS)),--find-links $(WHEELS)) -e '.[train,dev,ray]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/loopfm demo

# pytest-xdist: each worker takes whole files (their module fixtures are built once) and builds
# the session's run itself; 2 workers on this 2-core machine (docs/developing.md "Test time").
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

bench-serving: $(STAMP)  # runs the demo first if needed; ~8 min; writes docs/benchmarks.{md,json}
	command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get install -y -q wrk >/dev/null; } \
	  || echo "wrk (Debian package wrk) not installed: the closed-loop rows will say so"
	test -f runs/demo/vm/loopfm_kd/onnx/model.onnx || $(BIN)/loopfm demo
	$(BIN)/loopfm bench serving --run-dir runs/demo --out docs

results: $(STAMP)  # 75 to 120 min on 2 cores: every experiment from scratch in runs/results, 5 seeds, main + L on the bench world, the other sweeps on the half-size sweep world; writes docs/results.{md,json} + docs/results/*.png
	rm -rf runs/results
	$(BIN)/loopfm experiment --out runs/results --docs docs

bench-stream: $(STAMP)  # builds its own world in runs/bench-stream (about a minute); ~25 min; writes docs/benchmarks-stream.{md,json}
	$(BIN)/loopfm bench stream --run-dir runs/bench-stream --out docs

container-test: $(STAMP)  # runs the demo first if needed; podman builds of both images + docker-compose.yml run for real (containers/test.sh; root)
	test -f runs/demo/vm/loopfm_kd/onnx/model.onnx || $(BIN)/loopfm demo
	containers/test.sh

clean:
	rm -rf runs .pytest_cache

ML100K_DEV := runs/data/ml100k-dev
results-real: $(STAMP)  # 9 min on 2 quiet cores, 14 to 20 shared with another 5-seed run (docs/experiments.md, "Cost"); suite results-real of loopfm/experiments/experiments.yaml (MovieLens-100K dev half Comedy and Drama, Ciao dev half categories 1 and 10), 5 seeds; writes docs/results-real.{md,json} + docs/results-real/*.png
	../shared/data/movielens-100k-dev.sh $(ML100K_DEV) $(abspath $(BIN)/python)
	rm -rf runs/results-real  # from scratch, as `results`: a resumed seed would keep predictions made by other code
	$(BIN)/loopfm experiment-real --suite results-real --out runs/results-real --seeds 5 --docs docs
