# Two commands do all the set-up: `make demo` and `make test` (see README.md).
PY := .venv/bin/python
export OMP_NUM_THREADS ?= 2
export WANDB_MODE ?= offline

.PHONY: setup demo test test-fast bench bench-trl clean
setup:
	bash scripts/setup_env.sh

# GRPO from the shipped agent on the testbed (data=synthetic_hard): held-out pass@1 on
# 256 examples x 4 samples before the first step and after the last, printed at the end.
# It is seed 0 of the learning proof (docs/learning.md).
TESTBED := data=synthetic_hard trainer.prompts_per_step=8 learner.lr=1e-4 \
	learner.num_workers=1 learner.torch_threads=2
demo: setup
	$(PY) -m mmagent_rl.launch +algo=grpo $(TESTBED) trainer.total_steps=60 \
	  trainer.eval_every=60 $(ARGS)

test: setup
	$(PY) -m pytest -q --durations=30 $(PYTEST_ARGS)

# The unit tier only (tests/conftest.py applies the tiers): pure python/torch, minutes.
test-fast: setup
	$(PY) -m pytest -q -m unit $(PYTEST_ARGS)

# The figures of docs/performance.md; BENCH_ARGS=--quick for a short run.
bench: setup
	$(PY) bench/overhead.py $(BENCH_ARGS)
	$(PY) bench/weight_sync.py $(BENCH_ARGS)
	$(PY) bench/scaling.py $(BENCH_ARGS)
	$(PY) bench/demo_memory.py $(BENCH_ARGS)
	$(PY) bench/overlap.py $(BENCH_ARGS)

# TRL goes into its own venv (.venv/trl), which reads .venv's packages through a .pth
# file and adds only TRL and what it needs: nothing installed in .venv changes.
TRL_VENV := .venv/trl
bench-trl: setup
	[ -x $(TRL_VENV)/bin/python ] || $(PY) -m venv $(TRL_VENV)
	echo "import site; site.addsitedir('$$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")')" \
	  > "$$($(TRL_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/zz_main_venv.pth"
	$(TRL_VENV)/bin/python -m pip install --quiet trl==1.16.0
	$(PY) bench/vs_trl.py $(BENCH_ARGS)

clean:
	rm -rf outputs multirun runs .pytest_cache
