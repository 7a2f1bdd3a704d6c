"""Make the pictures in docs/img/: the dashboard (overview and a group) and ``masstasker watch``.

    pip install -e '.[test]' pyte && python scripts/screenshots.py [--out docs/img] [--seconds 40]

Starts a server with the dashboard on 127.0.0.1, fills a few groups, and runs workers that drain them
at different speeds (one group's work fails into an error group), so that rates, ETAs and the
last-hour charts have something to show. Then Chromium (Debian's, by its path) photographs the
dashboard, and ``masstasker watch`` runs in a pseudo-terminal whose screen pyte (a terminal
emulator) reconstructs; that screen is drawn as HTML and photographed by the same browser.
"""

from __future__ import annotations

import argparse
import html
import os
import pty
import random
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyte
from playwright.sync_api import sync_playwright

from masstasker import Client, SavedError, delete_or_move, new_task
from masstasker._pb import masstasker_pb2 as pb
from masstasker.testing import run_server

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
COLUMNS, LINES = 120, 6


def fill(client: Client) -> None:
    """A small job: images to resize, e-mails to send, reports scheduled for later, a few failures."""
    rng = random.Random(7)
    for group, count in (("resize-images", 30000), ("send-emails", 6000), ("index-documents", 900)):
        for start in range(0, count, 500):
            client.create(
                *(
                    new_task(
                        group,
                        pb.Test(foo=f"{group}/{i}"),
                        labels={"batch": str(i // 1000), "tenant": rng.choice("abc")},
                    )
                    for i in range(start, min(count, start + 500))
                )
            )
    later = pb.Task(group="monthly-reports")
    later.not_before.FromSeconds(int(time.time()) + 6 * 3600)
    client.create(*(pb.Task(group="monthly-reports", not_before=later.not_before) for _ in range(40)))


def worker(target: str, group: str, pause: float, fail_every: int, stop: threading.Event) -> None:
    """Own a task, 'work' for ``pause``, commit it; every ``fail_every``-th fails into ``<group>-errors``."""
    with Client(target) as client:
        done = 0
        while not stop.is_set():
            tasks = client.query_many(group, 5, 30, wait=False)
            if not tasks:
                return
            time.sleep(pause)
            for task in tasks:
                done += 1
                failed = fail_every and done % fail_every == 0
                error = SavedError(f"decode failed: truncated JPEG at byte {done * 37}") if failed else None
                client.do(delete_or_move(f"{group}-errors", task)(error))


def watch_screen(target: str, seconds: float) -> pyte.Screen:
    """Run ``masstasker watch`` in a pseudo-terminal for ``seconds`` and return its screen, emulated."""
    screen = pyte.Screen(COLUMNS, LINES)
    stream = pyte.ByteStream(screen)
    primary, secondary = pty.openpty()
    env = {
        **os.environ,
        "TERM": "xterm-256color",
        "COLUMNS": str(COLUMNS),
        "LINES": str(LINES),
        "MASSTASKER_TARGET": target,
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "masstasker.cli", "watch", "resize-images", "send-emails", "index-documents"],
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        env=env,
        close_fds=True,
    )
    os.close(secondary)
    # Keep reading until the command has drawn a few frames (it may take a while to start on a busy
    # machine), then ``seconds`` more; a minute at most.
    deadline = time.monotonic() + 60
    frames, end = 0, None
    try:
        while process.poll() is None and time.monotonic() < (end or deadline):
            ready, _, _ = select.select([primary], [], [], 0.2)
            if ready:
                chunk = os.read(primary, 65536)
                stream.feed(chunk)
                frames += chunk.count(b"ETA")
                if end is None and frames >= 3:
                    end = time.monotonic() + seconds
    finally:
        process.terminate()
        process.wait(10)
        os.close(primary)
    return screen


# pyte's names for the 16 basic colours; 256-colour and true colours come as hex.
_COLOURS = {
    "black": "#1e293b",
    "red": "#f87171",
    "green": "#4ade80",
    "brown": "#facc15",
    "yellow": "#facc15",
    "blue": "#60a5fa",
    "magenta": "#e879f9",
    "cyan": "#22d3ee",
    "white": "#e2e8f0",
}


def screen_html(screen: pyte.Screen) -> str:
    """The emulated screen as HTML spans with each character's foreground colour."""
    rows = []
    for y in range(screen.lines):
        line = screen.buffer[y]
        spans, text, colour = [], "", None
        for x in range(screen.columns):
            char = line[x]
            fg = _COLOURS.get(char.fg) or (f"#{char.fg}" if len(char.fg) == 6 else "")
            if fg != colour and text:
                spans.append((colour, text))
                text = ""
            colour = fg
            text += char.data
        spans.append((colour, text))
        rows.append(
            "".join(
                f"<span style='color:{c}'>{html.escape(t)}</span>" if c else html.escape(t) for c, t in spans
            ).rstrip()
        )
    return "\n".join(rows).rstrip()


def terminal_html(screen: pyte.Screen) -> str:
    prompt = html.escape("$ masstasker watch resize-images send-emails index-documents")
    body = prompt + "\n" + screen_html(screen)
    return (
        "<!doctype html><meta charset=utf-8><body style='margin:0;background:#0f172a'>"
        "<pre style='margin:0;padding:16px 20px;color:#e2e8f0;font:14px/1.35 DejaVu Sans Mono,monospace'>"
        f"{body}</pre>"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/img", type=Path)
    parser.add_argument("--seconds", default=30.0, type=float, help="how long the workers run before the pictures")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    with run_server(listen_http="127.0.0.1:0", dashboard="read-write") as server, Client(server.target) as client:
        assert server.server is not None
        base = f"http://127.0.0.1:{server.server.http_port}"
        fill(client)
        workers = [
            threading.Thread(target=worker, args=(server.target, group, pause, fail, stop), daemon=True)
            for group, pause, fail, count in (
                ("resize-images", 0.05, 97, 4),
                ("send-emails", 0.08, 0, 2),
                ("index-documents", 0.4, 13, 1),
            )
            for _ in range(count)
        ]
        for thread in workers:
            thread.start()
        time.sleep(args.seconds)
        screen = watch_screen(server.target, 4.0)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 720})
            page.goto(base + "/")
            page.wait_for_selector("#live.on")
            page.wait_for_timeout(1500)  # let the sparklines' history arrive
            page.screenshot(path=str(args.out / "dashboard.png"))
            page.goto(base + "/group?name=resize-images")
            page.wait_for_selector("#live.on")
            page.wait_for_timeout(1000)
            page.screenshot(path=str(args.out / "dashboard-group.png"))
            page.set_viewport_size({"width": 1000, "height": 130})
            page.goto("about:blank")  # out of the dashboard's origin: its CSP forbids inline styles
            page.set_content(terminal_html(screen))
            page.screenshot(path=str(args.out / "watch.png"), full_page=True)
            browser.close()
        stop.set()
        for thread in workers:
            thread.join(30)
    for name in ("dashboard.png", "dashboard-group.png", "watch.png"):
        print(args.out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
