"""The web dashboard in a real browser: Playwright driving Debian's Chromium against a real server.

Chromium comes from ``apt-get install chromium`` (``.ci/run`` installs it); it is launched by its path,
never downloaded. Screenshots of each test's final page are saved under the test's tmp dir and their
paths printed (``pytest -s`` shows them).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from masstasker import Client, new_task
from masstasker._pb import masstasker_pb2 as pb
from masstasker.server import BackgroundServer
from masstasker.testing import run_server

playwright_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = os.environ.get("MASSTASKER_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
HOSTILE = "<img src=x onerror=alert(1)>"
SCRIPT = "<script>alert(2)</script>"
# A browser, a server and several subprocesses per test: generous on a loaded machine.
pytestmark = pytest.mark.timeout(240)

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"
)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install chromium (.ci/run does)")
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class Page:
    """A browser page that records every dialog (none should open by itself) and saves a screenshot."""

    def __init__(self, browser: Any, base: str, artifacts: Path, name: str) -> None:
        self.page = browser.new_page(viewport={"width": 1280, "height": 800})
        self.page.set_default_timeout(10_000)
        self.base = base
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.page.on("dialog", lambda dialog: (self.dialogs.append(dialog.message), dialog.dismiss()))
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.artifacts = artifacts
        self.name = name

    def goto(self, path: str) -> Any:
        self.page.goto(self.base + path)
        return self.page

    def screenshot(self, suffix: str = "") -> Path:
        path = self.artifacts / f"{self.name}{suffix}.png"
        self.page.screenshot(path=str(path), full_page=True)
        print(f"screenshot: {path}")
        return path


@pytest.fixture
def open_page(
    browser: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[[BackgroundServer], Page]]:
    pages: list[Page] = []

    def make(server: BackgroundServer) -> Page:
        assert server.server is not None and server.server.http_port is not None
        name = f"{request.node.name}-{len(pages) + 1}"
        page = Page(browser, f"http://127.0.0.1:{server.server.http_port}", tmp_path, name)
        pages.append(page)
        return page

    yield make
    for page in pages:
        page.screenshot()
        assert page.errors == [], page.errors  # no script error on any page
        page.page.close()


@pytest.fixture
def server(make_server: Callable[..., BackgroundServer]) -> BackgroundServer:
    return make_server(listen_http="127.0.0.1:0", dashboard="read-write")


@pytest.fixture
def client(server: BackgroundServer) -> Iterator[Client]:
    with Client(server.target) as c:
        yield c


def _cell(page: Any, group: str, column: str) -> Any:
    return page.locator(f'tr[data-group="{group}"] td[data-col="{column}"]')


def test_overview_shows_groups_and_their_counts(server: BackgroundServer, client: Client, open_page: Any) -> None:
    client.create(*(new_task("alpha", pb.Test(foo=str(i))) for i in range(3)))
    client.create(*(new_task("beta") for _ in range(2)))
    client.query("beta", 120)  # one leased
    client.create(pb.Task(group="beta", error="it broke"))

    page = open_page(server).goto("/")
    expect = playwright_api.expect
    expect(_cell(page, "alpha", "total")).to_have_text("3")
    expect(_cell(page, "beta", "total")).to_have_text("3")
    expect(_cell(page, "beta", "leased")).to_have_text("1")
    expect(_cell(page, "beta", "visible")).to_have_text("2")
    expect(_cell(page, "beta", "errors")).to_have_text("1")
    expect(page.locator('tr[data-group="alpha"] a')).to_have_attribute("href", "/group?name=alpha")

    # Each view has its own URL, reached by an ordinary link.
    page.locator('tr[data-group="alpha"] a').click()
    page.wait_for_url("**/group?name=alpha")
    expect(page.locator("#tasks tr")).to_have_count(3)
    page.locator("#tasks tr a").first.click()
    page.wait_for_url("**/task?id=*")
    expect(page.locator("#payload")).to_contain_text('"foo": "0"')


def test_new_tasks_show_on_the_open_page_within_two_seconds(
    server: BackgroundServer, client: Client, open_page: Any
) -> None:
    client.create(*(new_task("live") for _ in range(2)))
    page = open_page(server).goto("/")
    expect = playwright_api.expect
    expect(_cell(page, "live", "total")).to_have_text("2")
    page.evaluate("window.__notReloaded = true")

    client.create(*(new_task("live") for _ in range(5)))
    expect(_cell(page, "live", "total")).to_have_text("7", timeout=2000)
    client.create(new_task("brand-new"))
    expect(_cell(page, "brand-new", "total")).to_have_text("1", timeout=2000)
    assert page.evaluate("window.__notReloaded") is True  # updated in place, not reloaded

    group_page = open_page(server).goto("/group?name=live")
    expect(group_page.locator('[data-k="total"]')).to_have_text("7")
    client.create(new_task("live"))
    expect(group_page.locator('[data-k="total"]')).to_have_text("8", timeout=2000)
    # The task list follows the counts (a fetch after the change is seen): no 2 s promise for it.
    expect(group_page.locator("#tasks tr")).to_have_count(8, timeout=10_000)


def test_retry_button_moves_an_error_task_back(server: BackgroundServer, client: Client, open_page: Any) -> None:
    failed = pb.Task(group="errors", error="out of memory", labels={"job": "7"})
    failed.data.Pack(pb.Test(foo="payload"))
    client.create(failed)
    page = open_page(server).goto(f"/task?id={failed.id}")
    expect = playwright_api.expect
    expect(page.locator("#task-error")).to_have_text("out of memory")

    page.get_by_role("button", name="Retry…").click()
    page.locator("#confirm-target").fill("work")
    page.locator("#confirm-ok").click()
    page.wait_for_url("**/group?name=errors")
    expect(page.locator('[data-k="total"]')).to_have_text("0")

    (back,) = client.peek_many("work", 10, wait=False)
    assert back.error == "" and dict(back.labels) == {"job": "7"} and back.data == failed.data
    assert client.peek_many("errors", 10, wait=False) == []


def test_group_actions_ask_for_confirmation(server: BackgroundServer, client: Client, open_page: Any) -> None:
    client.create(*(pb.Task(group="bad", error="e") for _ in range(3)))
    page = open_page(server).goto("/group?name=bad")
    expect = playwright_api.expect
    expect(page.locator("#tasks tr")).to_have_count(3)
    page.get_by_role("button", name="Delete all").click()
    page.locator("#confirm-cancel").click()  # cancelled: nothing happens
    page.get_by_role("button", name="Retry all into…").click()
    page.locator("#confirm-target").fill("good")
    page.locator("#confirm-ok").click()
    expect(page.locator("#flash")).to_have_text("Retried 3 task(s).")
    assert len(client.peek_many("good", 10, wait=False)) == 3


@pytest.fixture
def token_server(tmp_path: Path, make_server: Callable[..., BackgroundServer]) -> BackgroundServer:
    (tmp_path / "tokens").write_text("dash-token\n")
    return make_server(listen_http="127.0.0.1:0", dashboard="read-write", auth_token_file=str(tmp_path / "tokens"))


def test_with_tokens_actions_are_refused_without_the_token(token_server: BackgroundServer, open_page: Any) -> None:
    with Client(token_server.target, token="dash-token") as client:
        victim = new_task("keep")
        client.create(victim)
        page = open_page(token_server).goto(f"/task?id={victim.id}")
        expect = playwright_api.expect
        page.get_by_role("button", name="Delete").click()
        page.locator("#confirm-ok").click()
        expect(page.locator("#flash")).to_contain_text("Refused")
        assert len(client.peek_many("keep", 10, wait=False)) == 1

        page.locator("#token").fill("wrong")
        page.get_by_role("button", name="Use").click()
        page.get_by_role("button", name="Delete").click()
        page.locator("#confirm-ok").click()
        expect(page.locator("#flash")).to_contain_text("not accepted")
        assert len(client.peek_many("keep", 10, wait=False)) == 1

        page.locator("#token").fill("dash-token")
        page.get_by_role("button", name="Use").click()
        page.get_by_role("button", name="Delete").click()
        page.locator("#confirm-ok").click()
        page.wait_for_url("**/group?name=keep")
        assert client.peek_many("keep", 10, wait=False) == []


def _post(server: BackgroundServer, path: str, body: dict[str, Any], **headers: str) -> tuple[int, dict[str, Any]]:
    assert server.server is not None
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.server.http_port}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **headers},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_read_only_dashboard_refuses_actions(make_server: Callable[..., BackgroundServer]) -> None:
    server = make_server(listen_http="127.0.0.1:0")
    with Client(server.target) as client:
        task = new_task("ro")
        client.create(task)
        status, body = _post(server, "/api/delete", {"ids": [task.id]})
        assert status == 403 and "read-only" in body["error"]
        assert len(client.peek_many("ro", 10, wait=False)) == 1


def test_actions_need_json_and_the_bearer_header(token_server: BackgroundServer) -> None:
    with Client(token_server.target, token="dash-token") as client:
        task = new_task("hdr")
        client.create(task)
        assert _post(token_server, "/api/delete", {"ids": [task.id]})[0] == 401
        assert _post(token_server, "/api/delete", {"ids": [task.id]}, Authorization="Bearer nope")[0] == 401
        assert _post(token_server, "/api/delete", {"ids": [task.id]}, **{"Content-Type": "text/plain"})[0] == 415
        status, body = _post(token_server, "/api/delete", {"ids": [task.id]}, Authorization="Bearer dash-token")
        assert (status, body) == (200, {"deleted": 1})


def test_off_leaves_only_metrics() -> None:
    with run_server(listen_http="127.0.0.1:0", dashboard="off") as server:
        assert server.server is not None
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server.http_port}/", timeout=10) as response:
            assert b"masstasker" in response.read().lower()  # Prometheus text, as before
            assert response.headers["Content-Type"].startswith("text/plain")


def test_html_and_script_in_task_strings_render_as_text(
    server: BackgroundServer, client: Client, open_page: Any
) -> None:
    task = pb.Task(group=HOSTILE, error=HOSTILE + SCRIPT, labels={SCRIPT: HOSTILE})
    client.create(task)
    expect = playwright_api.expect
    for path in ("/", f"/group?name={urllib.request.quote(HOSTILE)}", f"/task?id={task.id}"):
        page_wrapper = open_page(server)
        page = page_wrapper.goto(path)
        if path == "/":
            expect(page.locator("#groups a")).to_have_text(HOSTILE)
        elif path.startswith("/group"):
            expect(page.locator("h1")).to_have_text(HOSTILE)
            expect(page.locator("#tasks td.err")).to_have_text(HOSTILE + SCRIPT)
            expect(page.locator("#tasks .label")).to_have_text(f"{SCRIPT}={HOSTILE}")
        else:
            expect(page.locator("#task-error")).to_have_text(HOSTILE + SCRIPT)
            expect(page.locator("dl .label")).to_have_text(f"{SCRIPT}={HOSTILE}")
        assert page.locator("img").count() == 0  # nothing injected
        assert page.evaluate("document.scripts.length") == 1  # only dashboard.js
        page.wait_for_timeout(300)  # time for an injected onerror handler to fire, were there one
        assert page_wrapper.dialogs == []


def _get(server: BackgroundServer, path: str, **headers: str) -> int:
    assert server.server is not None
    request = urllib.request.Request(f"http://127.0.0.1:{server.server.http_port}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def test_metrics_auth_covers_the_dashboards_data_but_not_its_shell(tmp_path: Path) -> None:
    (tmp_path / "tokens").write_text("read-token\n")
    settings = {"auth_token_file": str(tmp_path / "tokens"), "metrics_auth": True}
    with run_server(listen_http="127.0.0.1:0", **settings) as server:
        assert _get(server, "/") == 200  # the shell holds no data
        assert _get(server, "/api/info") == 200  # tells the page to ask for a token
        for path in ("/api/groups", "/api/group?name=g", "/api/tasks?group=g", "/api/events", "/metrics"):
            assert _get(server, path) == 401, path
            assert _get(server, path, Authorization="Bearer wrong") == 401, path
        assert _get(server, "/api/groups", Authorization="Bearer read-token") == 200


def _get_json(server: BackgroundServer, path: str) -> Any:
    assert server.server is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{server.server.http_port}{path}", timeout=10) as response:
        return json.loads(response.read())


def test_group_page_data_is_paged_in_queue_order_and_filtered(server: BackgroundServer, client: Client) -> None:
    tasks = [new_task("paged", labels={"parity": str(i % 2), "n": str(i)}) for i in range(7)]
    client.create(*tasks)
    leased = client.query("paged", 60)  # the head moves to the back, leased

    seen, token = [], ""
    for _ in range(10):
        page = _get_json(server, f"/api/tasks?group=paged&page_size=3&page_token={urllib.request.quote(token)}")
        seen += [t["id"] for t in page["tasks"]]
        token = page["next_page_token"]
        if not token:
            break
    assert seen == [t.id for t in tasks[1:]] + [leased.id]

    odd = _get_json(server, "/api/tasks?group=paged&labels=" + urllib.request.quote("parity=1\n n=3"))
    assert [t["id"] for t in odd["tasks"]] == [tasks[3].id]
    only_leased = _get_json(server, "/api/tasks?group=paged&state=leased")
    assert [(t["id"], t["state"]) for t in only_leased["tasks"]] == [(leased.id, "leased")]
    stats = _get_json(server, "/api/group?name=paged")["group"]
    assert (stats["total"], stats["leased"], stats["visible"]) == (7, 1, 6)


@pytest.mark.timeout(300)
def test_the_wheel_ships_the_dashboard_and_the_command(tmp_path: Path) -> None:
    import importlib.util
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parent.parent
    # Without build isolation when setuptools is here already: no download needed.
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(tmp_path), str(root)]
    subprocess.run(command, check=True, capture_output=True, timeout=280)
    (wheel,) = tmp_path.glob("masstasker-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    for name in ("index.html", "dashboard.js", "dashboard.css"):
        assert f"masstasker/server/dashboard/static/{name}" in names
    assert "masstasker/cli/main.py" in names
    assert "masstasker = masstasker.cli.main:entry_point" in entry_points
