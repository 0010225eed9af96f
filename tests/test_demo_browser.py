"""`vitkit demo` in a real browser: serve on loopback, upload an image with headless Chromium,
and check the top-5 and the map appear.

Chromium is Debian's package (``apt-get install chromium``; ``.ci/run`` installs it), driven by
Playwright through its executable. Without a Chromium, playwright or gradio the test skips and
says so; in CI (``CI=true``) it fails instead.
``VITKIT_CHROMIUM`` names another executable. ``VITKIT_DEMO_SOURCE`` serves that run or weights
file instead of a tiny random model, and ``VITKIT_DEMO_SCREENSHOT`` copies the screenshot there
(how docs/demo.png is made).
"""

import os
import shutil
from dataclasses import replace
from pathlib import Path

from helpers import demo_page, wait_for_map
from PIL import Image

import vitkit


def _source(tmp_path: Path) -> tuple[str, list[str]]:
    if os.environ.get("VITKIT_DEMO_SOURCE"):
        from vitkit.predict import load_model

        src = os.environ["VITKIT_DEMO_SOURCE"]
        return src, list(load_model(src).labels)
    m = vitkit.create_model("test_vit", num_classes=6)
    labels = ("circle", "square", "triangle", "star", "hexagon", "cross")
    m.card = replace(m.card, labels=labels)
    return str(vitkit.save_weights(m, tmp_path / "model.safetensors")), list(labels)


def test_demo_upload_shows_prediction_and_map(tmp_path):
    from vitkit.data import ShapesDataset

    source, labels = _source(tmp_path)
    image = tmp_path / "star.png"
    ShapesDataset(n=4, split="val", img_size=64, seed=3).sample(3)["image"].resize((192, 192)).save(image)
    with demo_page(source) as page:
        upload = page.locator("#input-image input[type=file]")
        layer = page.locator("#layer input[type=number]")
        last = page.locator("#layer input[type=range]").get_attribute("max")
        layer.fill("0")
        layer.press("Enter")
        upload.set_input_files(str(image))  # the upload alone runs the method: rollout through layer 0
        first = wait_for_map(page, previous="")
        # Choose the last layer and press the button: the full rollout replaces the map.
        layer.fill(last)
        layer.press("Enter")
        page.locator("#explain").click()
        wait_for_map(page, previous=first)
        page.wait_for_timeout(1000)  # let the outputs' fade-in finish before the screenshot
        prediction = page.locator("#prediction").inner_text(timeout=30_000)
        shot = tmp_path / "demo.png"
        page.screenshot(path=str(shot), full_page=True)
    assert any(label in prediction for label in labels), prediction
    assert "%" in prediction  # the top classes come with their probabilities
    with Image.open(shot) as im:
        assert im.size[0] >= 1000
    if os.environ.get("VITKIT_DEMO_SCREENSHOT"):
        shutil.copy(shot, os.environ["VITKIT_DEMO_SCREENSHOT"])
