# `make demo` and `make test` set everything up themselves: a virtual environment in .venv with
# torchremote installed in editable mode, dependencies pinned by constraints.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: demo test browser bench conformance gpu-check clean

$(STAMP): setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/quickstart.py

test: $(STAMP) browser
	$(PY) -m pytest

# the console's tests drive Debian's Chromium headless (through Playwright): installed here when
# missing and this runs as root (CI does); elsewhere those tests say how to get it and skip
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "no chromium here: the console's browser tests will skip (as root: apt-get install chromium)"; fi; }

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[bench]'
	touch $(BENCH_STAMP)

# mycelya-torch, an optional peer, in an environment of its own (it compiles against torch and
# brings many dependencies). Tried once; where it does not build, the bench says so and goes on.
MYCELYA_VENV := .venv-mycelya
MYCELYA_STAMP := $(VENV)/.tried-mycelya

$(MYCELYA_STAMP): $(STAMP)
	-$(PYTHON) -m venv $(MYCELYA_VENV) && \
	  $(MYCELYA_VENV)/bin/pip install --quiet -c constraints.txt torch setuptools wheel && \
	  $(MYCELYA_VENV)/bin/pip install --quiet --no-build-isolation -c constraints.txt mycelya-torch || \
	  { echo "mycelya-torch did not build here: the bench leaves it out"; rm -rf $(MYCELYA_VENV); }
	touch $(MYCELYA_STAMP)

# torchremote beside local torch, torch.distributed.rpc, raw websockets and raw TCP; writes
# benchmarks/results/{results.md,results.json,transfer.png,latency.png}. About 5 minutes on 2 cores.
bench: $(BENCH_STAMP) $(MYCELYA_STAMP)
	$(PY) -m benchmarks.bench

# a worker on this machine's GPU beside local CUDA eager (bf16 autocast steps, checkpointing memory,
# a 1 GiB transfer); says "no CUDA device" and exits 0 where there is none
gpu-check: $(STAMP)
	$(PY) -m benchmarks.gpu_check

# every op in PyTorch's OpInfo database, locally and on a worker: float32, int64, bool and complex64
# value passes, the autograd pass, and torch's module and optimizer databases; writes
# benchmarks/results/conformance.{md,json}. About three minutes on 2 cores.
conformance: $(STAMP)
	$(PY) -m benchmarks.conformance

clean:
	rm -rf $(VENV) $(MYCELYA_VENV) .pytest_cache .hypothesis build *.egg-info
