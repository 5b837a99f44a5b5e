"""Remake the README's pictures (``make screenshots``): a small sweep into a temporary store, the
MLflow UI on it and the digit pad on its champion (started as ``make ui`` and ``make serve`` start
them), and headless Chromium driven over the DevTools protocol. Debian's ``chromium`` is used as
installed; nothing downloads a browser. The pad's tests drive the browser with this module too.

    python docs/screenshots.py [--out docs] [--trials 6] [override ...]

The overrides reach the sweep (``data.root=DIR``; the tests pass tiny synthetic data). A picture is
taken only once the page shows what it should (every trial, the chosen columns, the charts, every
model in the Models tab, the pad's three likeliest digits for a drawn 7), so a blank page or
MLflow's GenAI overview fails the script instead of landing in the README. The sweep exports every trial's model (``mlflow.log_models=all``), so that
the Models tab shows them all.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from PIL import Image
from websockets.sync.client import connect

ROOT = Path(__file__).resolve().parent.parent
TABLE, CHART, MODELS, PAD = "runs-table.png", "trials-chart.png", "models-tab.png", "pad.png"
PICTURES = (TABLE, CHART, MODELS, PAD)
# What the runs table shows: the score and the searched params first, then what each run trained
# on and what started it. Column ids are the MLflow UI's own.
COLUMNS = ["metrics.`test_acc`", "params.`model`", "params.`optim.lr`", "params.`data.batch_size`",
           "attributes.`Dataset`", "attributes.`Source`"]
WIDTHS = {"attributes.`Run Name`": 230, "attributes.`Dataset`": 470, "attributes.`Source`": 230,
          "params.`optim.lr`": 90}
WIDTH = 1720  # pixels: every column above, once MLflow's side panels are closed
# The Models tab's columns left out of its picture (its Columns menu's names): what remains is each
# model's name, source run, registration, last test_acc and its costs. MLflow 3.17 orders this
# tab by creation time only.
MODEL_COLUMNS_HIDDEN = ["Status", "Logged from", "Dataset", "Parameters", "test_loss", "latency_ms_iqr"]
SYSTEM_METRICS = "system/"  # and every system metric (mlflow.system_metrics) a run of real length samples
MODEL_METRICS = ["test_acc", "param_count", "latency_ms", "model_bytes"]
# A 7 as a person draws it on the pad, in fractions of its canvas: the top bar, then the stem.
SEVEN = [(0.28, 0.2), (0.74, 0.2), (0.44, 0.82)]
PAD_SIZE = (760, 440)  # pixels: the pad's canvas and its three digits, side by side
# Headless, and nothing fetched that the page did not ask for (no updates, sync or field trials)
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                 "--remote-debugging-port=0"]


def browser() -> str:
    """Debian's chromium; FileNotFoundError saying how to get it if it is not installed."""
    found = shutil.which("chromium")
    if found is None:
        raise FileNotFoundError("chromium is not installed (Debian: apt-get install chromium)")
    return found


@contextlib.contextmanager
def chromium(profile: Path) -> Iterator[str]:
    """Headless Chromium with a fresh profile; yields its page's DevTools websocket URL."""
    process = subprocess.Popen([browser(), *BROWSER_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        port_file = profile / "DevToolsActivePort"  # Chromium writes the port it chose here
        wait_for(lambda: port_file.exists() and port_file.read_text().strip(), 30, "Chromium to start")
        with urllib.request.urlopen(f"http://127.0.0.1:{port_file.read_text().split()[0]}/json/list") as response:
            yield next(t for t in json.load(response) if t["type"] == "page")["webSocketDebuggerUrl"]
    finally:
        stop(process)


class Page:
    """A browser page driven over the DevTools protocol: one JSON request, one answer; the events
    that arrive meanwhile (of the domains a caller enabled) are kept in ``events``."""

    def __init__(self, socket) -> None:
        self.socket, self.calls, self.events = socket, 0, []

    def call(self, method: str, **params) -> dict:
        self.calls += 1
        self.socket.send(json.dumps({"id": self.calls, "method": method, "params": params}))
        while True:  # events arrive in between: skip to this call's answer
            message = json.loads(self.socket.recv())
            if "method" in message:
                self.events.append(message)
            elif message.get("id") == self.calls:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails']['text']}")
        return result["result"].get("value")

    def size(self, width: int, height: int) -> None:
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def open(self, url: str, ready: str, what: str) -> None:
        """Go to ``url`` and wait until the JavaScript expression ``ready`` is true."""
        self.call("Page.navigate", url=url)
        self.wait(ready, what)

    def wait(self, ready: str, what: str, seconds: float = 60) -> None:
        try:
            wait_for(lambda: self.js(f"Boolean({ready})"), seconds, what)
        except TimeoutError:
            seen = " ".join((self.js("document.body ? document.body.innerText : ''") or "").split())[:300]
            raise TimeoutError(f"{what}: not shown after {seconds} s; the page says: {seen!r}") from None

    def key(self, name: str) -> None:
        codes = {"Enter": 13, "Escape": 27}
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key=name, code=name, windowsVirtualKeyCode=codes[name])

    def click(self, selector: str) -> None:
        self.js(f"document.querySelector({json.dumps(selector)}).click()")

    def stroke(self, selector: str, points: list[tuple[float, float]], touch: bool = False,
               lift: bool = True) -> None:
        """Draw on the element through ``points`` (fractions of its width and height) as a person
        does, with the mouse's left button or a finger: down at the first, moved in small steps,
        lifted at the last (``lift=False``: still down, for :meth:`lift`)."""
        box = self.js(f"(b => [b.left, b.top, b.width, b.height])"
                      f"(document.querySelector({json.dumps(selector)}).getBoundingClientRect())")
        path = [(box[0] + x * box[2], box[1] + y * box[3]) for x, y in points]
        self.pointer("down", *path[0], touch)
        for (x0, y0), (x1, y1) in zip(path, path[1:]):
            steps = max(1, round(math.dist((x0, y0), (x1, y1)) / 6))  # a pointer reports every few pixels
            for step in range(1, steps + 1):
                self.pointer("move", x0 + (x1 - x0) * step / steps, y0 + (y1 - y0) * step / steps, touch)
        self.pen = (*path[-1], touch)
        if lift:
            self.lift()

    def lift(self) -> None:
        """Lift the mouse button or finger that :meth:`stroke` left down."""
        self.pointer("up", *self.pen)

    def pointer(self, action: str, x: float, y: float, touch: bool) -> None:
        if touch:
            kind = {"down": "touchStart", "move": "touchMove", "up": "touchEnd"}[action]
            self.call("Input.dispatchTouchEvent", type=kind, touchPoints=[] if action == "up" else [{"x": x, "y": y}])
        else:
            kind = {"down": "mousePressed", "move": "mouseMoved", "up": "mouseReleased"}[action]
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left",
                      buttons=0 if action == "up" else 1, clickCount=1)

    def screenshot(self, path: Path, colors: int = 96) -> None:
        """The viewport as a palette PNG: a UI has few colours, and a README wants small files."""
        png = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        image = Image.open(io.BytesIO(png)).convert("RGB")
        image.quantize(colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)


def wait_for(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.25)
    raise TimeoutError(f"waited {seconds} s for {what}")


def stop(process: subprocess.Popen) -> None:
    """End a process started in a session of its own, with everything it started."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sweep(outputs: Path, trials: int, overrides: list[str]) -> dict:
    """Run the sweep, every trial exporting its model; return its parent run, trials and models, as
    the UI will list them."""
    from mlflow import MlflowClient

    cmd = [sys.executable, "-m", "mnist_sweep", "-m", f"paths.outputs={outputs}",
           f"hydra.sweeper.n_trials={trials}", "mlflow.log_models=all", *overrides]
    print(f"screenshots: sweeping {trials} trials into {outputs}", flush=True)
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the sweep failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    client = MlflowClient(f"sqlite:///{outputs / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mnist_sweep").experiment_id
    runs = client.search_runs([experiment])
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return {"experiment": experiment, "parent": parent.info.run_id,
            "trials": [r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id],
            "models": [m.name for m in client.search_logged_models([experiment])]}


def view_state(parent: str) -> dict:
    """The runs page's saved view: columns, the sweep expanded, and charts comparing the trials."""
    section = "trials"
    charts = [  # what each trial scored against its learning rate, and against what it cost
        {"type": "SCATTER", "xaxis": {"key": "optim.lr", "type": "PARAM"},
         "yaxis": {"key": "test_acc", "type": "METRIC"}, "runsCountToCompare": 100},
        {"type": "SCATTER", "xaxis": {"key": "epoch_seconds", "type": "METRIC"},
         "yaxis": {"key": "test_acc", "type": "METRIC"}, "runsCountToCompare": 100},
        # numbers only: a parallel-coordinates axis cannot show the model's name
        {"type": "PARALLEL", "selectedParams": ["optim.lr", "data.batch_size"], "selectedMetrics": ["test_acc"],
         "showAllRuns": False},
    ]
    for n, chart in enumerate(charts):
        chart.update(uuid=f"chart{n}", metricSectionId=section, deleted=False, isGenerated=False)
    return {
        "selectedColumns": COLUMNS,
        "columnOrder": ["attributes.`Run Name`", "runDateAndNestInfo", *COLUMNS, "duration"],
        "columnWidths": WIDTHS,
        "runsExpanded": {parent: True},
        "compareRunCharts": charts,
        "compareRunSections": [{"uuid": section, "name": "Trials", "display": True, "isReordered": False,
                                "deleted": False, "isGenerated": False}],
    }


def shoot(page: Page, link: str, models_link: str, store: dict, out: Path) -> None:
    experiment, parent, trials = store["experiment"], store["parent"], store["trials"]
    page.size(WIDTH, 200 + 34 * (len(trials) + 1) + 160)  # the table's rows, and no more
    page.open(link.split("/#/")[0], "document.body", "the MLflow UI")
    key = f'MLflowLocalStorage-1.1-ExperimentPage-["{experiment}"]-ReactComponentState'
    page.js(f"localStorage.setItem({json.dumps(key)}, {json.dumps(json.dumps(view_state(parent)))})")
    trials_shown = " && ".join(f"document.body.innerText.includes({json.dumps(name)})" for name in trials)
    page.open(link, f"{trials_shown} && document.body.innerText.includes('mnist-train')",
              "the sweep's trials in the runs table")
    close_panels(page)
    # the grid renders only the columns in view: each must be there once the panels are closed
    page.wait(" && ".join(f"document.querySelector('.ag-header-cell[col-id=\"{c}\"]')" for c in COLUMNS),
              "every chosen column")
    page.screenshot(out / TABLE)

    page.size(WIDTH, 700)
    page.click('input[name="runs-view-mode"][value="CHART"]')
    page.wait("document.querySelectorAll('.js-plotly-plot').length >= 2"  # the two scatter charts
              " && document.body.innerText.includes('epoch_seconds vs. test_acc')"
              " && document.body.innerText.includes('Parallel Coordinates')", "the three trial charts")
    time.sleep(2)  # plotly animates its first draw
    page.screenshot(out / CHART)

    page.size(WIDTH, 200 + 34 * (len(store["models"]) + 1) + 40)
    models_shown = " && ".join(f"document.body.innerText.includes({json.dumps(name)})" for name in store["models"])
    page.open(models_link, f"document.body && {models_shown}", "every model in the Models tab")
    choose_model_columns(page)
    page.screenshot(out / MODELS)


# The pad's answer, once no prediction is pending: its likeliest digits, as the page lists them
PAD_ANSWER = ("(list => list && !list.dataset.pending && list.children.length === 3 && Array.from(list.children,"
              " item => [Number(item.dataset.digit), Number(item.dataset.probability)]))(document.getElementById('top'))")


def shoot_pad(page: Page, link: str, out: Path) -> None:
    """The digit pad with a 7 drawn on it, once it shows its three likeliest digits."""
    page.size(*PAD_SIZE)
    page.open(link, "document.getElementById('pad')", "the digit pad")
    page.stroke("#pad", SEVEN)
    page.wait(PAD_ANSWER, "the pad's three likeliest digits")
    (digit, probability), *_ = page.js(PAD_ANSWER)
    print(f"screenshots: the pad read the drawn 7 as {digit} ({probability:.1%})"
          + ("" if digit == 7 else ": the champion is no good at drawn digits; the picture shows it"), flush=True)
    page.screenshot(out / PAD)


def choose_model_columns(page: Page) -> None:
    """Untick ``MODEL_COLUMNS_HIDDEN`` and the ``SYSTEM_METRICS`` in the Models tab's Columns menu
    (a tree of checkboxes)."""
    def title(name: str) -> str:
        return f"document.querySelector('.du-bois-light-tree-treenode span[title={json.dumps(name)}]')"

    def node(name: str) -> str:
        return f"{title(name)}.closest('.du-bois-light-tree-treenode')"

    # the menu opens on a key press or a pointer's down and up, not on a scripted click
    page.js("document.querySelector('[data-component-id=\"mlflow.logged_model.list.columns\"]').focus()")
    page.key("Enter")
    page.wait(title("Parameters"), "the Columns menu")
    page.js(f"{node('No dataset')}.querySelector('.du-bois-light-tree-switcher').click()")  # the metrics' node
    page.wait(title("test_loss"), "the metrics in the Columns menu")
    for name in MODEL_COLUMNS_HIDDEN:
        page.js(f"{node(name)}.querySelector('.du-bois-light-tree-checkbox').click()")
    page.js(f"document.querySelectorAll('.du-bois-light-tree-treenode span[title^={json.dumps(SYSTEM_METRICS)}]')"
            ".forEach(span => span.closest('.du-bois-light-tree-treenode')"
            ".querySelector('.du-bois-light-tree-checkbox').click())")
    page.key("Escape")
    page.js("document.activeElement?.blur()")  # no focus ring on the Columns button in the picture
    headers = "Array.from(document.querySelectorAll('.ag-header-cell')).map(cell => cell.innerText.trim())"
    page.wait(" && ".join(f"{headers}.includes({json.dumps(name)})" for name in MODEL_METRICS)
              + f" && !{headers}.includes('Status') && !{headers}.includes('test_loss')"
              + f" && !{headers}.some(name => name.startsWith({json.dumps(SYSTEM_METRICS)}))", "the chosen model columns")


def close_panels(page: Page) -> None:
    """Hide the side panels (MLflow's assistant, the navigation) that would squeeze the table."""
    time.sleep(1)  # the assistant panel opens itself shortly after the first load
    page.js("""document.querySelector('button[aria-label="Close"]')?.click();
                  document.querySelector('button[aria-label="Toggle sidebar"]')?.click()""")
    time.sleep(1)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="where the PNGs go (default: docs/)")
    parser.add_argument("--trials", type=int, default=6, help="trials in the sweep (default: 6)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the sweep, e.g. data.root=DIR")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as servers:
        tmp = Path(tmp)
        store = sweep(tmp / "outputs", args.trials, args.overrides)
        ui_port, pad_port = free_port(), free_port()
        ui = servers.enter_context(viewer(tmp / "ui.log", "ui", f"paths.outputs={tmp / 'outputs'}", f"port={ui_port}"))
        pad = servers.enter_context(viewer(tmp / "serve.log", "model", "model_uri=models:/mnist-cnn@champion",
                                           f"paths.outputs={tmp / 'outputs'}", f"port={pad_port}"))
        # make ui's own first lines: the links to the runs table and to the Models tab
        link, models_link = (printed(ui, tmp / "ui.log", "make ui", f"/#/experiments/{store['experiment']}/{tab}"
                                     "?workflowType=machine_learning") for tab in ("runs", "models"))
        printed(pad, tmp / "serve.log", "make serve", "serving models:/mnist-cnn@champion")
        pad_link = printed(pad, tmp / "serve.log", "make serve", f"the digit pad: http://127.0.0.1:{pad_port}/")
        wait_for(lambda: _answers(f"http://127.0.0.1:{ui_port}/health"), 120, "the MLflow UI to answer")
        wait_for(lambda: _answers(f"http://127.0.0.1:{pad_port}/health"), 120, "make serve to answer")
        args.out.mkdir(parents=True, exist_ok=True)
        with chromium(tmp / "chromium") as url, connect(url, max_size=None, proxy=None) as socket:
            page = Page(socket)
            shoot(page, link, models_link, store, args.out)
            shoot_pad(page, pad_link, args.out)
    for name in PICTURES:
        print(f"screenshots: {args.out / name} ({(args.out / name).stat().st_size // 1024} KB)")
    return 0


@contextlib.contextmanager
def viewer(log: Path, *args: str) -> Iterator[subprocess.Popen]:
    """``python -m mnist_sweep.viewers args`` (what make ui and make serve run), its stderr in ``log``;
    stopped on leaving."""
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}  # no phoning home from the servers either
    with log.open("w") as err:
        process = subprocess.Popen([sys.executable, "-m", "mnist_sweep.viewers", *args], cwd=ROOT, env=env,
                                   stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
    try:
        yield process
    finally:
        stop(process)


def printed(process: subprocess.Popen, log: Path, command: str, expected: str) -> str:
    """The next line the viewer prints, which must hold ``expected``: its last word (a link)."""
    line = process.stdout.readline()
    if expected not in line:
        said = line.strip() or (log.read_text().strip().splitlines() or ["nothing"])[-1]
        raise RuntimeError(f"{command} printed {said!r}, not {expected!r}")
    return line.rsplit(" ", 1)[-1].strip()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
