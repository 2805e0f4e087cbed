# Both targets build their own environment in .venv (python3 -m venv + pip); nothing else is needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO := demo-output

.PHONY: demo test venv browser gpu-check gpu-wheels clean

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

# Two test processes (pytest-xdist; TEST_WORKERS=0: one). A clean clone's .ci/run on a 2-core AMD EPYC:
# 8.0 min at 1baa5fe (pytest 6:00), 5.9 min at bd08ec2 (pytest 4:24, install ~88 s) once session data is
# built once per run (tests/conftest.py once_per_run) and trainer calls fork from a zygote that has imported
# torch (tests/zygote.py); three test processes were no faster (254 vs 255 s of pytest). A slower draw of the
# same machine (fits at 24-29 img/s, not 44-47) took 7.3 min at b3970d2 (pytest 5:28). The install compiles
# .pyc files on purpose: with PYTHONDONTWRITEBYTECODE=1 (set on that machine) a --no-compile install saved
# 38 s once, and importing the whole stack took 12.2 s instead of 6.0 s in every process after it.
TEST_WORKERS ?= 2
TEST_ENV = SHARDTOOL_REAL_DATA=$${SHARDTOOL_REAL_DATA:-$(CURDIR)/../shared/data}

test: venv browser
	$(TEST_ENV) $(BIN)/python -m pytest -q -n $(TEST_WORKERS)

# The GPU box's check (benchmarks/gpu_check.py): no venv, no pip, no network; the Python that runs it needs torch
# + torchvision (CUDA), numpy, pillow, click, rich, pytest, and the wheels of gpu-wheels/ (copied there with the
# tree). Without a GPU: make gpu-check GPU_DEVICE=cpu rehearses it (tests/test_gpu_check.py does, in make test).
GPU_OUT ?= gpu-check-output
GPU_DEVICE ?= cuda
gpu-check:
	$(PYTHON) -m benchmarks.gpu_check --out $(GPU_OUT) --device $(GPU_DEVICE)

# The wheels such a box lacks, for its Python (GPU_PYTHON), in files of at most 60 MB: gpu-wheels/core (~46 MB)
# and DALI's apart in gpu-wheels/dali (~270 MB; DALI=nvidia-dali-cuda120 for CUDA 12, DALI=none to leave it out).
GPU_PYTHON ?= 3.12
DALI ?= nvidia-dali-cuda130
gpu-wheels: venv
	$(BIN)/python -m benchmarks.gpu_wheels --python-version $(GPU_PYTHON) --dali $(DALI) --out gpu-wheels

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
