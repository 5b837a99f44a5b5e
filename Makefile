# mnist_sweep: every target installs what it needs first, so each works on a fresh clone.
.DEFAULT_GOAL := help
PY    := .venv/bin/python
STAMP := .venv/.installed
# Some machines set PYTHONDONTWRITEBYTECODE=1: then every process compiles each module it imports,
# every time (a default run ~1.7x as long). What make starts writes bytecode into the venv instead.
unexport PYTHONDONTWRITEBYTECODE
MODEL ?= models:/mnist-cnn@champion
PORT  ?= 5001

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	python3.11 -m venv .venv
	@# --no-compile: a first import compiles only the modules it uses, not all of torch's
	$(PY) -m pip install --quiet --disable-pip-version-check --no-compile -e '.[dev]'
	@# Second step: the sweeper's metadata still pins optuna<3 (whose sqlite storage breaks
	@# under SQLAlchemy 2); it runs fine on the optuna 4/5 installed above.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-compile --no-deps 'hydra-optuna-sweeper==1.3.0'
	@# Compile what a run imports once, here: later processes load it, even under PYTHONDONTWRITEBYTECODE
	$(PY) -m mnist_sweep --help > /dev/null
	touch $@

install: $(STAMP)  ## create .venv with the project and its dependencies

data: $(STAMP)  ## download and verify MNIST into data/ (override: make data ARGS=data.root=DIR)
	$(PY) -m mnist_sweep.data $(ARGS)

run: $(STAMP)  ## train the default model and log it to MLflow (ARGS='model=deep optim.lr=0.05')
	$(PY) -m mnist_sweep $(ARGS)

sweep: $(STAMP)  ## run the default Optuna search (ARGS='hydra.sweeper.n_trials=4')
	$(PY) -m mnist_sweep -m $(ARGS)

test: $(STAMP)  ## run the whole test suite on both cores (tiny synthetic data, real servers, no network)
	@# 3 workers on 2 cores: a third of a test's time is spent waiting on a server, a sweep's
	@# subprocess or Slurm, and a third worker fills it (docs/benchmark.md: the suite's figures)
	@start=$$(date +%s); $(PY) -m pytest -n 3 --dist loadgroup --durations=25 $(ARGS); rc=$$?; \
	  echo "make test: the suite took $$(( $$(date +%s) - start )) s of wall time (exit $$rc)"; exit $$rc

test-fast: $(STAMP)  ## the in-process tests only (no subprocess sweeps or servers): the quick loop
	$(PY) -m pytest -m "not slow" $(ARGS)

bench: $(STAMP)  ## time to 99.0% vs the classic PyTorch recipe, overhead, sweep trials/min (QUICK=1: smoke test)
	$(PY) -m mnist_sweep.bench $(if $(QUICK),--quick) $(ARGS)

ui: $(STAMP)  ## MLflow UI on 127.0.0.1:5000, one process; prints the links to the runs and the Models tab (ARGS=paths.outputs=DIR)
	$(PY) -m mnist_sweep.viewers ui $(ARGS)

dashboard: $(STAMP)  ## optuna-dashboard on 127.0.0.1:8080: the sweep's study, live while it runs
	$(PY) -m mnist_sweep.viewers dashboard $(ARGS)

serve: $(STAMP)  ## serve a model on 127.0.0.1:5001, if it exists: the digit pad at / and REST (MODEL=runs:/<run id>/model PORT=5002)
	$(PY) -m mnist_sweep.viewers model model_uri=$(MODEL) port=$(PORT) $(ARGS)

services: $(STAMP)  ## start PostgreSQL and an MLflow tracking server on 127.0.0.1 (data in outputs/services); prints the exports
	$(PY) -m mnist_sweep.stack start $(ARGS)

services-stop: $(STAMP)  ## stop what make services started
	$(PY) -m mnist_sweep.stack stop $(ARGS)

soak: $(STAMP)  ## 3 workers, >= 60 tiny trials, faults injected, then every invariant checked (<= 20 min; ARGS='trials=90')
	$(PY) -m mnist_sweep.soak $(ARGS)

slurm: $(STAMP)  ## start a one-node Slurm cluster on 127.0.0.1 (state in outputs/services/slurm); prints the export
	$(PY) -m mnist_sweep.slurm start $(ARGS)

slurm-stop: $(STAMP)  ## cancel its jobs and stop what make slurm started
	$(PY) -m mnist_sweep.slurm stop $(ARGS)

screenshots: $(STAMP)  ## remake the README's pictures in docs/, the pad's too (needs chromium; a small real-MNIST sweep, ~5 min)
	$(PY) docs/screenshots.py $(ARGS)

.PHONY: help install data run sweep test test-fast bench ui dashboard serve services services-stop soak screenshots
