"""The Prefect UI in a real browser (headless Debian Chromium): start `style-run` through Custom
run with a changed parameter, watch it reach Completed and find the base|LoRA grid among its
artifacts. Screenshots go to the test's tmp dir (and to $PIXART_SCREENSHOT_DIR when set)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from playwright.sync_api import Page, expect, sync_playwright

from tests import serve_harness as harness
from tests.serve_harness import call

CHROMIUM = "/usr/bin/chromium"  # Debian's package (scripts/setup.sh installs it); never `playwright install`
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]  # fmt: skip
MAX_STEPS = 6  # the changed parameter (the config says 10)


def form_input(page: Page, label: str):
    """The input of one field of Prefect's schema form, found by the field's label."""
    return page.locator(
        f"xpath=//span[normalize-space()='{label}']"
        "/ancestor::div[contains(concat(' ', @class, ' '), ' schema-form-property ')][1]"
        "//*[self::input or self::textarea]"
    )


def wait_for_custom_run(api: str, deployment_id: str, timeout_s: float = 60) -> str:
    """The flow run the form created: the deployment's run with the changed max_steps."""
    query = {"deployments": {"id": {"any_": [deployment_id]}}}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for run in call("POST", f"{api}/flow_runs/filter", json=query).json():
            if run["parameters"].get("config", {}).get("train", {}).get("max_steps") == MAX_STEPS:
                return run["id"]
        time.sleep(1)
    raise AssertionError(f"no flow run with train.max_steps={MAX_STEPS} within {timeout_s:.0f} s")


def save(page: Page, path: Path) -> None:
    page.screenshot(path=str(path))
    if os.environ.get("PIXART_SCREENSHOT_DIR"):
        shutil.copy(path, Path(os.environ["PIXART_SCREENSHOT_DIR"]) / path.name)


def test_custom_run_from_the_ui_completes_and_lists_the_grid(tmp_path: Path, tiny_models):
    harness.fast_config(tmp_path / "fast.yaml", "browser")
    workdir, log_path = tmp_path / "work", tmp_path / "serve.log"
    # No PREFECT_API_URL: serve starts its own server, UI included, as on a fresh machine.
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    process = harness.start_serve(tmp_path / "fast.yaml", workdir, env, log_path)
    try:
        info = harness.wait_for_serve(process, workdir, log_path)
        api, ui = info["api_url"], info["ui_url"]
        deployment_id = call("GET", f"{api}/deployments/name/style-run/style-run").json()["id"]
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.set_default_timeout(60_000)

                # Deployments > style-run > Run > Custom run: the typed form, the config as defaults.
                page.goto(f"{ui}/deployments/deployment/{deployment_id}/run")
                max_steps = form_input(page, "Max Steps (Optional)")
                expect(max_steps).to_have_value("10")
                expect(form_input(page, "Run Name (Optional)")).to_have_value("browser")
                max_steps.fill(str(MAX_STEPS))
                page.get_by_role("button", name="Submit").click()
                run_id = wait_for_custom_run(api, deployment_id)

                harness.wait_for_state(api, run_id, "Completed", log_path, timeout_s=240)
                page.goto(f"{ui}/runs/flow-run/{run_id}")
                expect(page.get_by_text("Completed", exact=True).first).to_be_visible()
                page.get_by_text("Artifacts", exact=True).first.click()
                grid = page.get_by_text("browser-lora-grid", exact=True)
                expect(grid).to_be_visible()
                for key in (
                    "browser-captions",
                    "browser-loss-curve",
                    "browser-style-shift",
                    "browser-results",
                ):
                    expect(page.get_by_text(key, exact=True)).to_be_visible()
                grid.scroll_into_view_if_needed()
                save(page, tmp_path / "style-run-artifacts.png")

                grid.click()  # the artifact's page: the grid sheet itself must load in the browser
                page.wait_for_function(
                    "() => [...document.images].some(i => i.complete && i.naturalWidth >= 256)"
                )
                save(page, tmp_path / "style-run-grid.png")
            finally:
                browser.close()
    finally:
        harness.stop_serve(process)
    assert (tmp_path / "style-run-artifacts.png").stat().st_size > 10_000
