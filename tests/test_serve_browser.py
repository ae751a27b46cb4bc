"""The upload page in headless Chromium: drop a phantom film, see both knees graded, no console errors.

Driven by Selenium through Debian's `chromium` and `chromium-driver` (`apt-get install chromium chromium-driver`);
skipped, saying so, where either is absent.
"""

from __future__ import annotations

import shutil

import httpx
import pytest

pytest_plugins = ["deploy_fixtures"]

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
DRIVER = shutil.which("chromedriver")


@pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                    reason="headless Chromium + chromedriver not installed (Debian: apt-get install chromium "
                           "chromium-driver)")
def test_upload_page_renders_grades_without_console_errors(live_server, phantom_films, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,1600"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))
    try:
        driver.set_page_load_timeout(60)
        driver.get(live_server.url + "/")
        driver.find_element(By.ID, "file").send_keys(str(phantom_films[0]))
        WebDriverWait(driver, 120).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state"))
        assert driver.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done"
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
    finally:
        driver.quit()
