"""The rating page in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium)."""

import csv
import shutil
import threading

import pytest

from dladiff.evaluate import mos
from dladiff.rate_server import RatingSession, make_server, url_of
from test_mos import write_evaluation

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1200,900")


def browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("no headless browser: install Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    return chromium, driver


@pytest.fixture()
def browser(tmp_path):
    chromium, driver_path = browser_paths()
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def serve(root, rater):
    server = make_server(RatingSession.start(mos.open_study(root), rater), 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def wait_for(driver, condition, timeout=15):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: d.execute_script(condition))


def shown_item(driver) -> str:
    """The item on screen once its image has loaded (the page accepts ratings only then)."""
    wait_for(driver, "return document.body.dataset.ready && document.body.dataset.ready === document.body.dataset.item")
    return driver.execute_script("return document.body.dataset.item")


def test_rate_with_keys_reload_and_restart_resume(browser, tmp_path):
    from selenium.webdriver.common.by import By

    root = tmp_path / "study"
    write_evaluation(root / "ours", "Ours")
    write_evaluation(root / "mist", "MIST")
    server = serve(root, "alice")
    url = url_of(server)
    browser.get(url)
    order = mos.open_study(root).orders["alice"]
    given = []
    for score in (5, 2, 4):
        item = shown_item(browser)
        assert item == order[len(given)]
        assert str(len(given) + 1) + " of 12" in browser.find_element(By.ID, "status").text
        src = browser.find_element(By.ID, "shot").get_attribute("src")
        assert src == url + "image/" + item  # blinded: nothing but the random id
        browser.find_element(By.TAG_NAME, "body").send_keys(str(score))
        wait_for(browser, f"return document.body.dataset.item !== '{item}'")
        given.append((item, score))
    browser.find_element(By.TAG_NAME, "body").send_keys("9")  # not a score: ignored
    browser.refresh()
    assert shown_item(browser) == order[3]
    assert "4 of 12" in browser.find_element(By.ID, "status").text
    server.shutdown()
    server.server_close()

    restarted = serve(root, "alice")  # a new server continues where the rater stopped
    browser.get(url_of(restarted))
    item = shown_item(browser)
    assert item == order[3]
    browser.find_element(By.CSS_SELECTOR, "button.score[data-score='1']").click()
    wait_for(browser, f"return document.body.dataset.item !== '{item}'")
    given.append((item, 1))
    restarted.shutdown()
    restarted.server_close()

    with (root / mos.RATINGS_FILE).open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["item"], int(r["score"])) for r in rows] == given
    assert {r["rater"] for r in rows} == {"alice"} and all(r["time"] for r in rows)
    page = browser.page_source
    for secret in ("Ours", "MIST", "id1", "id2", "dreambooth", "0000.png"):
        assert secret not in page
