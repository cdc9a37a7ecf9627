"""The assistant served for real: KerasCV's full-size models (random init, 64 px) behind the
Gradio app on loopback, driven by headless Chromium and by gradio_client."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import ROOT
from PIL import Image

pytestmark = pytest.mark.slow
PROMPT = "an image of a 2011 Casual Fall White Men's Sweater"
LAPTOP = (1366, 768)  # the page's size on a laptop screen (issue 31)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_lora(path, unet, source_id, rank=4, seed=0):
    """A LoRA checkpoint with non-zero A and B, so it visibly changes the images."""
    from safetensors.numpy import save_file

    from fashion_sd.sd import lora, lora_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for key, layer in lora.attention_projections(unet).items():
        fan_in, fan_out = layer.kernel.shape
        tensors[f"{key}.lora_a"] = rng.normal(0, 0.2, (fan_in, rank)).astype(np.float32)
        tensors[f"{key}.lora_b"] = rng.normal(0, 0.2, (rank, fan_out)).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={
        "format": lora_file.FORMAT, "format_version": lora_file.FORMAT_VERSION, "rank": str(rank),
        "alpha": "4.0", "targets": json.dumps(list(lora.PROJECTIONS)),
        "layers": json.dumps(sorted(lora.attention_projections(unet))), "epoch": "1",
        "step": "10", "base_weights": source_id})


def _serve(app, assistant):
    from fashion_sd.serving.webapp import launch

    port = _free_port()
    launch(app, assistant, port=port, prevent_thread_lock=True, quiet=True)
    return f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def served(tmp_path_factory, demo_captions):
    from fashion_sd.config import load_config
    from fashion_sd.serving.assistant import Assistant
    from fashion_sd.serving.webapp import build_app

    run = tmp_path_factory.mktemp("app") / "run"
    cfg = load_config(ROOT / "configs" / "demo.yaml", [
        f"data.captions={demo_captions}", "model.weights=random", f"output.dir={run}",
        "train.sample_steps=2"])
    assistant = Assistant(cfg, run)
    _write_lora(run / "checkpoints" / "epoch_001.lora.safetensors",
                assistant.comps.diffusion_model, assistant.source.id)
    (run / "checkpoints" / "broken.lora.safetensors").write_bytes(b"not a safetensors file")
    app = build_app(assistant, queue_size=16)
    url = _serve(app, assistant)
    yield SimpleNamespace(url=url, assistant=assistant, run=run, cfg=cfg)
    app.close()


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-extensions",
                f"--window-size={LAPTOP[0]},{LAPTOP[1]}", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    _fit_viewport(driver, *LAPTOP)
    return driver


def _viewport(driver) -> tuple[int, int]:
    return tuple(driver.execute_script("return [window.innerWidth, window.innerHeight]"))


def _fit_viewport(driver, width, height):
    """Size the window so that the page itself gets ``width`` x ``height``: headless Chromium's
    window counts a browser frame (143 px high in Chromium 156) that the page does not get."""
    from selenium.webdriver.support.ui import WebDriverWait

    inner_w, inner_h = _viewport(driver)
    outer = driver.get_window_size()
    driver.set_window_size(outer["width"] + width - inner_w, outer["height"] + height - inner_h)
    WebDriverWait(driver, 10).until(lambda d: _viewport(d) == (width, height))


def _rect(driver, elem_id) -> dict:
    return driver.execute_script(
        "const r = document.getElementById(arguments[0]).getBoundingClientRect();"
        "return {top: r.top, bottom: r.bottom, left: r.left, right: r.right};", elem_id)


def _assert_first_screen(driver):
    """Issue 31: on a laptop screen Generate and the image area show without scrolling."""
    assert driver.execute_script("return window.scrollY") == 0
    width, height = _viewport(driver)
    go, images = _rect(driver, "generate"), _rect(driver, "results")
    assert 0 <= go["left"] < go["right"] <= width and 0 <= go["top"] < go["bottom"] <= height, go
    assert 0 <= images["top"] < height, images
    return go


def _pick(driver, elem_id, value):
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input").click()
    option = driver.find_element(By.CSS_SELECTOR, f'#{elem_id} li[aria-label^="{value}"]')
    option.click()


def _type(driver, css, text):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.CSS_SELECTOR, css)
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(text), Keys.TAB)


def test_designer_generates_in_a_real_browser(served, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _browser()
    try:
        driver.get(served.url)
        wait = WebDriverWait(driver, 120)
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#pick-article input")))
        assert "Untrained demo weights" in driver.find_element(By.ID, "untrained-note").text
        wait.until(lambda d: "pick an article type" in d.find_element(By.ID, "prompt-note").text)
        assert _viewport(driver) == LAPTOP
        print(f"Generate at {_assert_first_screen(driver)} in a {LAPTOP} viewport")
        driver.find_element(By.ID, "generate").click()  # nothing picked: told beside the prompt
        wait.until(lambda d: "the prompt is empty" in d.find_element(By.ID, "prompt").text)
        for elem_id, value in (("pick-year", "2011"), ("pick-usage", "Casual"),
                               ("pick-colour", "Black"), ("pick-gender", "Men"),
                               ("pick-article", "Tshirts")):
            _pick(driver, elem_id, value)
        prompt = driver.find_element(By.CSS_SELECTOR, "#prompt textarea")
        wait.until(lambda d: "T-Shirt" in prompt.get_attribute("value"))
        assert prompt.get_attribute("value") == "an image of a 2011 Casual Black Men's T-Shirt"
        _type(driver, "#variations input[type=number]", 1)
        _type(driver, "#seed input", 11)
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: "seed 11" in d.find_element(By.ID, "results").text)
        results = driver.find_element(By.ID, "results")
        images = results.find_elements(By.TAG_NAME, "img")
        assert images and all(img.get_attribute("naturalWidth") != "0" for img in images)
        wait.until(lambda d: "seed 11" in d.find_element(By.ID, "history").text)
        driver.execute_script("window.scrollTo(0, 0)")
        wait.until(lambda d: d.execute_script("return window.scrollY") == 0)
        _assert_first_screen(driver)  # with the status line above the images too
        driver.execute_script("document.activeElement.blur()")  # no focus ring in the picture
        shot = tmp_path / "assistant.png"
        driver.save_screenshot(str(shot))  # the first screen, as the laptop shows it
        if os.environ.get("FASHION_SD_SCREENSHOT"):  # how docs/assistant.png is made
            shutil.copy(shot, os.environ["FASHION_SD_SCREENSHOT"])
        assert Image.open(shot).size[0] > 0
        assert Image.open(shot).size == LAPTOP
    finally:
        driver.quit()
    saved = [s for _, s in served.assistant.gallery.items() if s["seed"] == 11]
    assert saved and saved[0]["prompt"] == "an image of a 2011 Casual Black Men's T-Shirt"


def test_eight_concurrent_api_calls_all_return(served):
    from gradio_client import Client

    client = Client(served.url, verbose=False)

    def call(seed):
        return seed, client.predict(prompt=PROMPT, seed=seed, num_images=1, steps=2,
                                    checkpoint="base", api_name="/generate")

    seeds = [100 + i for i in range(8)] + [100]  # the first seed again, for determinism
    with ThreadPoolExecutor(len(seeds)) as pool:
        answers = list(pool.map(call, seeds))
    for seed, (images, status) in answers:
        assert len(images) == 1 and images[0]["caption"] == f"seed {seed} · base"
        assert "1 image(s)" in status
    pixels = [_pixels(images[0]["image"]) for _, (images, _) in answers]
    np.testing.assert_array_equal(pixels[0], pixels[-1])  # same seed, same pixels
    assert len({p.tobytes() for p in pixels[:8]}) == 8  # every seed its own image
    kept = {s["seed"] for _, s in served.assistant.gallery.items() if s["checkpoint"] == "base"}
    assert set(seeds) <= kept


def test_strength_changes_without_reloading_and_undoes_exactly(served):
    from fashion_sd.serving.assistant import Request

    a = served.assistant
    unet_weights = a.comps.diffusion_model.weights

    def image(checkpoint, strength=1.0):
        (path,) = a.generate(Request(PROMPT, seed=5, steps=2, checkpoint=checkpoint,
                                     strength=strength)).paths
        return _pixels(path)

    base = image("base")
    tuned = image("epoch_001")
    assert np.abs(tuned.astype(int) - base).max() > 0  # the LoRA changes the picture
    np.testing.assert_array_equal(image("epoch_001", 0.0), base)  # strength 0 is the base
    half = image("epoch_001", 0.5)
    assert half.tobytes() not in (base.tobytes(), tuned.tobytes())
    np.testing.assert_array_equal(image("epoch_001"), tuned)
    np.testing.assert_array_equal(image("base"), base)  # back to the exact base kernels
    assert a.comps.diffusion_model.weights is not None and len(unet_weights) == len(
        a.comps.diffusion_model.weights)  # the same model object throughout


def test_compare_shows_base_and_checkpoint_for_one_seed(served):
    from fashion_sd.serving.assistant import Request

    a = served.assistant
    base, tuned = a.compare(Request(PROMPT, seed=8, num_images=3, steps=2,
                                    checkpoint="epoch_001", strength=1.0))
    assert base.seeds == tuned.seeds == [8]
    assert [s["checkpoint"] for s in base.settings + tuned.settings] == ["base", "epoch_001"]
    (alone,) = a.generate(Request(PROMPT, seed=8, steps=2, checkpoint="base")).paths
    np.testing.assert_array_equal(_pixels(base.paths[0]), _pixels(alone))
    assert not np.array_equal(_pixels(tuned.paths[0]), _pixels(alone))


def test_from_png_reproduces_an_app_image(served, tmp_path):
    from fashion_sd.serving.assistant import Request
    from fashion_sd.serving.generate import read_png_settings

    result = served.assistant.generate(Request(PROMPT, seed=21, num_images=2, steps=2,
                                               negative_prompt="blurry", guidance=6.0,
                                               checkpoint="epoch_001", strength=0.7))
    png = result.paths[1]
    settings = read_png_settings(png)
    assert {k: settings[k] for k in ("prompt", "negative_prompt", "seed", "steps", "guidance",
                                     "checkpoint", "lora_strength", "batch_seeds",
                                     "random_init")} == {
        "prompt": PROMPT, "negative_prompt": "blurry", "seed": 22, "steps": 2,
        "guidance": 6.0, "checkpoint": "epoch_001", "lora_strength": 0.7,
        "batch_seeds": [21, 22], "random_init": True}
    out = tmp_path / "again"
    r = subprocess.run([sys.executable, str(ROOT / "scripts/generate.py"), "--config",
                        str(ROOT / "configs/demo.yaml"), "--from-png", str(png), "--out",
                        str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    # The same image, up to float32 rounding across the two processes: a fresh-clone run of this
    # session saw 4 of 12,288 values one grey level apart after the networks moved to the
    # project's own code (issue 28; the cause is not yet found, the note on the issue says so).
    diff = np.abs(_pixels(out / "p000_s22.png").astype(int) - _pixels(png).astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.999


def test_failures_show_an_error_and_the_app_keeps_serving(served):
    from gradio_client import Client

    client = Client(served.url, verbose=False)
    before = sorted(p.name for p in served.assistant.gallery.folder.iterdir())
    with pytest.raises(Exception, match="broken.lora.safetensors"):
        client.predict(prompt=PROMPT, seed=1, num_images=1, steps=2, checkpoint="broken",
                       api_name="/generate")
    with pytest.raises(Exception, match="no checkpoint named"):
        client.predict(prompt=PROMPT, seed=1, num_images=1, steps=2,
                       checkpoint="../../../etc/passwd", api_name="/generate")
    with pytest.raises(Exception, match="less than minimum value 1|steps must be between"):
        client.predict(prompt=PROMPT, seed=1, num_images=1, steps=0, api_name="/generate")
    with pytest.raises(Exception, match="greater than maximum value 8|images must be between"):
        client.predict(prompt=PROMPT, seed=1, num_images=9, steps=2, api_name="/generate")
    with pytest.raises(Exception, match="prompt is empty"):
        client.predict(prompt=" ", seed=1, num_images=1, steps=2, api_name="/generate")
    assert sorted(p.name for p in served.assistant.gallery.folder.iterdir()) == before
    images, _ = client.predict(prompt=PROMPT, seed=2, num_images=1, steps=2,
                               checkpoint="epoch_001", api_name="/generate")
    assert images[0]["caption"] == "seed 2 · epoch_001"


def test_a_full_queue_answers_busy(served):
    from gradio_client import Client

    from fashion_sd.serving.webapp import build_app

    app = build_app(served.assistant, queue_size=1)
    url = _serve(app, served.assistant)
    try:
        client = Client(url, verbose=False)

        def call(seed):
            try:
                return client.predict(prompt=PROMPT, seed=seed, num_images=1, steps=3,
                                      checkpoint="base", api_name="/generate")
            except Exception as exc:  # what a client sees when the queue is full
                return exc

        with ThreadPoolExecutor(5) as pool:
            answers = list(pool.map(call, range(5)))
    finally:
        app.close()
    busy = [a for a in answers if isinstance(a, Exception)]
    served_ok = [a for a in answers if not isinstance(a, Exception)]
    assert busy and served_ok
    assert all("full" in str(e).lower() for e in busy), busy


def test_auth_protects_a_shared_app(served):
    from gradio_client import Client

    from fashion_sd.serving.webapp import build_app, launch

    app = build_app(served.assistant)
    port = _free_port()
    launch(app, served.assistant, port=port, auth=("ana", "s3cret"), prevent_thread_lock=True,
           quiet=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        with pytest.raises(Exception):
            Client(url, verbose=False).predict(prompt=PROMPT, seed=1, num_images=1, steps=1,
                                               api_name="/generate")
        with pytest.raises(Exception):
            Client(url, auth=("ana", "wrong"), verbose=False)
        images, _ = Client(url, auth=("ana", "s3cret"), verbose=False).predict(
            prompt=PROMPT, seed=1, num_images=1, steps=1, checkpoint="base", api_name="/generate")
        assert images[0]["caption"] == "seed 1 · base"
    finally:
        app.close()


STUB_APP = '''
import sys, time
from pathlib import Path
from types import SimpleNamespace
import gradio as gr
from fashion_sd.serving import assistant, webapp
from fashion_sd.commands import app

class Stub:  # the model is not what is tested: the command's stop is
    random_init = False
    def __init__(self, cfg, run, loras):
        self.gallery = SimpleNamespace(folder=Path(sys.argv[1]))

def busy_app(assistant, queue_size):
    with gr.Blocks() as demo:
        button, text = gr.Button(), gr.Textbox()
        button.click(lambda: print("busy", flush=True) or time.sleep(600) or "", None, text,
                     api_name="busy")
    return demo

assistant.Assistant, webapp.build_app = Stub, busy_app
sys.exit(app.main(sys.argv[2:]))
'''


@pytest.mark.parametrize("signum", [2, 15], ids=["SIGINT", "SIGTERM"])
def test_the_app_stops_on_a_signal_while_a_request_runs(tmp_path, signum):
    """Issue 25: the app command (its model stubbed: a request that takes 10 minutes) stops on
    SIGINT or SIGTERM with 130 or 143 within a minute (measured: about 1.5 s), its server
    closed; started with SIGINT ignored, as a script's background job is."""
    import signal
    import time
    import urllib.request

    script, out = tmp_path / "stub_app.py", tmp_path / "app.out"
    script.write_text(STUB_APP)
    port = _free_port()
    proc = subprocess.Popen(
        ["sh", "-c", 'trap "" INT; exec "$@"', "sh", sys.executable, str(script), str(tmp_path),
         "--config", str(ROOT / "configs/demo.yaml"), "--port", str(port)],
        stdout=out.open("w"), stderr=subprocess.STDOUT, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False"})
    try:
        def wait_for(text):  # an event; the bound is for a broken test only
            deadline = time.monotonic() + 600
            while text not in out.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, out.read_text()
                time.sleep(0.2)

        wait_for("Running on local URL")
        call = urllib.request.Request(f"http://127.0.0.1:{port}/gradio_api/call/busy", b'{"data": []}',
                                      {"Content-Type": "application/json"})
        urllib.request.urlopen(call, timeout=60).read()
        wait_for("busy")
        t0 = time.monotonic()
        proc.send_signal(signum)
        assert proc.wait(60) == 128 + signum, out.read_text()
        print(f"the app stopped in {time.monotonic() - t0:.2f} s")
    finally:
        proc.kill()
    name = signal.Signals(signum).name
    assert f"stopped by {name}: the server is closed" in out.read_text()
