"""The web page (GET /) in a real headless Chromium driven by Selenium, against a real
serve.py that requires an API key (served_tiny): the key prompt, photos through the real
file input, the page's numbers against the API's and the CSV against test.py's, sorting,
the heat map and the enhancement, phone width, labels, /docs with "Try it out", and not
one console message from page load to the last click beyond the HTTP errors the test
provokes on purpose. A screenshot goes to $NIMA_TEST_ARTIFACTS (or the test's tmp dir).

Chromium and its driver are Debian packages (.ci/run installs them); without them the
tests skip, saying how to install them."""
import base64
import csv
import importlib.util
import io
import os
import shutil
import tempfile
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, SERVED_KEY, run_test

CHROMIUM, DRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"
HAVE_SELENIUM = importlib.util.find_spec("selenium") is not None
# In CI (.ci/run installs the browser) a missing browser is a failure, not a skip.
pytestmark = [pytest.mark.browser, pytest.mark.subprocess, pytest.mark.slow, pytest.mark.skipif(
    not (HAVE_SELENIUM and os.path.exists(CHROMIUM) and os.path.exists(DRIVER)) and os.environ.get("CI") != "true",
    reason="needs Chromium, its driver and Selenium: apt-get install chromium chromium-driver; "
           "pip install -r requirements-test.txt")]
WAIT_S = 120  # the longest wait for the page, on a busy 2-core machine
PHOTOS = os.path.join(ROOT, "tests", "data", "photos")
REAL = ["rocket.jpg", "chelsea.png", "coffee.png"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Real photographs, photos made here (WebP, an odd-sized PNG) and a truncated JPEG, in
    an order that is neither by name nor by score."""
    folder = tmp_path_factory.mktemp("page_photos")
    for name in REAL:
        shutil.copy(os.path.join(PHOTOS, name), folder / name)
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).resize((160, 120)).save(folder / "made.webp", quality=90)
    Image.fromarray(rng.integers(0, 256, (77, 53, 3), dtype=np.uint8)).save(folder / "a_made.png")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
    (folder / "broken.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return folder, ["rocket.jpg", "made.webp", "broken.jpg", "chelsea.png", "a_made.png", "coffee.png"]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1100",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(WAIT_S)
    driver.console = []  # every console entry, gathered as the test goes

    try:
        yield driver
    finally:
        driver.quit()


def gather(driver) -> None:
    driver.console += driver.get_log("browser")  # get_log hands each entry out once


def wait(driver, condition, what):
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(lambda d: condition(d))
    except Exception as exc:
        gather(driver)
        raise AssertionError(f"{what}: not within {WAIT_S} s; console: {driver.console}") from exc


def by_id(driver, id_):
    return driver.find_element("id", id_)


def css(driver, selector):
    return driver.find_elements("css selector", selector)


def api(server, route, path, query=""):
    with open(path, "rb") as f:
        answer = httpx.post(f"{server.url}{route}{query}", files=[("file", (os.path.basename(path), f.read()))],
                            headers={"X-API-Key": SERVED_KEY}, timeout=WAIT_S)
    assert answer.status_code in (200, 422), answer.text
    return answer.json()["results"][0]


def card_names(driver) -> list:
    return [c.find_element("css selector", ".name").text for c in css(driver, "#cards .card")]


def card(driver, name):
    return next(c for c in css(driver, "#cards .card") if c.find_element("css selector", ".name").text == name)


def natural_size(driver, img):
    return tuple(driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", img))


def console_lines(entries) -> list:
    """(path on the service, text) of each console entry ('URL - text' for network ones)."""
    lines = []
    for entry in entries:
        where, _, text = entry["message"].partition(" - ")
        lines.append(("/" + where.split("/", 3)[-1] if where.startswith("http") else where, text))
    return lines


def artifacts(tmp_path):
    folder = os.environ.get("NIMA_TEST_ARTIFACTS") or str(tmp_path)
    os.makedirs(folder, exist_ok=True)
    return folder


def test_the_page_from_key_to_enhancement(browser, served_tiny, tiny_ckpt, photos, tmp_path):
    from selenium.webdriver.support.ui import Select

    d, folder, order = browser, *photos
    downloads = tempfile.mkdtemp(dir=tmp_path)
    d.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": downloads})
    d.get(served_tiny.url + "/")
    # The key: asked for, a wrong one refused with the service's own 401 message, the right one used.
    wait(d, lambda d: by_id(d, "key").is_displayed(), "the key prompt")
    assert "missing API key" in by_id(d, "key-message").text and not by_id(d, "files").is_enabled()
    wrong = httpx.get(served_tiny.url + "/model", headers={"X-API-Key": "not-the-key"}, timeout=30).json()["detail"]
    by_id(d, "key-input").send_keys("not-the-key\n")
    wait(d, lambda d: by_id(d, "key-message").text == wrong, "the wrong key's message")
    assert not by_id(d, "files").is_enabled()
    by_id(d, "key-input").send_keys(SERVED_KEY + "\n")
    wait(d, lambda d: by_id(d, "files").is_enabled(), "the page after the right key")
    assert not by_id(d, "key").is_displayed()
    facts = by_id(d, "model-card").text
    assert "tiny_cnn" in facts and tiny_ckpt.name in facts

    # Photos through the real file input; each card shows the API's numbers for its file.
    by_id(d, "files").send_keys("\n".join(str(folder / name) for name in order))
    wait(d, lambda d: len(css(d, ".card.done, .card.error")) == len(order), "every card scored")
    expected = {name: api(served_tiny, "/score", folder / name) for name in order}
    for name, want in expected.items():
        shown = card(d, name)
        if "error" in want:
            assert "error" in shown.get_attribute("class") and shown.find_element("css selector", ".error-text").text == want["error"]
            continue
        assert shown.find_element("css selector", ".mean").text == f"{want['mean']:.2f}", name
        assert shown.find_element("css selector", ".std").text == f"std {want['std']:.2f}", name
        assert len(shown.find_elements("css selector", ".bars rect")) == 10
        assert "tiny_cnn" in shown.find_element("css selector", ".model-name").text
    scored = sorted((n for n in order if "mean" in expected[n]), key=lambda n: -expected[n]["mean"])
    summary = by_id(d, "summary").text
    assert f"best: {scored[0]} ({expected[scored[0]]['mean']:.2f})" in summary and "1 could not be read" in summary
    assert card(d, scored[0]).find_element("css selector", ".badge").text == "best"
    assert card(d, scored[-1]).find_element("css selector", ".badge").text == "worst"

    # Sorting reorders the cards (the unreadable one last in score orders).
    assert card_names(d) == order
    sort = Select(by_id(d, "sort"))
    for value, want in (("score-desc", scored + ["broken.jpg"]), ("score-asc", scored[::-1] + ["broken.jpg"]),
                        ("name", sorted(order)), ("added", order)):
        sort.select_by_value(value)
        assert card_names(d) == want, value
    sort.select_by_value("score-desc")

    # The CSV equals test.py's predictions.csv for the same files.
    by_id(d, "csv").click()
    target = os.path.join(downloads, "predictions.csv")
    wait(d, lambda d: os.path.exists(target) and not os.path.exists(target + ".crdownload"), "the CSV download")
    assert run_test(["--model", tiny_ckpt, "--test_images", folder, "--predictions", tmp_path / "pred",
                     "--workers", "0", "--quiet"]) == 1  # 1: the broken file
    with open(target, newline="") as f:
        page_rows = list(csv.reader(f))
    with open(tmp_path / "pred" / "predictions.csv", newline="") as f:
        cli_rows = list(csv.reader(f))
    assert page_rows[0] == cli_rows[0] and [r[0] for r in page_rows] == [r[0] for r in cli_rows]
    assert [r[-1] for r in page_rows] == [r[-1] for r in cli_rows]  # percentile: none for this model
    assert np.allclose(np.array([r[1:-1] for r in page_rows[1:]], float), np.array([r[1:-1] for r in cli_rows[1:]], float),
                       atol=2e-6)

    # "Why this score": the heat map, at the photo's size, in place of the photo and back.
    chelsea = card(d, "chelsea.png")
    explain, enhance = chelsea.find_elements("css selector", ".actions button")
    explain.click()
    heat = chelsea.find_element("css selector", "img.heat")
    wait(d, lambda d: heat.is_displayed() and natural_size(d, heat)[0] > 0, "the heat map")
    assert natural_size(d, heat) == (451, 300) and explain.get_attribute("aria-pressed") == "true"
    assert "grad-cam" in chelsea.find_element("css selector", ".explain-panel").text
    explain.click()
    assert not heat.is_displayed() and explain.get_attribute("aria-pressed") == "false"

    # "Raise the score": before and after with the API's scores, the settings, the download, the sweep.
    want = api(served_tiny, "/enhance", folder / "chelsea.png")
    enhance.click()
    wait(d, lambda d: chelsea.find_elements("css selector", ".score-after"), "the enhancement")
    assert chelsea.find_element("css selector", ".score-after").text == f"{want['score_after']:.2f}"
    assert chelsea.find_element("css selector", ".score-before").text == f"{want['score_before']:.2f}"
    after = chelsea.find_element("css selector", "img.enhanced")
    wait(d, lambda d: natural_size(d, after)[0] > 0, "the enhanced photo")
    assert natural_size(d, after) == (451, 300)
    settings = chelsea.find_element("css selector", ".settings").text
    assert settings == (want["note"] if not want["raised"] else
                        "Settings: " + ", ".join(f"{k} {v:.2f}" for k, v in want["params"].items()))
    link = chelsea.find_element("css selector", "a.download")
    assert link.get_attribute("download") == "chelsea-enhanced.jpg"
    assert Image.open(io.BytesIO(base64.b64decode(link.get_attribute("href").split(",", 1)[1]))).size == (451, 300)
    sweep = chelsea.find_elements("css selector", ".sweep li")
    assert [s.find_element("css selector", ".sweep-score").text for s in sweep] == [
        f"mean {v:.2f}" for v in want["sweep"]["scores"]]
    assert "(as is)" in sweep[3].text

    # Every control has a label; at phone width nothing is wider than the screen.
    for control in css(d, "input, select, button"):
        named = ((control.get_attribute("textContent") or "").strip() or control.get_attribute("aria-label")
                 or css(d, f"label[for='{control.get_attribute('id')}']"))
        assert named, control.get_attribute("outerHTML")[:120]
    os.makedirs(artifacts(tmp_path), exist_ok=True)
    d.set_window_size(1280, 2000)
    d.save_screenshot(os.path.join(artifacts(tmp_path), "web-page.png"))
    d.set_window_size(390, 844)
    time.sleep(0.3)
    assert d.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    d.save_screenshot(os.path.join(artifacts(tmp_path), "web-page-phone.png"))
    d.set_window_size(1280, 1100)

    # Not one console entry but the HTTP errors provoked above: 401 for the missing and the
    # wrong key, 422 for the broken file (Chromium logs those itself). A missing favicon,
    # a script error or a blocked resource would be here too.
    gather(d)
    provoked = "Failed to load resource: the server responded with a status of "
    assert sorted(console_lines(d.console)) == sorted([("/model", provoked + "401 (Unauthorized)")] * 2 + [
        ("/score", provoked + "422 (Unprocessable Entity)")]), d.console


def test_docs_try_it_out_with_the_key(browser, served_tiny):
    """/docs offline (no internet in this test either way: every asset comes from the
    service) and "Try it out" on GET /model with the key given to Swagger UI."""
    d = browser
    gather(d)
    start = len(d.console)
    d.get(served_tiny.url + "/docs")
    wait(d, lambda d: len(css(d, ".opblock")) >= 6, "Swagger UI's operations")
    assert css(d, ".btn.authorize")
    d.execute_script("ui.preauthorizeApiKey('X-API-Key', arguments[0])", SERVED_KEY)  # what Authorize's dialog sets
    block = by_id(d, "operations-default-model_model_get")
    block.find_element("css selector", ".opblock-summary-control").click()
    wait(d, lambda d: block.find_elements("css selector", ".try-out__btn"), "Try it out")[0].click()
    wait(d, lambda d: block.find_elements("css selector", ".execute"), "Execute")[0].click()
    status = wait(d, lambda d: block.find_elements("css selector", ".live-responses-table tr.response .response-col_status"), "the answer")
    assert status[0].text.strip() == "200"
    assert "tiny_cnn" in block.find_element("css selector", ".live-responses-table .microlight").text
    gather(d)
    assert d.console[start:] == []
