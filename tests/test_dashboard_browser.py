"""The dashboard in a real headless Chromium (Debian's chromium + chromedriver through selenium): a job
submitted through the API appears in the list, its loss curve grows as the trainer reports progress,
and the state, log and budget update live over SSE without a reload. Ray is the test's fake job server
(driven line by line here); the control plane runs for real under uvicorn with its reconciler."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from services.control_plane.app import create_app
from tests.test_control_plane_support import ADMIN, SPEC, FakeRay, LiveServer, make_settings, new_tenant, wait_for

webdriver = pytest.importorskip("selenium.webdriver")
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver")


@pytest.fixture
def browser(tmp_path):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1400,900",
        f"--user-data-dir={tmp_path / 'chrome-profile'}",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def progress(step, loss):
    event = {"type": "progress", "step": step, "max_steps": 8, "loss": loss, "shots_spent": 1700 * step}
    if step % 2 == 0:
        event["eval"] = {"loss": loss * 1.1}
    return event


# The dashboard re-renders its rows on every update, so a WebElement found a moment ago can be stale
# when read. Each read below is one script evaluated in the page: find and read in the same instant.
def text(browser, selector):
    return browser.execute_script("const e = document.querySelector(arguments[0]); return e && e.textContent", selector)


def attr(browser, selector, name):
    return browser.execute_script(
        "const e = document.querySelector(arguments[0]); return e && e.getAttribute(arguments[1])", selector, name
    )


def click(browser, selector):
    return browser.execute_script(
        "const e = document.querySelector(arguments[0]); if (e) e.click(); return !!e", selector
    )


def test_dashboard_live(tmp_path, browser):
    import httpx

    ray = FakeRay()
    settings = make_settings(tmp_path / "data", f"sqlite:///{tmp_path / 'qpeft.db'}", poll_s=0.2)
    with LiveServer(create_app(settings, ray=ray)) as server, httpx.Client(base_url=server.url, timeout=30) as api:
        key = new_tenant(api, "acme", shots=200_000)
        upload = api.post("/v1/datasets", params={"name": "notes.txt"}, content=b"one\ntwo\n", headers=key)
        dataset = upload.raise_for_status().json()["id"]
        browser.get(f"{server.url}/dashboard/#key={key['X-API-Key']}")
        assert "key=" not in browser.current_url  # the key is kept in the page, not left in the URL
        browser.execute_script("window.__loadedOnce = true")

        ds_row = f'#datasets tr[data-dataset-id="{dataset}"]'
        wait_for(lambda: text(browser, ds_row), timeout=20, what="the data set in the list")
        assert text(browser, ds_row).startswith(f"notes.txt · {dataset}") and "text" in text(browser, ds_row)
        job = api.post("/v1/jobs", json={**SPEC, "name": "browser demo", "max_steps": 8}, headers=key).json()
        row = f'#jobs tr[data-job-id="{job["id"]}"]'
        wait_for(lambda: click(browser, row), timeout=20, what="the job in the list")
        wait_for(lambda: browser.find_element("id", "job-pane").is_displayed(), timeout=10, what="the job view")

        sid = f"qpeft-{job['id']}"
        wait_for(lambda: sid in ray.jobs, timeout=20, what="the submission to Ray")

        def points():
            return int(attr(browser, "#loss-chart polyline.loss", "data-points") or 0)

        ray.emit(
            sid,
            {"type": "state", "sub_state": "TRAINING"},
            {"type": "params", "trainable": 125584, "total": 134640000},
            progress(1, 3.0),
            progress(2, 2.6),
        )
        wait_for(lambda: points() >= 2, timeout=20, what="the first points of the curve")
        for step in range(3, 8):
            ray.emit(sid, progress(step, 3.0 * 0.88**step), f"step {step} done")
            time.sleep(0.3)
        wait_for(lambda: points() == 7, timeout=20, what="the curve to grow")
        state = text(browser, f"{row} .state")
        assert state.startswith("RUNNING") and "TRAINING" in state
        wait_for(lambda: "step 7 done" in (text(browser, "#log") or ""), timeout=10, what="the log tail")
        assert attr(browser, "#loss-chart polyline.eval", "data-points") == "3"
        assert "shots:" in text(browser, "#budget-text")
        assert text(browser, '#job-meta [data-field="trainable"]') == "trainable: 125,584 of 134,640,000 parameters"
        assert text(browser, "#conn") == "live"
        # a tenant's page links nowhere on the Ray dashboard (no login there, and it takes job submissions)
        assert attr(browser, "#ray-link", "hidden") is not None
        ray_links = 'a[href^="' + FakeRay.dashboard_url + '"]'
        assert browser.execute_script("return document.querySelectorAll(arguments[0]).length", ray_links) == 0

        art = settings.job_dir(job["id"]) / "artifacts" / "adapter"
        art.mkdir(parents=True)
        (art / "adapter_config.json").write_text(json.dumps({"r": 2}))
        ray.emit(
            sid,
            progress(8, 1.1),
            {"type": "artifact", "name": "adapter", "path": str(art)},
            {"type": "result", "state": "SUCCEEDED", "reason": "max_steps reached"},
            status="SUCCEEDED",
        )
        wait_for(
            lambda: text(browser, f"{row} .state") == "SUCCEEDED",
            timeout=20,
            what="the final state",
        )
        wait_for(lambda: "adapter" in (text(browser, "#artifacts") or ""), timeout=10, what="artifacts")
        assert points() == 8
        assert browser.execute_script("return window.__loadedOnce === true")  # live updates, no reload
        assert attr(browser, "#ray-link", "hidden") is not None
        shot = tmp_path / "dashboard.png"
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        print(f"dashboard screenshot: {shot}")
        # the admin key's page gets the operator's link
        browser.get("about:blank")
        browser.get(f"{server.url}/dashboard/#key={ADMIN}")
        wait_for(lambda: attr(browser, "#ray-link", "hidden") is None, timeout=10, what="the admin's Ray link")
        assert attr(browser, "#ray-link", "href") == FakeRay.dashboard_url
