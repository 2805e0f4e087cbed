# Both targets build their own environment in .venv (python3 -m venv + pip); nothing else is needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO := demo-output

.PHONY: demo test venv browser gpu-check clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,dali,train,s3,ray,export,serve,interop]'
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/python -m shardtool.synth $(DEMO)/shapes --per-class 100
	$(BIN)/shardtool pack $(DEMO)/shapes $(DEMO)/shards --split val=0.1,test=0.1 --stratify --resize shorter:96 --shard-size 128 --overwrite
	$(BIN)/shardtool verify $(DEMO)/shards --decode
	$(BIN)/trainer fit $(DEMO)/shards $(DEMO)/run --model efficientnet_lite0 --image-size 96 --epochs 3 \
		--batch-size 32 --crop-scale 0.35 --overwrite
	@echo "serve the demo model (upload page at http://127.0.0.1:8000/): $(BIN)/trainer serve $(DEMO)/run/best.pt"

# The browser test drives Debian's chromium (no browser download): installed here when it is missing and
# this user may (root with apt-get); otherwise that one test is skipped, and says why.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "no chromium here: the browser test will be skipped"

# Two test processes (pytest-xdist; TEST_WORKERS=0: one): 8.9 min instead of 13.1 for the same tests on a
# slower 2-core machine (2026-12-02); on a faster one, a clean clone's .ci/run took 8.1 min, 6:20 of it pytest
# (5023c27). The install compiles .pyc files on purpose: with PYTHONDONTWRITEBYTECODE=1 (set on that machine)
# a --no-compile install saved 38 s once, and importing the whole stack took 12.2 s instead of 6.0 s in every
# process after it (each test process and CLI call pays its share of that).
TEST_WORKERS ?= 2
TEST_ENV = SHARDTOOL_REAL_DATA=$${SHARDTOOL_REAL_DATA:-$(CURDIR)/../shared/data}

test: venv browser
	$(TEST_ENV) $(BIN)/python -m pytest -q -n $(TEST_WORKERS)

# Everything that needs a GPU (environment, GPU tests, GPU benchmark rows); says so and exits 0 without one.
gpu-check: venv
	$(BIN)/python -m benchmarks.gpu_check

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
