"""The operator console at `/`, in a real headless browser (Debian's chromium and its driver):
search with a clip and see its source track first with a match plot and the tunes of clip and
reference, ingest an archive and see its job reach `done`; nothing is loaded from another
host and nothing is logged as an error."""

from __future__ import annotations

import io
import shutil
import time
import zipfile
from pathlib import Path

import pytest
import soundfile as sf

from refrain.service.settings import Settings

from conftest import CKPT_A, DATA, LiveServer
from helpers import encode, synth_song

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs chromium and chromedriver"),
]
KEY = "k1"


def cut(path: Path, start_s: float, seconds: float, out: Path) -> Path:
    x, sr = sf.read(path, dtype="float32", start=int(start_s * 44100), frames=int(seconds * 44100))
    sf.write(out, x, sr)
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("console")
    srv = LiveServer(Settings(data_dir=root / "data", model=str(CKPT_A), api_keys=KEY))
    with srv.client(headers={"X-API-Key": KEY}) as c:
        song = (DATA / "audio" / "song75s.flac").read_bytes()
        r = c.post(
            "/v1/tracks",
            files={"audio": ("song.flac", song)},
            data={"track_id": "song", "title": "The song", "work_id": "W1"},
        )
        assert r.status_code == 201, r.text
        for k in range(3):  # unrelated songs beside it
            other = encode(synth_song(40.0, seed=70 + k), "flac")
            r = c.post(
                "/v1/tracks",
                files={"audio": (f"other{k}.flac", other)},
                data={"track_id": f"other-{k}", "title": f"Another song {k}"},
            )
            assert r.status_code == 201, r.text
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--window-size=1280,1000",
        "--disable-dev-shm-usage",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def wait(driver, condition, timeout=60):
    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)


def test_search_catalog_and_ingestion_in_the_browser(server, browser, tmp_path):
    browser.get(server.url + "/")
    key = browser.find_element(By.ID, "api-key")
    key.send_keys(KEY)
    browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)
    wait(browser, lambda d: "ready" in d.find_element(By.ID, "status").text)

    # search: a 12 s cut of the reference finds it first, with a plot of where it matches
    clip = cut(DATA / "audio" / "song75s.flac", 30.0, 12.0, tmp_path / "clip.wav")
    browser.find_element(By.ID, "clip").send_keys(str(clip))
    browser.find_element(By.CSS_SELECTOR, "#search-form button[type=submit]").click()
    first = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#results li"))[0]
    assert first.get_attribute("data-track") == "song"
    assert first.find_elements(By.CSS_SELECTOR, "svg.timeline rect.match-ref")
    assert "The song" in first.text
    # verified: the aligned range, its tempo ratio and the alignment score are shown
    label = first.find_element(By.CSS_SELECTOR, "svg.timeline text.match-label").text
    assert "tempo \u00d7" in label and "alignment" in first.text
    # and the tunes of the clip and of the reference, one above the other, drawn as notes
    (plot,) = first.find_elements(By.CSS_SELECTOR, "svg.tune")
    assert plot.size["height"] > 100 and plot.size["width"] > 500
    assert plot.find_elements(By.CSS_SELECTOR, "rect.tune-query")
    assert plot.find_elements(By.CSS_SELECTOR, "rect.tune-ref")
    assert "clip tune" in plot.text and "reference tune" in plot.text

    # catalog: the tracks are listed
    browser.find_element(By.CSS_SELECTOR, 'button.tab[data-tab="catalog"]').click()
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#tracks tbody tr")) >= 2)

    # ingestion: an archive of two files becomes a job that reaches done
    archive = tmp_path / "two.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for n, start in enumerate((5.0, 50.0)):
            buf = io.BytesIO()
            x, sr = sf.read(
                DATA / "audio" / "song75s.flac",
                dtype="float32",
                start=int(start * 44100),
                frames=8 * 44100,
            )
            sf.write(buf, x * 0.5, sr, format="WAV")
            z.writestr(f"part{n}.wav", buf.getvalue())
    browser.find_element(By.CSS_SELECTOR, 'button.tab[data-tab="ingest"]').click()
    browser.find_element(By.ID, "ingest-archive").send_keys(str(archive))
    browser.find_element(By.CSS_SELECTOR, "#ingest-form button[type=submit]").click()
    done = wait(
        browser,
        lambda d: d.find_elements(By.CSS_SELECTOR, '#jobs tr[data-state="done"]'),
        timeout=120,
    )
    assert done and "job" in browser.find_element(By.ID, "ingest-note").text

    # nothing from another host, no console errors
    origin = server.url
    urls = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
    )
    assert urls and all(u.startswith(origin) for u in urls), urls
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []
    time.sleep(0.1)
