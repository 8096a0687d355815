"""The Trainer tab in a real browser (headless Chromium driven by playwright) against the fake host: one textual
inversion run clicked through from the form, the loss chart drawn, a preview shown, the job panel listing the
job and a reloaded page attaching to it again.

Skipped when playwright or a Chromium is not installed (tests/run.sh installs both where it can). Set
TRAINER_UI_SCREENSHOTS to a folder to keep wide and narrow screenshots of the tab during and after the run.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

playwright_api = pytest.importorskip("playwright.sync_api")

# Debian's /usr/bin/chromium is a launcher script; the browser itself lies beside its libraries
CHROMIUM = os.environ.get("TRAINER_CHROMIUM") or next(
    (
        p
        for p in ("/usr/lib/chromium/chromium", *map(shutil.which, ("chromium", "chromium-browser", "google-chrome")))
        if p and Path(p).is_file()
    ),
    None,
)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium found (apt-get install chromium)")
FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHOTS = os.environ.get("TRAINER_UI_SCREENSHOTS")
# the txt2img controls "Use txt2img settings" reads, as the WebUI 1.10 names them
TXT2IMG_BOXES = """() => {
    const add = (id, html) => { const d = document.createElement('div'); d.id = id; d.innerHTML = html;
                                document.body.appendChild(d); };
    add('txt2img_prompt', '<textarea>a photo of [name], watercolor</textarea>');
    add('txt2img_neg_prompt', '<textarea>blurry</textarea>');
    add('txt2img_sampling', '<input value="Euler a">');
    for (const [id, v] of [['txt2img_steps', 2], ['txt2img_cfg_scale', 6.5], ['txt2img_width', 64],
                           ['txt2img_height', 64], ['txt2img_seed', 7]]) {
        add(id, '<input type="number" value="' + v + '">');
    }
}"""


@pytest.fixture
def browser():
    with playwright_api.sync_playwright() as p:
        try:
            launched = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        except Exception as exc:  # a Chromium that cannot start here (no shared libraries, no /dev/shm)
            pytest.skip(f"Chromium at {CHROMIUM} does not start: {exc}")
        yield launched
        launched.close()


def fill(page, elem_id: str, value) -> None:
    """Type ``value`` into the control with ``elem_id`` (its text box or number box) and leave it."""
    box = page.locator(f"#{elem_id}").locator("input[type=number], textarea, input[type=text]").first
    box.fill(str(value))
    box.press("Tab")


def shot(page, name: str, width: int) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.set_viewport_size({"width": width, "height": 1100})
        page.screenshot(path=str(Path(SHOTS) / f"{name}-{width}.png"), full_page=True)


def test_a_textual_inversion_run_clicked_through_the_tab(browser, webui):
    from tests.support.ui_server import Server, build_app

    with Server(build_app(webui)) as server:
        page = browser.new_page(viewport={"width": 1600, "height": 1100})
        errors = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(server.url)
        page.wait_for_selector("#trainer_root", timeout=60_000)
        # two columns side by side on a wide screen
        settings, run = (page.locator(f"#{i}").bounding_box() for i in ("trainer_settings", "trainer_run"))
        assert run["x"] >= settings["x"] + settings["width"] - 1
        page.wait_for_function("() => document.querySelector('#trainer_textual_inversion_embedding_name').title")
        fill(page, "trainer_textual_inversion_embedding_name", "zqbrowser")
        fill(page, "trainer_textual_inversion_data_data_dir", webui.data)
        page.locator("#trainer_textual_inversion_acc_training").click()  # the Training group starts folded
        page.wait_for_function("() => document.querySelector('#trainer_textual_inversion_train_steps').title")
        fill(page, "trainer_textual_inversion_train_steps", 40)
        fill(page, "trainer_textual_inversion_train_preview_every", 20)
        fill(page, "trainer_textual_inversion_train_save_every", 20)
        fill(page, "trainer_textual_inversion_data_width", 64)
        fill(page, "trainer_textual_inversion_data_height", 64)
        page.locator("#trainer_acc_previews").click()
        # "Use txt2img settings" reads the txt2img tab's boxes (stand-ins with the WebUI's element ids here)
        page.evaluate(TXT2IMG_BOXES)
        page.locator("#trainer_preview_from_txt2img").click()
        page.wait_for_function("() => document.querySelector('#trainer_preview_steps input').value === '2'")
        assert page.locator("#trainer_preview_prompt textarea").input_value() == "a photo of [name], watercolor"
        assert page.locator("#trainer_preview_width input").input_value() == "64"
        page.locator("#trainer_train").click()
        page.wait_for_selector("#trainer_previews figure img", timeout=120_000)
        shot(page, "trainer-running", 1600)
        page.wait_for_function(
            "() => (document.querySelector('#trainer_progress') || {}).textContent.includes('done')", timeout=120_000
        )
        page.wait_for_function("() => document.querySelectorAll('#trainer_previews figure').length === 2")
        captions = page.locator("#trainer_previews figcaption").all_text_contents()
        assert captions == ["step 40", "step 20"]  # newest first, the step under each
        painted = page.evaluate(
            """() => { const c = document.querySelector('#trainer_loss_chart');
                       const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                       let n = 0; for (let i = 0; i < d.length; i += 4) { if (d[i] > 200 && d[i + 1] > 90 &&
                       d[i + 1] < 150 && d[i + 2] < 60) n++; } return n; }"""
        )
        assert painted > 50  # the orange loss lines are drawn
        page.wait_for_selector("#trainer_jobs_list .trainer-state-done", timeout=10_000)
        assert "zqbrowser" not in errors
        shot(page, "trainer-done", 1600)
        shot(page, "trainer-done", 700)
        # "Test it" from the job panel: the grid job is shown next, its picture in the gallery
        page.locator("#trainer_jobs_list .trainer-job-grid").first.click()
        page.wait_for_function(
            "() => (document.querySelector('#trainer_progress') || {}).textContent.includes('step 4/4')",
            timeout=60_000,
        )
        page.wait_for_selector("#trainer_previews figure img", timeout=30_000)
        grid = page.locator("#trainer_previews figure img").first
        page.wait_for_function("() => document.querySelector('#trainer_previews figure img').naturalWidth > 128")
        assert grid.evaluate("img => img.naturalHeight") > 128  # 2 rows of 64 px and the labels
        shot(page, "trainer-grid", 1600)
        # a new page knows the job from the server and shows it again
        fresh = browser.new_page(viewport={"width": 700, "height": 1100})
        fresh.goto(server.url)
        fresh.wait_for_selector("#trainer_jobs_list .trainer-state-done", timeout=60_000)
        fresh.wait_for_function(  # the newest job: the grid
            "() => (document.querySelector('#trainer_progress') || {}).textContent.includes('step 4/4')",
            timeout=30_000,
        )
        settings, run = (fresh.locator(f"#{i}").bounding_box() for i in ("trainer_settings", "trainer_run"))
        assert run["y"] >= settings["y"] + settings["height"] - 1  # narrow: the run panel stacks below
        assert not errors, errors
