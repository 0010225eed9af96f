"""`vitkit demo` on SAM weights in a real browser: serve on loopback, upload an image with headless
Chromium, click on it, and check that the mask overlay appears; a second click updates it and
"Reset clicks" clears it.

As ``test_demo_browser.py``: Debian's Chromium driven by Playwright; without Chromium, playwright
or gradio the test skips and says so, in CI (``CI=true``) it fails instead. ``VITKIT_CHROMIUM``
names another executable; ``VITKIT_DEMO_SCREENSHOT`` copies the screenshot there.
"""

import os
import shutil

import numpy as np
from helpers import demo_page, perturb, wait_for_map
from PIL import Image, ImageDraw

import vitkit
from vitkit.sam import create_sam

INFO = "#prediction textarea, #prediction input"


def _click_image(page, fx: float, fy: float) -> None:
    """Click the uploaded image at a fraction (fx, fy) of its shown width and height."""
    img = page.locator("#input-image img").first
    img.wait_for(state="visible", timeout=90_000)
    page.wait_for_function("() => { const i = document.querySelector('#input-image img');"
                           " return i && i.complete && i.naturalWidth > 0; }", timeout=90_000)
    box = img.bounding_box()
    img.click(position={"x": box["width"] * fx, "y": box["height"] * fy})


def test_sam_demo_click_shows_the_mask(tmp_path):
    source = os.environ.get("VITKIT_DEMO_SOURCE") or str(
        vitkit.save_weights(perturb(create_sam("sam_test"), scale=0.3), tmp_path / "sam.safetensors"))
    image = tmp_path / "shapes.png"
    pil = Image.new("RGB", (192, 144), (200, 200, 190))
    ImageDraw.Draw(pil).rectangle([30, 30, 100, 110], fill=(220, 40, 40))
    pil.save(image)
    with demo_page(source) as page:
        upload = page.locator("#input-image input[type=file]")
        upload.set_input_files(str(image))
        page.wait_for_function("text => document.querySelector(text)?.value === 'click on an object'", arg=INFO,
                               timeout=90_000)  # the upload encoded the image
        _click_image(page, 0.35, 0.45)  # on the red rectangle
        first = wait_for_map(page, previous="")
        text = page.locator(INFO).first.input_value()
        _click_image(page, 0.8, 0.8)  # a second click: the overlay of both points replaces the first
        wait_for_map(page, previous=first)
        page.wait_for_function("text => document.querySelector(text)?.value.startsWith('2 clicks')", arg=INFO,
                               timeout=90_000)
        page.wait_for_timeout(1000)  # let the outputs' fade-in finish before the screenshot
        shot = tmp_path / "demo.png"
        page.screenshot(path=str(shot), full_page=True)
        served = page.locator("#map img").get_attribute("src")
        page.locator("#reset").click()
        page.wait_for_function("() => !document.querySelector('#map img')", timeout=90_000)
    assert text.startswith("1 click: mask of") and "predicted IoU" in text, text
    assert "file=" in served
    with Image.open(shot) as im:
        assert im.size[0] >= 1000
        assert np.asarray(im).std() > 5  # a real page, not a blank one
    if os.environ.get("VITKIT_DEMO_SCREENSHOT"):
        shutil.copy(shot, os.environ["VITKIT_DEMO_SCREENSHOT"])
