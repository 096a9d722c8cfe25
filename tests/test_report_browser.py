"""The HTML report in a real browser: headless Chromium loads the page of a `generate` folder, every image loads
(none broken), no console message, and a screenshot is taken. A control page with a broken image and a console
error proves both checks can fail. Skipped, saying so, where Debian's chromium is not installed (.ci/run installs
it)."""

import shutil
import subprocess

import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine: apt-get install chromium")

PROBE = """<script>window.addEventListener("load", () => { const images = [...document.images];
document.title = "broken=" + images.filter(i => !i.complete || i.naturalWidth === 0).length
  + " images=" + images.length; });</script>"""


def _browse(page, tmp_path, *extra):
    """Load ``page`` headless; returns (DOM, stderr)."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'ud'}",
             "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", *extra]
    done = subprocess.run([CHROMIUM, *flags, page.as_uri()], capture_output=True, text=True, timeout=120)
    return done.stdout, done.stderr


def _probe(page, tmp_path):
    probed = page.with_name("probed.html")
    probed.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    dom, log = _browse(probed, tmp_path, "--dump-dom")
    title = dom.split("<title>", 1)[1].split("</title>", 1)[0]
    return title, [line for line in log.splitlines() if "CONSOLE" in line]


def test_control_page_fails_both_checks(tmp_path):
    page = tmp_path / "control.html"
    page.write_text('<html><head><title>x</title></head><body><img src="data:image/png;base64,AAAA">'
                    '<script>console.error("deliberate")</script></body></html>')
    title, console = _probe(page, tmp_path)
    assert title == "broken=1 images=1" and console


def test_generate_report_loads_in_chromium(tmp_path):
    from opendaam.cli import main
    from opendaam.models import build_pipeline

    build_pipeline("tiny", seed=0).save_pretrained(tmp_path / "tiny")
    out = tmp_path / "car"
    assert main(["generate", "a red car in a city", "--model", str(tmp_path / "tiny"), "--steps", "2", "--height",
                 "32", "--width", "32", "--words", "car", "red", "--threads", "1", "--out", str(out)]) == 0
    assert main(["report", str(out)]) == 0
    title, console = _probe(out / "index.html", tmp_path)
    broken, images = (int(part.split("=")[1]) for part in title.split())
    assert broken == 0 and images >= 3, title  # the image and one overlay per word at least
    assert console == []
    shot = tmp_path / "shot.png"
    _browse(out / "index.html", tmp_path, f"--screenshot={shot}", "--window-size=1200,900")
    picture = Image.open(shot).convert("L")
    assert picture.size == (1200, 900) and picture.getextrema()[0] < picture.getextrema()[1]  # not blank
