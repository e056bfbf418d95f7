"""report.html: one self-contained page of the bench's results, checked as a page (every row, nothing fetched
from the network, the Pareto front) and in a real headless Chromium with the network off (no console error,
the table sorts and filters, the plot renders)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from peftmed.bench.html import pareto

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    folder = tmp_path_factory.mktemp("html")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "peftmed", "bench", "--recipes", "*=layernorm", "*=lora(r=4)",
                        "--steps", "2", "--eval-samples", "8", "--batch-size", "4", "--no-transfer", "--no-progress",
                        "--dataset-option", "n_images=8", "--output", "a"], capture_output=True, text=True, env=env,
                       cwd=folder, timeout=900)
    assert r.returncode == 0, r.stderr
    shutil.copytree(folder / "a", folder / "b")
    c = subprocess.run([sys.executable, "-m", "peftmed", "bench", "--compare", "a", "b", "--output", "cmp"],
                       capture_output=True, text=True, env=env, cwd=folder, timeout=300)
    assert c.returncode == 0, c.stderr
    return folder


def test_the_page_holds_every_row_and_fetches_nothing(bench):
    page = (bench / "a" / "report.html").read_text()
    data = json.loads((bench / "a" / "results.json").read_text())
    for row in data["summary"]:
        assert f">{row['label']}<" in page
    assert "report.html" in (bench / "a" / "report.md").read_text()
    assert "<script src=" not in page and "cdn.plot.ly" not in page.split("</head>")[1]
    assert page.count('<tr class="peft">') >= 1 and "Pareto front" in page
    compare = (bench / "cmp" / "compare.html").read_text()
    assert compare.count('data-key="run"') == 1 and ">a<" in compare and ">b<" in compare


def test_the_data_block_parses_whatever_the_labels(bench, registry):
    """The JSON block was HTML-escaped inside <script>, so JSON.parse failed on a label with a quote or an &."""
    from peftmed.bench.html import html_document

    data = json.loads((bench / "a" / "results.json").read_text())
    evil = '</script><script>alert(1)</script> & "q" <!-- '
    for row in data["rows"] + data["summary"]:
        row["label"] = evil + row["label"]
    page = html_document([("a", data)], registry.get("task", "vqa"), "t")
    block = page.split("id='results-data'>", 1)[1].split("</script>", 1)[0]
    parsed = json.loads(block)  # what the page's script reads with JSON.parse(textContent)
    assert all(r["label"].startswith(evil) for r in parsed) and len(parsed) >= len(data["summary"])
    assert "<script>alert(1)" not in page


def test_pareto_front():
    points = [(0, 0.55, "frozen"), (2560, 0.565, "ln"), (3456, 0.558, "ia3"), (10240, 0.573, "lora"),
              (455621, 0.587, "full"), (198528, 0.565, "ffn")]
    assert [p[2] for p in pareto(points)] == ["frozen", "ln", "lora", "full"]


@pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs chromium and chromedriver (apt-get install chromium "
                                                      "chromium-driver; .ci/run installs them)")
def test_in_a_headless_browser_offline(bench, tmp_path):
    pytest.importorskip("selenium")
    from PIL import Image, ImageStat
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    os.environ["SE_OFFLINE"] = "true"  # selenium must not look for (or download) a browser or a driver
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    try:
        driver.set_network_conditions(offline=True, latency=0, download_throughput=0, upload_throughput=0)
        driver.get((bench / "a" / "report.html").as_uri())
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert errors == []

        def column(key):
            index = [th.get_attribute("data-key") for th in driver.find_elements(By.CSS_SELECTOR, "#results th")].index(key)
            return [r.find_elements(By.TAG_NAME, "td")[index].get_attribute("data-value")
                    for r in driver.find_elements(By.CSS_SELECTOR, "#results tbody tr") if r.is_displayed()]

        header = driver.find_element(By.CSS_SELECTOR, '#results th[data-key="trainable"]')
        header.click()
        ascending = [float(v) for v in column("trainable") if v]
        assert ascending == sorted(ascending) and len(ascending) >= 3
        header.click()
        descending = [float(v) for v in column("trainable") if v]
        assert descending == sorted(descending, reverse=True)

        driver.find_element(By.ID, "filter").send_keys("lora")
        shown = [r.text for r in driver.find_elements(By.CSS_SELECTOR, "#results tbody tr") if r.is_displayed()]
        assert shown and all("lora" in t.lower() for t in shown)

        assert len(driver.find_elements(By.CSS_SELECTOR, "#chart-0 .main-svg")) >= 1
        assert driver.find_elements(By.CSS_SELECTOR, "#chart-0 .scatterlayer .point")  # the recipes are drawn
        shot = tmp_path / "chart.png"
        driver.find_element(By.ID, "chart-0").screenshot(str(shot))
        image = Image.open(shot).convert("L")
        assert image.size[0] > 300 and ImageStat.Stat(image).stddev[0] > 10  # not blank
        assert len(Image.open(shot).convert("RGB").getcolors(1 << 20)) > 50
    finally:
        driver.quit()
