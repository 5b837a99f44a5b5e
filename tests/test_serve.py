import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_digits

pytestmark = pytest.mark.slow  # starts a real server: ~10 s

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_ready(server: subprocess.Popen, url: str, log: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the server exited with {server.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.5)
    pytest.fail(f"no answer from {url} in {seconds} s:\n{log.read_text()}")


def test_the_champion_answers_raw_pixels_over_rest(logged_model, tmp_path):
    port, log = free_port(), tmp_path / "serve.log"
    cmd = [str(VENV_BIN / "mlflow"), "models", "serve", "-m", "models:/mnist-cnn@champion",
           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    # the registry lives in the test's store; mlflow starts `uvicorn` by name, so the venv goes on PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": logged_model.tracking_uri,
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    with log.open("w") as out:
        # a session of its own: uvicorn is the server's child, and both must stop at the end
        server = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_ready(server, f"http://127.0.0.1:{port}/ping", log, seconds=120)
        images, _ = make_digits(5, seed=4)  # uint8: the JSON holds integers 0-255, as a client sends them
        body = json.dumps({"inputs": images[:, None].tolist()}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body,
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            served = np.array(json.load(response)["predictions"])
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    with torch.inference_mode():
        want = logged_model.model(torch.from_numpy(images).float().unsqueeze(1)).numpy()
    assert served.shape == (5, 10)
    np.testing.assert_allclose(served, want, rtol=1e-4, atol=1e-4)
