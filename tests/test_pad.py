"""The digit pad (mnist_sweep/pad.py, served by make serve): a drawing is prepared as predict
prepares a photo and answered with its three likeliest digits; in headless Chromium, a digit drawn
with the mouse or a finger shows them on the page as it is drawn; bad input is a 4xx and one line.

The model is trained here, in seconds, on shapes that survive MNIST's centring and scaling (the
conftest digits are blocks told apart by position, which centring erases): a vertical bar is a 1, a
ring a 0, and the 7 the README's picture draws a 7."""

from __future__ import annotations

import http.client
import io
import json
import math
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import screenshots  # docs/screenshots.py: the DevTools driver that takes the README's pictures
import torch
from PIL import Image, ImageDraw
from websockets.sync.client import connect

from conftest import require
from mnist_sweep import pad, tracking
from mnist_sweep.config import PROJECT_ROOT
from mnist_sweep.model import ConvNet
from mnist_sweep.predict import classify, to_mnist
from mnist_sweep.stack import free_port
from test_viewers import stop, wait_until_ready

SIDE = 280  # the pad's canvas, in pixels
SHAPES = {  # digit → its one stroke, in fractions of the canvas
    1: [(0.5, 0.15), (0.5, 0.85)],
    0: [(0.5 + 0.25 * math.sin(2 * math.pi * i / 24), 0.5 - 0.33 * math.cos(2 * math.pi * i / 24)) for i in range(25)],
    7: screenshots.SEVEN,
}
pytestmark = pytest.mark.xdist_group("pad")  # one worker: one model, one server and one browser for them all
PAGE_TOP = "Array.from(document.querySelectorAll('#top li'), item => item.innerText.replace(/\\s+/g, ' ').trim())"


def drawing(stroke: list[tuple[float, float]], rng: np.random.Generator, kind: str = "PNG") -> bytes:
    """``stroke`` as a hand draws it on the pad, black on white: each time a little moved, scaled,
    turned, stretched and thicker or thinner."""
    scale, turn, stretch = rng.uniform(0.5, 1.1), rng.uniform(-0.25, 0.25), rng.uniform(0.8, 1.2)
    width = rng.integers(10, 30)
    shift = rng.uniform(-0.12, 0.12, 2)
    points = []
    for x, y in stroke:
        x, y = (x - 0.5) * scale * stretch, (y - 0.5) * scale
        x, y = x * math.cos(turn) - y * math.sin(turn), x * math.sin(turn) + y * math.cos(turn)
        points.append(((x + 0.5 + shift[0]) * SIDE, (y + 0.5 + shift[1]) * SIDE))
    image = Image.new("L", (SIDE, SIDE), 255)
    pen = ImageDraw.Draw(image)
    pen.line(points, fill=0, width=int(width), joint="curve")
    for x, y in (points[0], points[-1]):  # round ends, as the pad's
        pen.ellipse((x - width / 2, y - width / 2, x + width / 2, y + width / 2), fill=0)
    out = io.BytesIO()
    image.save(out, kind)
    return out.getvalue()


def blank_png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (SIDE, SIDE), "white").save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="session")
def shapes_model(tmp_path_factory) -> SimpleNamespace:
    """A ConvNet trained on SHAPES as the pad's drawings reach it (through ``to_mnist``), logged as
    pt2 to a store of its own, as a run logs its model, and loaded as make serve loads it."""
    rng = np.random.default_rng(0)
    labels = rng.choice(list(SHAPES), 120)
    images = np.stack([to_mnist(Image.open(io.BytesIO(drawing(SHAPES[int(d)], rng)))) for d in labels])
    torch.manual_seed(0)
    model = ConvNet([4, 8])
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    inputs, targets = torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).long()
    for _ in range(20):  # full batches: right on every fresh drawing after 15
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
    model.eval()

    store = tmp_path_factory.mktemp("pad_store")
    tracking_uri = f"sqlite:///{store / 'mlflow.db'}"
    tracking.use_store(tracking_uri, "pad", str(store / "mlartifacts"))
    with tracking.run("shapes", {}, {}) as active:
        tracking.log_pytorch_model(model, images[:2, None], "pt2", "shapes")
    model_uri = mlflow.get_run(active.info.run_id).data.tags[tracking.MODEL_URI_TAG]
    return SimpleNamespace(model=model, served=mlflow.pyfunc.load_model(model_uri), tracking_uri=tracking_uri,
                           run_id=active.info.run_id, model_uri=model_uri)


def test_a_drawing_is_prepared_as_predict_prepares_a_photo_and_answered_with_three_digits(shapes_model):
    rng = np.random.default_rng(1)  # drawings the model has not seen
    for digit, stroke in SHAPES.items():
        for kind in ("PNG", "JPEG"):  # the canvas's PNG, and a photo
            image = drawing(stroke, rng, kind)
            status, answer = pad.answer(shapes_model.served, image)
            assert status == 200, answer
            top = answer["top"]
            # what predict says of the same image, with the model itself rather than as served
            [best], [probability] = classify(shapes_model.model, to_mnist(Image.open(io.BytesIO(image)))[None], 1)
            assert top[0]["digit"] == best == digit
            assert top[0]["probability"] == pytest.approx(float(probability), abs=1e-5)
            probabilities = [entry["probability"] for entry in top]
            assert len({entry["digit"] for entry in top}) == 3
            assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1 + 1e-6


def test_a_drawing_that_cannot_be_read_is_one_line_saying_why(shapes_model):
    assert pad.answer(shapes_model.served, b"") == (
        400, {"error": "the request holds no image: POST a PNG or JPEG as the body"})
    assert pad.answer(shapes_model.served, b"\x89PNG not really") == (
        422, {"error": "the drawing: not an image (or a format PIL cannot read)"})
    assert pad.answer(shapes_model.served, blank_png()) == (
        422, {"error": "the drawing: no digit found: the image is blank"})
    truncated = drawing(SHAPES[1], np.random.default_rng(2))[:400]
    status, answer = pad.answer(shapes_model.served, truncated)
    assert status == 422 and answer["error"].startswith("the drawing: ") and "\n" not in answer["error"]


# --------------------------------------------------------------------------- the real server

@pytest.fixture(scope="session")
def pad_server(shapes_model, tmp_path_factory) -> Iterator[SimpleNamespace]:
    """make serve on the shapes model, as a user starts it."""
    folder, port = tmp_path_factory.mktemp("pad_server"), free_port()
    printed, log = folder / "stdout", folder / "stderr"
    cmd = [sys.executable, "-m", "mnist_sweep.viewers", "model", f"model_uri={shapes_model.run_id}", f"port={port}",
           f"mlflow.tracking_uri={shapes_model.tracking_uri}"]
    with printed.open("w") as out, log.open("w") as err:
        server = subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=out, stderr=err, start_new_session=True)
    try:
        wait_until_ready(server, f"http://127.0.0.1:{port}/ping", log, seconds=120)
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}/", port=port, printed=printed)
    finally:
        stop(server)


def post(url: str, body: bytes, kind: str = "image/png") -> tuple[int, dict]:
    request = urllib.request.Request(url, body, {"Content-Type": kind})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


@pytest.mark.slow  # a real server
def test_make_serve_prints_the_pads_link_and_serves_a_page_that_needs_no_other_site(pad_server, shapes_model):
    first, second, third = pad_server.printed.read_text().splitlines()
    assert first == f"serving {shapes_model.run_id} ({shapes_model.model_uri}, logged by run {shapes_model.run_id})"
    assert second == f"  the digit pad: {pad_server.url}"
    assert third == f"  REST: POST {pad_server.url}invocations (raw pixels) or {pad_server.url}digit (an image)"
    with urllib.request.urlopen(pad_server.url, timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/html")
        page = response.read().decode()
    assert "<canvas" in page and f"logged by run {shapes_model.run_id}" in page
    # offline: no script, style, font or image from anywhere (the script's one request is "digit")
    for reference in ("src=", "href=", "http:", "https:", "url(", "@import", "//cdn"):
        assert reference not in page


@pytest.mark.slow  # a real server
def test_the_digit_endpoint_answers_images_and_refuses_bad_ones_with_a_4xx_and_one_line(pad_server):
    digit = pad_server.url + "digit"
    status, answer = post(digit, drawing(SHAPES[7], np.random.default_rng(3), "JPEG"), "image/jpeg")
    assert status == 200 and answer["top"][0]["digit"] == 7 and len(answer["top"]) == 3
    assert post(digit, b"garbage") == (422, {"error": "the drawing: not an image (or a format PIL cannot read)"})
    assert post(digit, blank_png()) == (422, {"error": "the drawing: no digit found: the image is blank"})
    # too large: refused on its declared length, before the body is sent
    connection = http.client.HTTPConnection("127.0.0.1", pad_server.port, timeout=30)
    connection.putrequest("POST", "/digit")
    connection.putheader("Content-Length", str(pad.MAX_BYTES + 1))
    connection.endheaders()
    response = connection.getresponse()
    assert (response.status, json.load(response)) == (413, {"error": "the image is over 8 MB"})
    connection.close()
    assert post(digit, drawing(SHAPES[1], np.random.default_rng(4)))[1]["top"][0]["digit"] == 1  # still serving


# --------------------------------------------------------------------------- in headless Chromium

@pytest.fixture(scope="module")
def pad_page(request, tmp_path_factory) -> Iterator[screenshots.Page]:
    """The pad in headless Chromium, every request it makes recorded. Without chromium: skipped,
    but failed under CI (.ci/run installs it)."""
    require(screenshots.browser, "headless Chromium")
    server = request.getfixturevalue("pad_server")  # only once the browser is known to be there
    with screenshots.chromium(tmp_path_factory.mktemp("chromium")) as url, \
            connect(url, max_size=None, proxy=None) as socket:
        page = screenshots.Page(socket)
        page.call("Network.enable")
        page.size(*screenshots.PAD_SIZE)
        page.open(server.url, "document.getElementById('pad')", "the digit pad")
        yield page


def assert_shows_top3(page: screenshots.Page, digit: int) -> None:
    """The page lists three digits, ``digit`` first, with probabilities that fall and sum to at most 1,
    each shown as the percentage it is."""
    shown = page.js(screenshots.PAD_ANSWER)
    assert shown, page.js("document.body.innerText")
    digits, probabilities = [d for d, _ in shown], [p for _, p in shown]
    assert digits[0] == digit and len(set(digits)) == 3, shown
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1 + 1e-6, shown
    assert page.js(PAGE_TOP) == [f"{d} {100 * p:.1f}%" for d, p in shown]
    assert page.js("document.getElementById('error').textContent") == ""


@pytest.mark.slow  # a browser and a real server
def test_drawn_with_the_mouse_the_pad_shows_the_three_likeliest_digits_while_drawn_and_when_lifted(pad_page):
    for digit in (0, 1):
        pad_page.click("#clear")
        pad_page.stroke("#pad", SHAPES[digit], lift=False)
        pad_page.wait(screenshots.PAD_ANSWER, "an answer while the button is still down")  # live
        pad_page.lift()  # the stroke's end asks again: pending until answered
        pad_page.wait(screenshots.PAD_ANSWER, "the answer to the whole stroke")
        assert_shows_top3(pad_page, digit)


@pytest.mark.slow
def test_drawn_with_a_finger_the_pad_shows_the_digit(pad_page):
    pad_page.click("#clear")
    pad_page.stroke("#pad", SHAPES[7], touch=True)
    pad_page.wait(screenshots.PAD_ANSWER, "the answer to a touch stroke")
    assert_shows_top3(pad_page, 7)


@pytest.mark.slow
def test_clear_empties_the_pad_and_a_blank_one_is_a_line_on_the_page_not_a_digit(pad_page):
    pad_page.click("#clear")
    pad_page.stroke("#pad", SHAPES[1])
    pad_page.wait(screenshots.PAD_ANSWER, "an answer")
    pad_page.click("#clear")
    assert pad_page.js("document.querySelectorAll('#top li').length") == 0
    white = ("(c => c.getContext('2d').getImageData(0, 0, c.width, c.height).data.every(v => v === 255))"
             "(document.getElementById('pad'))")
    assert pad_page.js(white)
    pad_page.js("predict()")  # what a stroke's end calls, on the blank pad
    pad_page.wait("document.getElementById('error').textContent", "the error line")
    assert pad_page.js("document.getElementById('error').textContent") == (
        "error: the drawing: no digit found: the image is blank")
    assert pad_page.js("document.querySelectorAll('#top li').length") == 0


@pytest.mark.slow
def test_the_page_asks_nothing_of_any_site_but_its_server(pad_page, pad_server):
    pad_page.click("#clear")
    pad_page.stroke("#pad", SHAPES[0])
    pad_page.wait(screenshots.PAD_ANSWER, "an answer")
    asked = [event["params"]["request"]["url"] for event in pad_page.events
             if event["method"] == "Network.requestWillBeSent"]
    assert pad_server.url in asked and pad_server.url + "digit" in asked
    assert set(asked) <= {pad_server.url, pad_server.url + "digit", pad_server.url + "favicon.ico"}, asked
