"""The digit pad: a page where a person draws a digit and sees a model's three likeliest digits as
the stroke goes, and the ``POST /digit`` endpoint behind it. ``make serve`` serves both beside
MLflow's own scoring API (:func:`app`).

The page sends its canvas as a PNG; the server prepares it as ``predict`` prepares a photo
(:func:`mnist_sweep.predict.read`), so drawing, photos and scans share one preprocessing path.
"""

from __future__ import annotations

import asyncio
import html
import io
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from mlflow.pyfunc import PyFuncModel
from mlflow.pyfunc import scoring_server

from mnist_sweep.predict import read

PAGE = Path(__file__).with_name("pad.html")  # inline script and style: nothing to fetch, works offline
TOP = 3  # digits the pad shows
# A 280×280 canvas's PNG is a few KB and a phone photo a few MB; a larger body is refused unread.
MAX_BYTES = 8 << 20


def likeliest(model: PyFuncModel, pixels: np.ndarray, k: int = TOP) -> list[dict[str, float]]:
    """(28, 28) raw pixels → the ``k`` likeliest digits with their softmax probabilities, likeliest first."""
    scores = model.predict(pixels[None, None].astype(np.float32))  # (1, 10): what /invocations returns
    probs, digits = torch.from_numpy(np.asarray(scores)).softmax(1)[0].topk(k)
    return [{"digit": int(d), "probability": float(p)} for d, p in zip(digits, probs)]


def answer(model: PyFuncModel, body: bytes) -> tuple[int, dict]:
    """An image's bytes → (HTTP status, JSON body): the top digits, or one line saying what is wrong."""
    if not body:
        return 400, {"error": "the request holds no image: POST a PNG or JPEG as the body"}
    try:
        pixels = read(io.BytesIO(body), "the drawing")
    except ValueError as err:  # not an image, a broken one, or no ink on it
        return 422, {"error": " ".join(str(err).split())}
    return 200, {"top": likeliest(model, pixels)}


async def body_within(request: Request, limit: int) -> bytes | None:
    """The request's body, or None once it passes ``limit`` bytes (the rest left unread): a body
    sent in chunks declares no length to refuse it by."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def app(model: PyFuncModel, label: str) -> FastAPI:
    """MLflow's scoring app for ``model`` (``/invocations``, ``/ping``, ``/health``, ``/version``),
    with the pad at ``/`` and its endpoint ``POST /digit``; ``label`` names the model on the page."""
    served = scoring_server.init(model)
    page = PAGE.read_text().replace("__MODEL__", html.escape(label))

    @served.get("/", response_class=HTMLResponse)
    async def pad() -> str:
        return page

    @served.post("/digit")
    async def digit(request: Request) -> JSONResponse:
        declared = int(request.headers.get("content-length") or 0)  # uvicorn has checked that it is a number
        body = None if declared > MAX_BYTES else await body_within(request, MAX_BYTES)
        if body is None:
            return JSONResponse({"error": f"the image is over {MAX_BYTES >> 20} MB"}, status_code=413)
        status, content = await asyncio.to_thread(answer, model, body)  # off the event loop, as /invocations
        return JSONResponse(content, status_code=status)

    return served
