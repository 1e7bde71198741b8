"""The console's screenshot: the real service, a small catalog, one search in a browser.

    python docs/screenshot.py [--out docs/console.png]

Starts `refrain serve` (the shipped model, open writes on loopback) on a free loopback port
with a temporary data folder, adds five synthetic reference tracks (two versions of one
tune, three other tunes in minor keys), searches a 20 s clip of a third version of the tune
(faster and two semitones up) from the console in headless chromium, and saves the page as
a PNG once the answer, with its aligned ranges, tempo ratios, key shifts and the tunes of
clip and reference, is shown.
Everything it started is stopped before it exits. Needs chromium and chromedriver (Debian:
`chromium`, `chromium-driver`) and selenium (`pip install -e '.[dev]'`).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf

SR = 44100
WIDTH = 1280
ROOT = Path(__file__).resolve().parents[1]
MAJOR = (0, 2, 4, 5, 7, 9, 11)
MINOR = (0, 2, 3, 5, 7, 8, 10)


def tune(seed: int, bars: int = 24) -> list[tuple[int, int, float]]:
    """(bar, scale degree, beats) notes of a seeded tune in 4/4 that never repeats a bar."""
    rng = np.random.default_rng(seed)
    notes = []
    for bar in range(bars):
        beats = 0.0
        while beats < 4:
            length = float(min(rng.choice([0.5, 1.0, 1.0, 1.5, 2.0]), 4 - beats))
            notes.append((bar, int(rng.integers(0, 10)), length))
            beats += length
    return notes


def render(
    notes: list[tuple[int, int, float]],
    bpm: float,
    key: int,
    harmonics: tuple[float, ...],
    seed: int,
    scale: tuple[int, ...] = MAJOR,
) -> np.ndarray:
    """A version of a tune: its melody over a chord per bar, at a tempo, key and timbre."""
    rng = np.random.default_rng(seed)
    beat = 60.0 / bpm
    bars = notes[-1][0] + 1
    out = np.zeros(int((bars * 4 + 1) * beat * SR))
    chords = np.random.default_rng(notes[0][1] + len(notes)).choice([0, 3, 4, 5], size=bars)

    def tone(midi: float, start: float, seconds: float, gain: float, decay: float) -> None:
        a = int(start * SR)
        t = np.arange(int(seconds * SR)) / SR
        f = 440.0 * 2 ** ((midi - 69) / 12)
        wave = sum(
            h / (i + 1) * np.sin(2 * np.pi * f * (i + 1) * t) for i, h in enumerate(harmonics)
        )
        env = np.minimum(1.0, t * 40) * np.exp(-t * decay)
        out[a : a + len(t)] += gain * wave * env

    for bar, degree in enumerate(chords):  # chord and bass, one per bar
        root = 48 + key + scale[degree]
        for step in (0, 2, 4):
            pitch = 48 + key + scale[(degree + step) % 7] + 12 * ((degree + step) // 7)
            tone(pitch, bar * 4 * beat, 4 * beat, 0.05, 0.6)
        tone(root - 12, bar * 4 * beat, 4 * beat, 0.12, 0.8)
    at = 0.0
    for _bar, degree, beats in notes:  # the melody
        tone(72 + key + scale[degree % 7] + 12 * (degree // 7), at, beats * beat, 0.16, 2.0)
        at += beats * beat
    out += 0.002 * rng.standard_normal(len(out))
    return (0.8 * out / np.abs(out).max()).astype(np.float32)


def catalog(folder: Path) -> tuple[list[tuple[Path, dict[str, str]]], Path]:
    """The reference files with their metadata, and the query clip."""
    melody = tune(1)
    refs = [
        (
            render(melody, 100, 0, (1.0, 0.5, 0.3, 0.2), seed=10),
            {"track_id": "lantern-1", "title": "Lantern Song", "artist": "The Originals"},
        ),
        (
            render(melody, 88, -3, (1.0, 0.1, 0.6, 0.05, 0.3), seed=11),
            {"track_id": "lantern-2", "title": "Lantern Song (slow)", "artist": "Night Choir"},
        ),
    ]
    for n, (title, artist) in enumerate(
        [("Harbour Lights", "Quay Band"), ("Salt and Stone", "Ferrymen"), ("Late Train", "Duo")]
    ):
        notes = tune(20 + n)
        refs.append(
            (
                render(notes, 96 + 8 * n, n - 1, (1.0, 0.4, 0.25), seed=30 + n, scale=MINOR),
                {"track_id": f"other-{n + 1}", "title": title, "artist": artist},
            )
        )
    files = []
    for wave, meta in refs:
        meta["work_id"] = "W-lantern" if meta["track_id"].startswith("lantern") else meta["title"]
        path = folder / f"{meta['track_id']}.flac"
        sf.write(path, wave, SR)
        files.append((path, meta))
    cover = render(melody, 108, 2, (1.0, 0.7, 0.1, 0.4), seed=12)  # faster, 2 semitones up
    clip = folder / "clip.wav"
    sf.write(clip, cover[int(18 * SR) : int(38 * SR)], SR)
    return files, clip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def refrain_command() -> list[str]:
    script = Path(sys.executable).with_name("refrain")
    if script.exists():
        return [str(script)]
    return [
        sys.executable,
        "-c",
        "import sys; from refrain.service.cli import main; sys.exit(main())",
    ]


def wait_ready(url: str, server: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"refrain serve exited with {server.returncode}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError("the service did not become ready")


def screenshot(url: str, clip: Path, out: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not (chromium and driver_path):
        raise SystemExit("needs chromium and chromedriver (Debian: chromium, chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        f"--window-size={WIDTH},900",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        wait = WebDriverWait(driver, 300, poll_frequency=0.2)
        driver.get(url + "/")
        wait.until(lambda d: "ready" in d.find_element(By.ID, "status").text)
        driver.find_element(By.ID, "top-k").clear()
        driver.find_element(By.ID, "top-k").send_keys("4")
        driver.find_element(By.ID, "clip").send_keys(str(clip))
        driver.find_element(By.CSS_SELECTOR, "#search-form button[type=submit]").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results li")) == 4)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "svg.timeline text.match-label"))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "svg.tune rect.note"))
        time.sleep(0.5)  # the last timeline's layout
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.execute_cdp_cmd(  # the whole answer in one picture, WIDTH pixels wide
            "Emulation.setDeviceMetricsOverride",
            {
                "width": WIDTH,
                "height": min(int(height), 2000),
                "deviceScaleFactor": 1,
                "mobile": False,
            },
        )
        time.sleep(0.3)
        out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(out))
    finally:
        driver.quit()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "console.png")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="refrain-screenshot-") as tmp:
        folder = Path(tmp)
        files, clip = catalog(folder)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = [*refrain_command(), "serve", "--data", str(folder / "data"), "--port", str(port)]
        with open(folder / "serve.log", "wb") as log:
            server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
            try:
                wait_ready(url, server)
                with httpx.Client(base_url=url, timeout=300) as client:
                    for path, meta in files:
                        with open(path, "rb") as f:
                            r = client.post(
                                "/v1/tracks", files={"audio": (path.name, f)}, data=meta
                            )
                        r.raise_for_status()
                screenshot(url, clip, args.out)
            except BaseException:
                sys.stderr.write((folder / "serve.log").read_text(errors="replace")[-4000:])
                raise
            finally:
                server.terminate()
                try:
                    server.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.wait()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
