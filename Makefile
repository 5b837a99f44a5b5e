# mnist_sweep: every target installs what it needs first, so each works on a fresh clone.
.DEFAULT_GOAL := help
PY    := .venv/bin/python
STAMP := .venv/.installed
DB    := outputs/mlflow.db
MODEL ?= models:/mnist-cnn@champion
PORT  ?= 5001

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	python3.11 -m venv .venv
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@# Second step: the sweeper's metadata still pins optuna<3 (whose sqlite storage breaks
	@# under SQLAlchemy 2); it runs fine on the optuna 4/5 installed above.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps 'hydra-optuna-sweeper==1.3.0'
	touch $@

install: $(STAMP)  ## create .venv with the project and its dependencies

data: $(STAMP)  ## download and verify MNIST into data/ (override: make data ARGS=data.root=DIR)
	$(PY) -m mnist_sweep.data $(ARGS)

run: $(STAMP)  ## train the default model and log it to MLflow (ARGS='model=deep optim.lr=0.05')
	$(PY) -m mnist_sweep $(ARGS)

sweep: $(STAMP)  ## run the default Optuna search (ARGS='hydra.sweeper.n_trials=4')
	$(PY) -m mnist_sweep -m $(ARGS)

test: $(STAMP)  ## run the test suite (tiny synthetic data, no network)
	$(PY) -m pytest $(ARGS)

bench: $(STAMP)  ## time to 99.0% vs the classic PyTorch recipe, overhead, sweep trials/min (QUICK=1: smoke test)
	$(PY) -m mnist_sweep.bench $(if $(QUICK),--quick) $(ARGS)

ui: $(STAMP)  ## open the MLflow UI on http://127.0.0.1:5000
	$(PY) -m mlflow ui --backend-store-uri sqlite:///$(CURDIR)/$(DB) --host 127.0.0.1 --port 5000

serve: $(STAMP)  ## serve a registered model on http://127.0.0.1:5001 (MODEL=models:/mnist-cnn/2 PORT=5002)
	@# mlflow starts uvicorn by name: the venv's bin directory goes on PATH
	PATH="$(CURDIR)/.venv/bin:$$PATH" MLFLOW_TRACKING_URI=sqlite:///$(CURDIR)/$(DB) \
	  $(PY) -m mlflow models serve -m $(MODEL) --env-manager local --host 127.0.0.1 --port $(PORT)

.PHONY: help install data run sweep test bench ui serve
