"""A headless Chromium driven over the Chrome DevTools Protocol, standard library only.

Chromium's ``--remote-debugging-pipe`` reads CDP commands from file descriptor 3 and writes
replies and events to descriptor 4, each message one JSON object ended by a NUL byte. So no
websocket client (and no ``playwright``, which downloads its own browsers) is needed: two
``os.pipe()`` pairs, moved onto fds 3 and 4 by a three-line Python trampoline that then execs the
browser. ``assert_inert_html`` is the static check of a page that carries data (see its docstring).

``CHROMIUM`` is the browser found on PATH (Debian's ``chromium`` package; CI installs it).
``require_chromium()`` skips a test without it, except under ``CI=true``, where it fails.
"""
from __future__ import annotations

import base64
import fcntl
import hashlib
import html.parser
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def require_chromium() -> str:
    import pytest
    if CHROMIUM is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true but chromium is missing: apt-get install -y chromium")
        pytest.skip("chromium not installed (apt-get install -y chromium); required when CI=true")
    return CHROMIUM

_TRAMPOLINE = ("import os, sys\n"
               "a, b = int(sys.argv[1]), int(sys.argv[2])\n"
               "os.dup2(a, 3); os.dup2(b, 4); os.close(a); os.close(b)\n"
               "os.execv(sys.argv[3], sys.argv[3:])\n")


class CDPError(RuntimeError):
    pass


class Browser:
    """One headless Chromium with one page (tab). Use as a context manager.

    ``open(url)`` navigates and waits for the load event; ``eval(js)`` runs an expression in the page and
    returns its JSON value (promises are awaited); ``hover(x, y)`` moves the real mouse pointer;
    ``screenshot(path)`` writes a PNG of the viewport. ``errors`` collects uncaught exceptions and console
    errors, ``console`` every console message (CSP violations show up there)."""

    def __init__(self, width: int = 1280, height: int = 900, timeout: float = 60.0):
        self.timeout = timeout
        self._tmp = tempfile.TemporaryDirectory(prefix="cdp-")
        cmd_r, cmd_w = os.pipe()          # we write commands -> chromium reads (its fd 3)
        ev_r, ev_w = os.pipe()            # chromium writes (its fd 4) -> we read
        # move the child's ends to fds >= 10, so that putting one on fd 3 cannot clobber the other
        a = fcntl.fcntl(cmd_r, fcntl.F_DUPFD_CLOEXEC, 10)
        b = fcntl.fcntl(ev_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(cmd_r)
        os.close(ev_w)
        args = [CHROMIUM or "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-default-apps", "--disable-extensions", "--no-first-run", "--no-default-browser-check",
                "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio", "--force-color-profile=srgb",
                f"--window-size={width},{height}", f"--user-data-dir={self._tmp.name}", "about:blank"]
        # a tiny Python trampoline puts the pipe ends on fds 3 and 4 and execs the browser (dash, Debian's sh,
        # cannot redirect fds above 9)
        self.proc = subprocess.Popen([sys.executable, "-c", _TRAMPOLINE, str(a), str(b), *args],
                                     pass_fds=(a, b), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=open(Path(self._tmp.name) / "stderr.log", "wb"))
        os.close(a)
        os.close(b)
        self._w = os.fdopen(cmd_w, "wb", buffering=0)
        self._r = os.fdopen(ev_r, "rb", buffering=0)
        self._next = 0
        self._replies: dict[int, dict] = {}
        self._events: list[dict] = []
        self._cv = threading.Condition()
        self._closed = False
        self.console: list[str] = []
        self.errors: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.session = None
        try:
            targets = self.send("Target.getTargets")["targetInfos"]
            page = next(t for t in targets if t["type"] == "page")
            attached = self.send("Target.attachToTarget", {"targetId": page["targetId"], "flatten": True})
            self.session = attached["sessionId"]
            for domain in ("Page", "Runtime", "Log"):
                self.send(f"{domain}.enable", session=True)
            self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height,
                                                            "deviceScaleFactor": 1, "mobile": False}, session=True)
        except Exception:
            self.close()
            raise

    # -- protocol ------------------------------------------------------------------------------------------
    def _read(self):
        buf = b""
        while True:
            try:
                chunk = self._r.read(1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                with self._cv:
                    self._closed = True
                    self._cv.notify_all()
                return
            buf += chunk
            *msgs, buf = buf.split(b"\0")
            with self._cv:
                for raw in msgs:
                    m = json.loads(raw)
                    if "id" in m:
                        self._replies[m["id"]] = m
                    else:
                        self._on_event(m)
                        self._events.append(m)
                self._cv.notify_all()

    def _on_event(self, m: dict):
        p = m.get("params", {})
        if m["method"] == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
            self.console.append(f"{p.get('type')}: {text}")
            if p.get("type") == "error":
                self.errors.append(text)
        elif m["method"] == "Log.entryAdded":
            e = p["entry"]
            self.console.append(f"{e['level']}: {e['text']}")
            if e["level"] == "error":
                self.errors.append(e["text"])
        elif m["method"] == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            self.errors.append(d.get("exception", {}).get("description") or d.get("text", "exception"))

    def send(self, method: str, params: dict | None = None, session: bool = False, timeout: float | None = None):
        with self._cv:
            self._next += 1
            mid = self._next
        msg = {"id": mid, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        self._w.write(json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + (timeout or self.timeout)
        with self._cv:
            while mid not in self._replies:
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    raise CDPError(f"{method}: no reply ({'browser exited' if self._closed else 'timeout'})")
                self._cv.wait(left)
            reply = self._replies.pop(mid)
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def wait_event(self, method: str, since: int = 0, timeout: float | None = None) -> dict:
        deadline = time.monotonic() + (timeout or self.timeout)
        with self._cv:
            while True:
                for e in self._events[since:]:
                    if e["method"] == method:
                        return e
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    raise CDPError(f"no {method} event")
                self._cv.wait(left)

    # -- conveniences --------------------------------------------------------------------------------------
    def open(self, url: str) -> float:
        """Navigate and wait for the load event; returns the wall seconds from the command to the event."""
        with self._cv:
            mark = len(self._events)
        t0 = time.perf_counter()
        self.send("Page.navigate", {"url": url}, session=True)
        self.wait_event("Page.loadEventFired", since=mark)
        return time.perf_counter() - t0

    def eval(self, expression: str):
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True},
                      session=True)
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            raise CDPError(d.get("exception", {}).get("description") or d.get("text"))
        return r["result"].get("value")

    def hover(self, x: float, y: float):
        self.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y}, session=True)

    def click(self, x: float, y: float):
        for t in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": t, "x": x, "y": y, "button": "left", "clickCount": 1},
                      session=True)

    def center(self, js_element: str) -> tuple[float, float]:
        """Scrolls the element (a JS expression) into view; returns the centre of its first box in viewport
        pixels (an inline element that wraps has several boxes, and the centre of their bounding rectangle
        can lie on another element)."""
        x, y = self.eval(f"(() => {{ const e = {js_element}; e.scrollIntoView({{block: 'center'}}); "
                         "const r = e.getClientRects()[0]; return [r.left + r.width / 2, r.top + r.height / 2]; })()")
        return x, y

    def key(self, key: str, code: str | None = None, keycode: int = 0):
        for t in ("keyDown", "keyUp"):
            self.send("Input.dispatchKeyEvent", {"type": t, "key": key, "code": code or key,
                                                 "windowsVirtualKeyCode": keycode}, session=True)

    def screenshot(self, path: Path, full_page: bool = False):
        params = {"format": "png"}
        if full_page:
            params["captureBeyondViewport"] = True
        data = self.send("Page.captureScreenshot", params, session=True)["data"]
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(base64.b64decode(data))

    def close(self):
        try:
            if self.proc.poll() is None:
                try:
                    self.send("Browser.close", timeout=5)
                except CDPError:
                    pass
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
        finally:
            for f in (self._w, self._r):
                try:
                    f.close()
                except OSError:
                    pass
            self._tmp.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -- static checks of a page -------------------------------------------------------------------------------

class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags, self.attrs, self.scripts, self._in_script = [], [], [], None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [(tag, k, v or "") for k, v in attrs]
        if tag == "script":
            self._in_script = [dict(attrs), ""]
            self.scripts.append(self._in_script)

    def handle_data(self, data):
        if self._in_script is not None:
            self._in_script[1] += data

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = None


def csp_of(page: str) -> str:
    p = _Page()
    p.feed(page)
    found = [v for tag, k, v in p.attrs if tag == "meta" and k == "content"
             and any(t == "meta" and a == "http-equiv" and val.lower() == "content-security-policy"
                     for t, a, val in p.attrs)]
    return found[0] if found else ""


def assert_inert_html(page: str) -> None:
    """Data on the page is inert: no elements that load or run anything, no event-handler or injected
    attributes, no remote URLs; the only scripts are the explorer's two: one ``application/json`` data
    block (never run) and one inline script whose sha256 the Content-Security-Policy names (and the CSP
    allows no other script: no 'unsafe-inline', no host, no nonce). Works on the page as written and on a
    DOM dumped by the browser after load."""
    p = _Page()
    p.feed(page)
    assert not {"img", "iframe", "object", "embed", "link", "base", "form", "svg", "math"} & set(p.tags), p.tags
    bad = [a for a in p.attrs if a[1].startswith("on") or a[1] in ("data-pwned", "srcdoc")]
    assert not bad, bad
    for tag, k, v in p.attrs:
        if k in ("src", "href", "action", "srcset", "poster", "data", "formaction"):
            assert not re.search(r"^\s*(https?:|//|javascript:|data:)", v, re.I), (tag, k, v)
        assert "url(" not in v.replace(" ", "").lower(), (tag, k, v)
    data = [s for s in p.scripts if s[0].get("type") == "application/json"]
    code = [s for s in p.scripts if s[0].get("type") != "application/json"]
    assert len(data) <= 1 and len(code) <= 1, [s[0] for s in p.scripts]
    assert all(set(s[0]) <= {"type", "id"} for s in data), [s[0] for s in data]
    if code:
        attrs, body = code[0]
        assert not attrs, attrs                             # no src, no type, no nonce
        csp = {d.split()[0]: d.split()[1:] for d in csp_of(page).split(";") if d.strip()}
        digest = "'sha256-" + base64.b64encode(hashlib.sha256(body.encode("utf-8")).digest()).decode() + "'"
        assert csp.get("script-src") == [digest], (csp.get("script-src"), digest)
        assert csp.get("default-src") == ["'none'"], csp
