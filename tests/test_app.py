"""The Gradio app in a real browser (Debian's chromium + chromedriver through selenium; nothing is downloaded), and
the same file as a Space without the package. Without a browser the browser tests skip, except under CI=true."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import BLOCK_PACKAGE, subprocess_env
from test_pipeline import _saved


pytest.importorskip("gradio", reason="the app extra (`pip install perceptiongpt[app]`) is not installed")
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ROOT = Path(__file__).resolve().parents[1]
MAX_NEW_TOKENS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(command, env, timeout=240):
    """Starts the app; returns (process, url) once the page answers."""
    port = _free_port()
    env = {**env, "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_SERVER_PORT": str(port)}
    process = subprocess.Popen([*command, "--port", str(port)] if "--model" in command else command, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    url, deadline = f"http://127.0.0.1:{port}/", time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the app exited with {process.returncode}: {process.stdout.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            time.sleep(1)
    process.kill()
    raise AssertionError(f"the app did not answer within {timeout} s")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`perceptiongpt app` on a tiny saved folder, on 127.0.0.1; and the in-process pipeline of the same folder."""
    from transformers import pipeline

    tmp = tmp_path_factory.mktemp("app")
    folder = os.environ.get("PERCEPTIONGPT_APP_MODEL") or _saved(tmp)[2]  # a trained folder for the docs' screenshot
    command = [sys.executable, "-m", "perceptiongpt.trainer.cli", "app", "--model", str(folder), "--examples", "2",
               "--max-new-tokens", str(MAX_NEW_TOKENS)]  # fmt: skip
    process, url = _serve(command, subprocess_env(HF_MODULES_CACHE=str(tmp / "modules")))
    yield url, pipeline("visual-grounding", model=str(folder), trust_remote_code=True)
    process.kill()
    process.wait()


@pytest.fixture
def browser():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        message = (
            "the browser tests need Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message + ": CI must install them (`.ci/run` does, with apt-get)")
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tempfile.mkdtemp()
    for flag in ("--headless", "--no-sandbox", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-gpu", "--window-size=1400,1100", f"--user-data-dir={profile}"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _value(driver, elem_id):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input").get_attribute("value")


def _wait_for(predicate, timeout=120, what="the page"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _example(pipe):
    from perceptiongpt.processing.synthetic import SyntheticConfig, generate_synthetic_samples

    row = next(iter(generate_synthetic_samples(SyntheticConfig.demo(), "test", 2)))
    return row["image"], row["messages"][0]["content"]


def test_an_example_answers_with_boxes_in_the_browser(served, browser):
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By

    url, pipe = served
    image, question = _example(pipe)
    expected = pipe(image, prompt=question, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    assert expected["objects"]
    browser.get(url)
    _wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, '[data-testid="dataset-cell-0-0"]'), what="examples")
    browser.find_element(By.CSS_SELECTOR, '[data-testid="dataset-cell-0-0"]').click()
    _wait_for(lambda: _value(browser, "question") == question, what="the example's question")
    browser.find_element(By.ID, "submit").click()
    _wait_for(lambda: _value(browser, "answer") == expected["generated_text"], what="the final answer")
    _wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#objects tbody tr"), what="the objects table")
    first = browser.find_elements(By.CSS_SELECTOR, "#objects tbody tr")[0].find_elements(By.CSS_SELECTOR, "td")
    box = expected["objects"][0]["box"]
    assert [float(cell.get_attribute("textContent")) for cell in first[:6]] == pytest.approx(
        [1, round(expected["objects"][0]["score"], 3), box["xmin"], box["ymin"], box["xmax"], box["ymax"]]
    )
    overlays = browser.find_elements(By.CSS_SELECTOR, "#annotated img.mask")  # one per box and one per mask
    assert len(overlays) == 2 * len(expected["objects"])

    def base_image_loaded():  # found afresh each time: every streamed update re-renders the element
        try:
            base = browser.find_element(By.CSS_SELECTOR, "#annotated img.base-image")
            return base.get_attribute("naturalWidth") == str(image.width)
        except (NoSuchElementException, StaleElementReferenceException):
            return False

    _wait_for(base_image_loaded, what="the annotated image to load")
    browser.save_screenshot(os.environ.get("PERCEPTIONGPT_APP_SCREENSHOT", str(Path(tempfile.mkdtemp()) / "app.png")))


def test_a_clicked_region_is_asked_about_in_the_browser(served, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    url, pipe = served
    image, _ = _example(pipe)
    browser.get(url)
    _wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, '[data-testid="dataset-cell-0-0"]'), what="examples")
    browser.find_element(By.CSS_SELECTOR, '[data-testid="dataset-cell-0-0"]').click()
    _wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#image img"), what="the image")
    shown = browser.find_element(By.CSS_SELECTOR, "#image img")
    width, height = shown.size["width"], shown.size["height"]
    for fx, fy in ((0.2, 0.25), (0.7, 0.8)):  # two opposite corners, as offsets from the image's centre
        ActionChains(browser).move_to_element_with_offset(shown, int((fx - 0.5) * width), int((fy - 0.5) * height))
        ActionChains(browser).move_to_element_with_offset(
            shown, int((fx - 0.5) * width), int((fy - 0.5) * height)
        ).click().perform()
        time.sleep(1)
    _wait_for(lambda: _value(browser, "region").startswith("["), what="the region")
    box = json.loads(_value(browser, "region"))
    scale = image.width / width
    assert box[0] < box[2] and box[1] < box[3] and box[2] <= image.width and box[3] <= image.height
    assert abs(box[0] - 0.2 * width * scale) <= 2 and abs(box[3] - 0.8 * height * scale) <= 3
    question = browser.find_element(By.CSS_SELECTOR, "#question textarea, #question input")
    question.clear()
    question.send_keys("What is in <vis>?")
    browser.find_element(By.ID, "submit").click()
    expected = pipe(image, prompt="What is in <vis>?", boxes=[box], max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    _wait_for(lambda: _value(browser, "answer") == expected["generated_text"], what="the region question's answer")


def test_a_painted_mask_and_clicked_corners_become_the_regions_of_a_vis(tmp_path):
    import gradio as gr
    import numpy as np
    from PIL import Image
    from transformers import pipeline

    from perceptiongpt.trainer.app import mask_from_editor, region_from_clicks, stream_answer

    assert region_from_clicks([(30, 5)]) is None and region_from_clicks([(30, 5), (10, 20)]) == [10, 5, 31, 21]
    image = Image.new("RGB", (40, 24), (90, 30, 200))
    layer = np.zeros((24, 40, 4), dtype=np.uint8)
    layer[4:12, 6:20, 3] = 255  # painted strokes: the layer's alpha
    mask = mask_from_editor({"background": image, "layers": [Image.fromarray(layer)], "composite": image})
    assert mask.shape == (24, 40) and mask.sum() == 8 * 14 and mask[4:12, 6:20].all()
    assert mask_from_editor({"background": image, "layers": [Image.new("RGBA", (40, 24))]}) is None
    _, _, folder = _saved(tmp_path)
    pipe = pipeline("visual-grounding", model=str(folder), trust_remote_code=True)
    updates = list(stream_answer(pipe, image, "What is in <vis>?", mask=mask, max_new_tokens=MAX_NEW_TOKENS))
    expected = pipe(image, prompt="What is in <vis>?", masks=[mask], boxes=[None], max_new_tokens=MAX_NEW_TOKENS)
    (_, annotations), text, table = updates[-1]
    assert text == expected["generated_text"] and len(table) == len(expected["objects"]) >= 1
    assert len(updates) >= 1 + len(expected["objects"])  # each object streamed in before the final update
    assert annotations[0][0] == tuple(expected["objects"][0]["box"].values())
    with pytest.raises(gr.Error, match="click two corners"):
        next(stream_answer(pipe, image, "What is in <vis>?"))
    with pytest.raises(gr.Error, match="write <vis> in the question"):
        next(stream_answer(pipe, image, "Where is it?", box=[1, 2, 10, 12]))
    with pytest.raises(gr.Error, match="lies entirely outside the 40x24"):  # the processor's message, to the user
        list(stream_answer(pipe, image, "What is in <vis>?", box=[100, 2, 120, 12]))


_SPACE = """
import runpy, sys
try:
    import perceptiongpt  # noqa: F401
    sys.exit("perceptiongpt must not be importable here")
except ImportError:
    pass
runpy.run_path(sys.argv[1], run_name="__main__")
"""


def test_the_app_file_runs_as_a_space_without_the_package(tmp_path):
    _, _, folder = _saved(tmp_path)
    env = subprocess_env(HF_MODULES_CACHE=str(tmp_path / "modules"), PERCEPTIONGPT_MODEL=str(folder))
    process, url = _serve([sys.executable, "-c", BLOCK_PACKAGE + _SPACE, str(ROOT / "trainer" / "app.py")], env)
    try:
        with urllib.request.urlopen(url + "config", timeout=30) as response:
            config = json.loads(response.read())
        labels = {component.get("props", {}).get("elem_id") for component in config["components"]}
        assert {"image", "question", "submit", "annotated", "answer", "objects", "region"} <= labels
    finally:
        process.kill()
        process.wait()
