"""The upload page in headless Chromium: drop a film, see both knees graded (or why not), no console errors.

Driven by Selenium through Debian's `chromium` and `chromium-driver` (`apt-get install chromium chromium-driver`);
skipped, saying so, where either is absent.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager

import httpx
import pytest

from real_data import NONKNEE, needs_kneekl224, needs_nonknee, real_film

pytest_plugins = ["deploy_fixtures"]

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
DRIVER = shutil.which("chromedriver")


needs_browser = pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                                   reason="headless Chromium + chromedriver not installed (Debian: apt-get install "
                                          "chromium chromium-driver)")


@contextmanager
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,1600"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))
    try:
        driver.set_page_load_timeout(60)
        yield driver
    finally:
        driver.quit()


def upload(driver, url: str, path) -> str:
    """Drop `path` on the page at `url`; the page's final state (done or error)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url + "/")
    driver.find_element(By.ID, "file").send_keys(str(path))
    WebDriverWait(driver, 120).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state"))
    return driver.find_element(By.TAG_NAME, "body").get_attribute("data-state")


@needs_browser
def test_upload_page_renders_grades_without_console_errors(live_server, phantom_films, tmp_path):
    from selenium.webdriver.common.by import By

    with browser(tmp_path) as driver:
        assert upload(driver, live_server.url, phantom_films[0]) == "done"
        expected = httpx.post(f"{live_server.url}/api/predict", timeout=120,
                              files={"file": ("film.dcm", phantom_films[0].read_bytes())}).json()
        cards = driver.find_elements(By.CSS_SELECTOR, "section.knee")
        assert [c.get_attribute("data-side") for c in cards] == ["R", "L"]
        for card, knee in zip(cards, expected["knees"], strict=True):
            grade = card.find_element(By.CSS_SELECTOR, ".grade[data-task=klg]")
            assert grade.get_attribute("data-class") == str(knee["tasks"]["klg"]["class"])
            assert f"KL grade {knee['tasks']['klg']['class']}" in grade.text
            images = card.find_elements(By.TAG_NAME, "img")
            assert len(images) == 2 and all(driver.execute_script("return arguments[0].naturalWidth", i) > 0
                                            for i in images)
            assert len(card.find_elements(By.CSS_SELECTOR, ".bar")) == 5 + 3  # KL classes + three features
        driver.save_screenshot(str(tmp_path / "page.png"))
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []


@needs_browser
@needs_kneekl224
@needs_nonknee
def test_upload_page_shows_why_a_knee_or_an_image_is_not_graded(builtin_server, tmp_path):
    from selenium.webdriver.common.by import By

    film, _ = real_film(tmp_path / "film.dcm", missing="L")
    with browser(tmp_path) as driver:
        assert upload(driver, builtin_server.url, film) == "done"
        graded = driver.find_elements(By.CSS_SELECTOR, "section.knee:not(.not-graded)")
        missing = driver.find_elements(By.CSS_SELECTOR, "section.not-graded")
        assert [c.get_attribute("data-side") for c in graded] == ["R"]
        assert [c.get_attribute("data-side") for c in missing] == ["L"]
        assert "not graded" in missing[0].text and missing[0].find_element(By.CSS_SELECTOR, ".reason").text
        chest = sorted((NONKNEE / "chest_openist").glob("*.jp*g"))[0]
        assert upload(driver, builtin_server.url, chest) == "error"
        assert "knee check" in driver.find_element(By.ID, "status").text
        refused = driver.find_elements(By.CSS_SELECTOR, "section.not-graded")
        assert len(refused) == 1 and "Knee check score" in refused[0].text
