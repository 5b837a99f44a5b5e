import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli
from mnist_sweep.predict import to_mnist

CONTRAST = 200  # grey levels between the paper and full ink in the drawn images


def seven() -> np.ndarray:
    """A 20×12 '7' as ink amounts (0, half or full): it touches all four sides of its box, and its
    mass sits up and to the right, so centring by mass differs from centring the box."""
    ink = np.zeros((20, 12), dtype=np.float32)
    ink[0:3, :] = CONTRAST  # the top bar
    for row in range(3, 20):
        col = 11 - (row - 3) * 9 // 16  # the stroke slants down to the left
        ink[row, col - 2 : col + 1] = CONTRAST
    ink[9, 3:9] = CONTRAST / 2  # a grey crossbar
    return ink


def expected_pixels(ink: np.ndarray) -> np.ndarray:
    """What MNIST holds for ``ink`` drawn anywhere at any multiple of its size: full ink at 255,
    the box placed so its centre of mass is at pixel (14, 14) (where MNIST's digits have theirs)."""
    digit = ink * (255 / ink.max())
    rows, cols = np.indices(digit.shape)
    top = round(14 - (rows * digit).sum() / digit.sum())
    left = round(14 - (cols * digit).sum() / digit.sum())
    pixels = np.zeros((28, 28), dtype=np.float32)
    pixels[top : top + digit.shape[0], left : left + digit.shape[1]] = digit
    return pixels


def drawn(ink: np.ndarray, scale: int, canvas: tuple[int, int], at: tuple[int, int], dark_ink: bool) -> np.ndarray:
    """``ink`` enlarged ``scale`` times and drawn on a ``canvas``-sized sheet at offset ``at``."""
    paper = 240 if dark_ink else 15
    sheet = np.full(canvas, paper, dtype=np.float32)
    big = np.kron(ink, np.ones((scale, scale), dtype=np.float32))
    sheet[at[0] : at[0] + big.shape[0], at[1] : at[1] + big.shape[1]] += -big if dark_ink else big
    return sheet.astype(np.uint8)


def png_image(sheet: np.ndarray, mode: str) -> Image.Image:
    if mode == "RGBA":  # ink on a transparent sheet whose hidden colour is black
        alpha = np.where(sheet < 240, 255, 0).astype(np.uint8)
        grey = np.where(alpha > 0, sheet + 15, 0).astype(np.uint8)  # as much ink on white as on the 240 sheet
        return Image.fromarray(np.dstack([grey, grey, grey, alpha]), "RGBA")
    return Image.fromarray(sheet).convert(mode)


@pytest.mark.parametrize("mode,dark_ink", [("RGB", True), ("L", False), ("RGBA", True)],
                         ids=["dark-on-light-rgb", "light-on-dark-gray", "dark-on-transparent"])
def test_to_mnist_crops_scales_and_centres_by_mass(mode, dark_ink):
    image = png_image(drawn(seven(), 3, (131, 97), (23, 41), dark_ink), mode)
    pixels = to_mnist(image)
    assert pixels.shape == (28, 28) and pixels.dtype == np.float32
    np.testing.assert_allclose(pixels, expected_pixels(seven()), atol=1e-3)


def test_to_mnist_enlarges_a_small_digit_into_the_20_pixel_box():
    pixels = to_mnist(Image.fromarray(drawn(seven()[::2, ::2], 1, (17, 13), (3, 5), dark_ink=True)))
    rows, cols = np.flatnonzero(pixels.any(1)), np.flatnonzero(pixels.any(0))
    assert (rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1) == (20, 12)
    assert pixels.max() == pytest.approx(255, abs=1)


def test_to_mnist_shrinks_with_grey_anti_aliased_edges_as_mnist_did():
    sheet = np.full((90, 70), 250, dtype=np.uint8)
    sheet[11:51, 13:53] = 50
    sheet[12:50, 14:52] = 250  # a 40×40 frame one pixel thick: it halves to 20×20 half-covered pixels
    pixels = to_mnist(Image.fromarray(sheet))
    assert sorted(set(pixels[pixels > 0].tolist())) == [127.5, 191.25]  # sides half ink, corners 3/4


def test_to_mnist_refuses_a_blank_image():
    with pytest.raises(ValueError, match="blank"):
        to_mnist(Image.new("L", (40, 30), 230))


def test_predict_gives_the_models_answer_on_mnist_pixels_and_names_bad_files(logged_model, overrides, tmp_path):
    """~20-40 s: the module's logged model (a run) and the predict command in a process of its own."""
    folder = tmp_path / "images"
    folder.mkdir()
    digits = {"seven.png": seven(), "mirrored.png": seven()[:, ::-1]}
    for name, ink in digits.items():
        png_image(drawn(ink, 5, (163, 211), (37, 101), dark_ink=True), "RGB").save(folder / name)
    (folder / "notes.png").write_text("not an image")
    with torch.inference_mode():
        want = {name: logged_model.model(torch.from_numpy(expected_pixels(ink))[None, None]).softmax(1)[0]
                for name, ink in digits.items()}
        naive = np.asarray(Image.open(folder / "seven.png").convert("L").resize((28, 28)), dtype=np.float32)
        naive_prob = logged_model.model(torch.from_numpy(255 - naive)[None, None]).softmax(1).max().item()
    assert abs(naive_prob - want["seven.png"].max().item()) > 1e-3, "a naive resize must score differently"

    done = run_cli("mnist_sweep.predict", f"model_uri={logged_model.run_id}", f"images={folder}",
                   f"images={tmp_path / 'missing.png'}", *overrides, f"mlflow.tracking_uri={logged_model.tracking_uri}")
    assert done.returncode == 1
    lines = sorted(line.split("\t") for line in done.stdout.splitlines())
    assert [(path, digit) for path, digit, _ in lines] == [
        (str(folder / "mirrored.png"), str(want["mirrored.png"].argmax().item())),
        (str(folder / "seven.png"), str(want["seven.png"].argmax().item())),
    ]
    for path, _, prob in lines:
        assert float(prob) == pytest.approx(want[path.rsplit("/", 1)[1]].max().item(), abs=1e-4)
    errors = sorted(line for line in done.stderr.splitlines() if line.startswith("error"))  # not MLflow's progress bars
    assert errors == [f"error: {folder / 'notes.png'}: not an image (or a format PIL cannot read)",
                      f"error: {tmp_path / 'missing.png'}: no such file or directory"]
