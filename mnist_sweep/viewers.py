"""``python -m mnist_sweep.viewers ui|dashboard|model [model_uri=URI] [port=N] [overrides]``: the
viewers behind ``make ui``, ``make dashboard`` and ``make serve`` (the MLflow UI, optuna-dashboard,
the model server with its digit pad).

Each reads its store from the config (so ``paths.outputs=…`` and the other overrides reach it),
says in one line where to look or what is missing, then becomes the server, on 127.0.0.1 only.
"""

from __future__ import annotations

import os
import sys

from mnist_sweep import cli
from mnist_sweep.config import ConfigError, compose, split_args

HOST = "127.0.0.1"  # this machine only: none of these servers has authentication
PORTS = {"ui": 5000, "dashboard": 8080, "model": 5001}  # the model server steps off MLflow's 5000, the UI's


def experiment_link(tracking_uri: str, experiment: str, port: int, tab: str = "runs") -> str | None:
    """A tab of the experiment's page in the MLflow UI: ``runs`` (the runs table) or ``models`` (each
    exported model with its params, scores and costs: the Models tab); None if no run has created
    the experiment yet.

    ``workflowType=machine_learning`` opens the Model-training view: without it MLflow 3 lands on
    its GenAI overview of traces, which this project has none of.
    """
    from mlflow import MlflowClient

    found = MlflowClient(tracking_uri).get_experiment_by_name(experiment)
    if found is None:
        return None
    return f"http://{HOST}:{port}/#/experiments/{found.experiment_id}/{tab}?workflowType=machine_learning"


def study_link(storage: str, study_name: str, port: int) -> str | None:
    """The study's page in optuna-dashboard, or None if no sweep has created the study yet."""
    import optuna

    try:
        study_id = optuna.storages.get_storage(storage).get_study_id_from_name(study_name)
    except KeyError:
        return None
    return f"http://{HOST}:{port}/dashboard/studies/{study_id}"


def ui(tracking_uri: str, experiment: str, port: int) -> None:
    link = experiment_link(tracking_uri, experiment, port)
    if link:
        print(f"MLflow UI, the {experiment} runs: {link}\n"
              f"  its models, side by side with their scores and costs: "
              f"{experiment_link(tracking_uri, experiment, port, 'models')}")
    else:
        print(f"MLflow UI on http://{HOST}:{port}: no experiment {experiment} yet (make run creates it; then reload)")
    serve_ui(tracking_uri, port)


def serve_ui(tracking_uri: str, port: int) -> None:
    """Become the MLflow UI: one server process, light beside a running sweep.

    ``mlflow ui`` as it comes starts 15 processes: itself, waiting on a uvicorn supervisor with 4
    workers, and a GenAI job runner (LLM judges, trace archival) with 8 consumers, none of which
    this project uses. Here MLflow's own command line still sets the server up (stores, security,
    the server's environment), with one worker and no job runner, and this process then becomes
    that server (exec) where MLflow would start it as a child and wait on it.
    """
    import mlflow.server
    from mlflow.cli import cli

    os.environ["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # as make services' server (stack.py)
    mlflow.server._exec_cmd = _become  # what MLflow's server launch calls to start its child
    cli(["server", "--backend-store-uri", tracking_uri, "--host", HOST, "--port", str(port), "--workers", "1"],
        prog_name="mlflow")


def _become(cmd: list[str], extra_env: dict[str, str] | None = None, **_: object) -> None:
    """In place of MLflow's child-process start: replace this process with ``cmd``."""
    sys.stdout.flush()  # before exec replaces this process
    sys.stderr.flush()
    os.execve(cmd[0], cmd, {**os.environ, **(extra_env or {})})


def dashboard(storage: str, study_name: str, port: int) -> None:
    from optuna_dashboard import run_server

    link = study_link(storage, study_name, port)
    print(f"optuna-dashboard, study {study_name}: {link}" if link else
          f"optuna-dashboard on http://{HOST}:{port}: no study {study_name} yet (make sweep creates it)")
    run_server(storage, host=HOST, port=port)


def model(tracking_uri: str, uri: str, port: int) -> None:
    """Serve the model ``uri`` names, after checking that it exists (a missing champion is then one
    line saying what to pass instead, not the model server's traceback): MLflow's scoring API and the
    digit pad (:mod:`mnist_sweep.pad`), in this one process.

    MLflow's own ``mlflow models serve`` starts uvicorn on its scoring app; here this process runs
    that same app, with the pad's page and endpoint added, in uvicorn itself.
    """
    import mlflow
    import uvicorn

    from mnist_sweep import pad, registry

    mlflow.set_tracking_uri(tracking_uri)  # registry URIs resolve in this store
    model_uri, run_id = registry.resolve_model(uri, option="MODEL")
    served = pad.app(mlflow.pyfunc.load_model(model_uri), f"{uri} ({model_uri}, logged by run {run_id})")
    print(f"serving {uri} ({model_uri}, logged by run {run_id})\n"
          f"  the digit pad: http://{HOST}:{port}/\n"
          f"  REST: POST http://{HOST}:{port}/invocations (raw pixels) or http://{HOST}:{port}/digit (an image)")
    sys.stdout.flush()
    # no access log: the pad asks several times a second while a stroke is drawn
    uvicorn.run(served, host=HOST, port=port, access_log=False)


def main(argv: list[str]) -> int:
    """Ctrl-C is how the dashboard and the model server stop (status 130); the UI execs its server."""
    server = argv[0] if argv else ""
    if server not in PORTS:
        raise ConfigError(f"name a server: {', '.join(PORTS)} (got {server!r})")
    args, overrides = split_args(argv[1:], ("model_uri", "port"))
    port = int(args["port"][-1]) if args["port"] else PORTS[server]
    cfg = compose(overrides, with_hydra=server == "dashboard")
    if server == "ui":
        ui(cfg.mlflow.tracking_uri, cfg.mlflow.experiment, port)
    elif server == "dashboard":
        dashboard(cfg.hydra.sweeper.storage, cfg.hydra.sweeper.study_name, port)
    else:
        if len(args["model_uri"]) != 1:
            raise ConfigError("give one MODEL=URI: runs:/<run_id>/model, models:/mnist-cnn@champion or a run id")
        model(cfg.mlflow.tracking_uri, args["model_uri"][0], port)
    return 0


if __name__ == "__main__":
    cli.run(main)
