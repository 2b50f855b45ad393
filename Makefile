# Two commands for a fresh machine: `make demo` (the main job) and `make test` (the suite).
# Each creates/refreshes its own virtualenv in .venv and installs everything it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU build of torch where there is no GPU (a plain `pip install torch` pulls a multi-GB CUDA build).
TORCH_CPU ?= torch==2.13.0

.PHONY: venv demo test test-quick bench bench-iterative clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if nvidia-smi -L >/dev/null 2>&1; then \
		echo "GPU found: installing the default (CUDA) torch build"; $(PY) -m pip install -q "torch>=2.4"; \
	else \
		echo "No GPU: installing the CPU torch build ($(TORCH_CPU))"; $(PY) -m pip install -q "$(TORCH_CPU)"; \
	fi
	$(PY) -m pip install -q -e ".[test,demo]"
	touch $@

demo: venv
	$(PY) examples/demo.py

test: venv
	$(PY) -m pytest tests --durations=30 --basetemp=$(CURDIR)/.pytest_tmp

# The edit loop: pure-logic tests and one end-to-end test per feature (tests marked `quick`); CI runs `make test`.
test-quick: venv
	$(PY) -m pytest tests -m quick --basetemp=$(CURDIR)/.pytest_tmp

bench: venv
	$(PY) bench/trainer_overhead.py

clean:
	rm -rf $(VENV) tmp_trainer demo_output

# TRL 0.23 (the last release with IterativeSFTTrainer) needs transformers 4.x: it gets its own virtualenv.
bench-iterative: venv
	test -x bench/.venv-trl/bin/python || ($(PYTHON) -m venv bench/.venv-trl && bench/.venv-trl/bin/pip install -q "$(TORCH_CPU)" "trl==0.23.*" "transformers>=4.56.1,<5" datasets accelerate)
	$(PY) bench/iterative_sft.py
