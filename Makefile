# Two commands do all the set-up: `make demo` and `make test` (see README.md).
PY := .venv/bin/python
export OMP_NUM_THREADS ?= 2
export WANDB_MODE ?= offline

.PHONY: setup demo test bench clean
setup:
	bash scripts/setup_env.sh

demo: setup
	$(PY) -m mmagent_rl.launch +algo=grpo $(ARGS)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(PY) bench/step_breakdown.py

clean:
	rm -rf outputs multirun runs .pytest_cache
