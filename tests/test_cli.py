"""What every command-line tool shares: one ``error:`` line and its exit status, and the process's
collector policy (off while importing, frozen imports, on while it works)."""

import errno
import gc
import subprocess
import sys

import pytest

from conftest import run_cli, runs_in
from mnist_sweep import cli
from mnist_sweep.config import PROJECT_ROOT


def run_tool(tool, monkeypatch) -> int:
    monkeypatch.setattr(sys, "argv", ["tool", "a=1"])
    try:
        with pytest.raises(SystemExit) as exit_:
            cli.run(tool)
    finally:
        gc.unfreeze()  # cli.run froze this test process's objects
    return exit_.value.code


def test_a_tools_error_is_one_redacted_line_and_status_1(monkeypatch, capsys):
    def tool(argv):
        assert argv == ["a=1"]
        raise ConnectionError("cannot reach\n  postgresql://bob:hunter2@db/optuna:\n  refused")

    assert run_tool(tool, monkeypatch) == 1
    assert capsys.readouterr().err == "error: cannot reach postgresql://bob:***@db/optuna: refused\n"


def test_a_tool_ends_with_its_status_and_ctrl_c_is_130(monkeypatch):
    assert run_tool(lambda argv: 0, monkeypatch) == 0
    assert run_tool(lambda argv: 1, monkeypatch) == 1

    def interrupted(argv):
        raise KeyboardInterrupt

    assert run_tool(interrupted, monkeypatch) == 130


def test_inside_a_hydra_job_the_named_errors_become_one_line_and_others_pass():
    with pytest.raises(SystemExit, match="^error: bad value$"):
        with cli.one_line_errors(ValueError):
            raise ValueError("bad\n value")
    with pytest.raises(KeyError):  # a bug keeps its traceback
        with cli.one_line_errors(ValueError):
            raise KeyError("x")


def test_inside_a_hydra_job_any_error_a_full_disk_caused_is_one_line_naming_the_disk(tmp_path):
    with pytest.raises(SystemExit) as exit_:
        with cli.one_line_errors(ValueError, writes=[tmp_path]):
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError as err:
                raise RuntimeError("could not save the weights") from err  # as a library wraps it
    assert str(exit_.value).startswith(f"error: the disk holding {tmp_path} ran out of space")
    assert "\n" not in str(exit_.value)


def test_collection_is_deferred_only_when_the_module_is_the_program():
    assert gc.isenabled()
    cli.defer_collection("mnist_sweep.evaluate")  # imported, as the tests do
    assert gc.isenabled()
    try:
        cli.defer_collection("__main__")
        assert not gc.isenabled()
    finally:
        gc.enable()


@pytest.mark.parametrize("args,message", [
    (("mnist_sweep", "epochs=0"), "error: epochs must be >= 1, got 0"),
    (("mnist_sweep.data", "data.rooot=typo"), "error: Could not override 'data.rooot'."),
    (("mnist_sweep.evaluate",), "error: give one model_uri=URI: "),
    (("mnist_sweep.reproduce", "run_id=latest"), "error: run_id=latest is not a run id, runs:/<run_id>/… or "),
    (("mnist_sweep.predict", "model_uri=models:/m@champion"), "error: give images=PATH: "),
    (("mnist_sweep.viewers", "teapot"), "error: name a server: ui, dashboard, model (got 'teapot')"),
    (("mnist_sweep.stack", "start", "pg_port=abc"), "error: pg_port must be a port number, 1 to 65535 (got 'abc')"),
])
def test_every_tools_bad_input_is_one_line_as_a_user_sees_it(args, message):
    done = run_cli(*args, timeout=120)
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith(message) and done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def test_a_job_that_imported_modules_freezes_them_and_one_that_imported_none_freezes_nothing(tmp_path, monkeypatch):
    (tmp_path / "lazily_imported.py").write_text("def f():\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "lazily_imported", raising=False)
    gc.unfreeze()
    try:
        with cli.freeze_late_imports():
            pass
        assert gc.get_freeze_count() == 0
        with cli.freeze_late_imports():
            import lazily_imported
        assert gc.get_freeze_count() > 0
        assert not any(o is lazily_imported.f for o in gc.get_objects())  # the collector walks it no more
    finally:
        gc.unfreeze()


def test_a_sweep_process_freezes_its_imports_and_its_first_trials_and_still_collects_while_it_trains(overrides,
                                                                                                      tmp_path):
    """``python -m mnist_sweep`` keeps the collector off its imports (walking them costs seconds) but
    on while it runs: a sweep's trials share one process, and their garbage must not pile up. What
    its first trial imports (torch._dynamo, as its optimizer is built) is frozen once it ends."""
    watch_fit = (
        "import gc, runpy, sys\n"
        "from mnist_sweep import train\n"
        "fit = train.fit\n"
        "def watched(*args, **kwargs):\n"
        "    print('collector', gc.isenabled(), gc.get_freeze_count(), flush=True)\n"
        "    return fit(*args, **kwargs)\n"
        "train.fit = watched\n"
        "sys.argv = ['mnist_sweep', *sys.argv[1:]]\n"
        "runpy.run_module('mnist_sweep', run_name='__main__')\n"
    )
    done = subprocess.run([sys.executable, "-c", watch_fit, "-m", *overrides, "hydra.sweeper.n_trials=2",
                           "mlflow.model_format=null"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    trials = [line.split() for line in done.stdout.splitlines() if line.startswith("collector")]
    assert [enabled for _, enabled, _ in trials] == ["True", "True"]
    first, second = (int(frozen) for _, _, frozen in trials)
    assert first > 300_000  # torch, MLflow, Hydra: every module the process imported before its first trial
    assert second > first  # and what that trial imported
    assert [run.info.status for run in runs_in(tmp_path / "outputs") if "trial" in run.data.tags] \
        == ["FINISHED", "FINISHED"]
