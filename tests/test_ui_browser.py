"""The status page in a real headless Chromium (Debian's package, over the DevTools
protocol), against dockyard on real Podman: log in, watch a deploy appear and turn PROMOTED
without a reload, see hostile text shown as text, open an evaluation. Screenshots go to
``artifacts/`` (kept by CI)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.browser import Browser, chromium_binary
from tests.conftest import ON_CI, ROOT, TEST_TOKEN
from tests.test_evaluation import AUTH
from tests.test_observability_e2e import FINAL, HEALTH, TASKS, TIMEOUTS, Live, live

__all__ = ["live"]  # the module-scoped live dockyard (real Podman, git daemon)

pytestmark = [pytest.mark.podman, pytest.mark.slow]

ARTIFACTS = ROOT / "artifacts"
#: A build that prints markup and fails: its log is shown under the failed slot.
HOSTILE_DOCKERFILE = """\
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "sh", "-c", "echo '__MARKUP__'; exit 3"]
""".replace("__MARKUP__", "<script>window.__pwned=1</script><img src=x onerror=window.__pwned=2>")
HOSTILE_URL = "http://127.0.0.1:9/<img src=x onerror=window.__pwned=3>.git"


def chromium_required() -> None:
    if chromium_binary() is None:
        if ON_CI:
            pytest.fail("chromium is not installed (contrib/ci/setup-browser.sh; CI=true)")
        pytest.skip("chromium is not installed (run contrib/ci/setup-browser.sh)")


def q(selector: str) -> str:
    return f"document.querySelector({json.dumps(selector)})"


async def api(method: str, url: str, **kw: Any) -> Any:
    async with aiohttp.ClientSession(headers=AUTH) as http, http.request(method, url, **kw) as r:
        body = await r.json()
        assert r.status < 400, body
        return body


async def test_the_status_page_follows_a_deploy_and_shows_hostile_text_as_text(
    live: Live, tmp_path: Path
) -> None:
    chromium_required()
    hostile = live.repos.new("ui-hostile")
    hostile.write("busybox", Path("/bin/busybox").read_bytes(), mode=0o755)
    hostile.write("Dockerfile", HOSTILE_DOCKERFILE)
    hostile.commit("<b>bold</b> commit message")
    async with Browser.launch(tmp_path) as browser:
        # Not logged in: the page sends us to the form; a bad token is refused.
        await browser.goto(f"{live.url}/ui/")
        await browser.wait_for("document.body.dataset.page === 'login'")
        await browser.eval(f"{q('#token')}.value = 'dy_00000000_nope'; {q('#login-form')}.submit()")
        await browser.wait_for(q("#login-error"))
        await browser.eval(f"{q('#token')}.value = {json.dumps(TEST_TOKEN)};"
                           f"{q('#login-form')}.submit()")  # fmt: skip
        await browser.wait_for("document.body.dataset.page === 'index'")
        cookies = [c for c in await browser.cookies() if c["name"] == "dockyard_ui"]
        assert len(cookies) == 1, cookies
        assert cookies[0]["httpOnly"] is True and cookies[0]["sameSite"] == "Strict"
        assert cookies[0]["path"] == "/ui" and TEST_TOKEN not in cookies[0]["value"]
        assert await browser.eval("document.cookie") == ""  # HttpOnly: not readable
        await browser.wait_for(f"{q('#live')}.textContent === 'live'")
        await browser.eval("window.__sameDocument = 'yes'")

        # A deploy appears and turns PROMOTED with no reload.
        spec = {"id": "ui-app", "repo": live.repo("obs-agent"), "ref": "main", "health": HEALTH}
        await api("POST", f"{live.url}/v1/repos", json=spec)
        await browser.wait_for(q('[data-deployment="ui-app"]'), 30)
        await browser.wait_for(
            q('[data-deployment="ui-app"] tr[data-color="blue"][data-state="PROMOTED"]'), 120
        )
        assert await browser.eval("window.__sameDocument") == "yes"
        timeline = await browser.eval(f"{q('#timeline')}.innerText")
        assert "ui-app" in timeline and "HEALTHY → PROMOTED" in timeline, timeline
        link = q('[data-deployment="ui-app"] a.url')
        url = await browser.eval(f"{link}.textContent")
        assert url.startswith("http://127.0.0.1:")

        # Hostile text: a failing build that prints markup, an evaluation of a "repository"
        # whose URL is markup. Both are shown, as text; nothing runs.
        hostile_spec = {"id": "ui-hostile", "repo": f"{live.git.url}/ui-hostile.git", "ref": "main"}
        await api("POST", f"{live.url}/v1/repos", json=hostile_spec)
        await api(
            "POST",
            f"{live.url}/v1/integration/evaluate-miner",
            json={"miner": {"github_url": HOSTILE_URL}, "tasks": TASKS},
        )
        log_block = q('[data-deployment="ui-hostile"] pre.log')
        log = await browser.wait_for(f"{log_block}?.textContent", 120)
        assert "<script>window.__pwned=1</script>" in log, log
        repos = await browser.wait_for(
            "[...document.querySelectorAll('#evaluations td.repo')].map(e => e.textContent)"
            ".find(t => t.includes('<img'))",
            30,
        )
        assert repos == HOSTILE_URL
        assert await browser.eval("document.querySelectorAll('main script, main img').length") == 0
        assert await browser.eval("typeof window.__pwned") == "undefined"

        # An evaluation: its row updates live; its page shows per-task outcomes.
        evaluation = await api(
            "POST",
            f"{live.url}/v1/integration/evaluate-miner",
            json={
                "miner": {"github_url": live.repo("obs-agent"), "ref": "main"},
                "tasks": TASKS,
                "timeouts": TIMEOUTS,
            },
        )
        row = f'tr.evaluation[data-evaluation="{evaluation["id"]}"]'
        await browser.wait_for(q(row), 30)
        await browser.wait_for(f"{q(row)}?.dataset.state === 'finished'", 120)
        await browser.wait_for(q(".chart .bar.deploy"), 10)
        assert await browser.eval("window.__sameDocument") == "yes"
        ARTIFACTS.mkdir(exist_ok=True)
        await browser.screenshot(ARTIFACTS / "ui-status.png")

        await browser.eval(f"{q(row + ' a')}.click()")
        await browser.wait_for("document.body.dataset.page === 'evaluation'")
        state = await browser.wait_for(f"{q('#evaluation-state')}?.textContent")
        assert state in FINAL and state == "finished"
        outcomes = await browser.eval(
            "[...document.querySelectorAll('tr.task')].map(r => r.dataset.outcome)"
        )
        assert outcomes == ["ok"] * len(TASKS)
        await browser.screenshot(ARTIFACTS / "ui-evaluation.png")
        assert not [line for line in browser.console if "exception" in line], browser.console

    for deployment in ("ui-app", "ui-hostile"):
        await api("DELETE", f"{live.url}/v1/repos/{deployment}")
    await asyncio.sleep(0)
