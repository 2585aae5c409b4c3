"""Headless Chromium for the html report's tests and for docs/make_screenshot.py: load a local page once,
and get back its DOM after load, a screenshot and the URLs the page itself asked the network for.

One browser run does all three (`--dump-dom` with `--screenshot`, and `--log-net-log`). Chromium's own
background traffic (update checks, account probes) is marked in the net log with the initiator
"not an origin"; a request the page makes carries the page's origin ("null" for a file:// page). Only
the latter count as the page's network requests.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = (
    "--headless",
    "--no-sandbox",  # tests run as root in CI containers
    "--disable-gpu",
    "--hide-scrollbars",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--disable-features=Translate,OptimizationHints,MediaRouter,SpellCheck",
)


def find_chromium() -> str | None:
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class Loaded:
    dom: str  # the serialised DOM after load
    screenshot: Path
    page_requests: list[str]  # URLs the page asked for (never data: or the page itself)


def page_requests(net_log: Path, page_url: str) -> list[str]:
    """URLs in the net log whose request was initiated by the page (not by the browser itself)."""
    doc = json.loads(net_log.read_text(encoding="utf-8", errors="replace"))
    out = []
    for event in doc.get("events", []):
        params = event.get("params") or {}
        url, initiator = params.get("url"), params.get("initiator")
        if not isinstance(url, str) or initiator in (None, "not an origin"):
            continue
        if url == page_url or url.startswith("data:"):
            continue
        out.append(url)
    return sorted(set(out))


def load(chromium: str, page: Path, out_dir: Path, width: int = 1280, height: int = 2400, timeout: float = 120.0) -> Loaded:
    """Open `page` once in headless Chromium (a fresh profile in out_dir)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shot, net = out_dir / "screenshot.png", out_dir / "netlog.json"
    url = page.resolve().as_uri()
    cmd = [
        chromium, *FLAGS, f"--user-data-dir={out_dir / 'profile'}", f"--window-size={width},{height}",
        f"--screenshot={shot}", f"--log-net-log={net}", "--dump-dom", url,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0 or not shot.is_file():
        raise RuntimeError(f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return Loaded(dom=proc.stdout, screenshot=shot, page_requests=page_requests(net, url))
