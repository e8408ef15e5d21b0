"""A minimal headless-Chromium driver for tests: the Chrome DevTools Protocol over ``--remote-debugging-pipe``.

Chromium reads protocol messages (JSON, each ended by a NUL byte) from its file descriptor 3 and writes
replies and events to 4. Only the standard library is used: the browser is started with
`os.posix_spawnp`, whose file actions put our two pipe ends on 3 and 4 (no fork-time Python code), and
nothing is downloaded; the browser is the system's ``chromium`` (Debian's package, `make install` adds it).

    with HeadlessChromium() as browser:
        value = browser.evaluate_page("file:///tmp/report.html", "document.title")
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["BROWSERS", "HeadlessChromium", "find_chromium"]

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
"""Executable names looked for on PATH, in order."""


def find_chromium() -> str:
    """The path of a Chromium on PATH; RuntimeError saying how to install one otherwise."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    raise RuntimeError(f"no Chromium on PATH (looked for {', '.join(BROWSERS)}); run `make install`, which "
                       "installs Debian's chromium package, or `apt-get install --no-install-recommends chromium`")


class HeadlessChromium:
    """One headless Chromium process with a fresh profile, driven over the DevTools pipe.

    ``timeout``: seconds any single step (start, navigation, one evaluation) may take before RuntimeError.
    """

    def __init__(self, binary: str | None = None, timeout: float = 60.0) -> None:
        self.binary = binary or find_chromium()
        self.timeout = timeout
        self._next_id = 0
        self._buffer = b""
        self._events: list[dict[str, Any]] = []
        self._pid: int | None = None

    # ---------------------------------------------------------------- process
    def __enter__(self) -> HeadlessChromium:
        self._profile = tempfile.TemporaryDirectory(prefix="mm-llama-chromium-")
        self._log = Path(self._profile.name) / "chromium.log"
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # copies above 9, so that the dup2s onto 3 and 4 below cannot overwrite each other's source
        src_r = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD_CLOEXEC, 10)
        src_w = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD_CLOEXEC, 10)
        args = [self.binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--no-default-browser-check", "--mute-audio", "--remote-debugging-pipe",
                f"--user-data-dir={self._profile.name}/profile", "about:blank"]
        try:
            self._pid = os.posix_spawnp(self.binary, args, os.environ, file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_OPEN, 1, str(self._log), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644),
                (os.POSIX_SPAWN_DUP2, 1, 2),
                (os.POSIX_SPAWN_DUP2, src_r, 3),
                (os.POSIX_SPAWN_DUP2, src_w, 4),
            ], setpgroup=0)  # its own process group: closing kills its helper processes too
        finally:
            for fd in (to_browser_r, from_browser_w, src_r, src_w):
                os.close(fd)
        try:
            self.send("Browser.getVersion")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Ask the browser to close, then end its process group if it has not within 10 s."""
        if self._pid is None:
            return
        pid, self._pid = self._pid, None
        try:
            self._write({"id": -1, "method": "Browser.close"})
        except OSError:
            pass
        deadline = time.monotonic() + 10
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.killpg(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                break
            time.sleep(0.05)
        try:  # helper processes (zygote, renderers) that outlived the browser
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.close(self._to_browser)
        os.close(self._from_browser)
        self._profile.cleanup()

    def _log_tail(self) -> str:
        try:
            return self._log.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    # ---------------------------------------------------------------- protocol
    def _write(self, message: dict[str, Any]) -> None:
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self._to_browser, data):]

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise RuntimeError(f"Chromium did not answer within {self.timeout} s; its log:\n{self._log_tail()}")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium closed the DevTools pipe (did it crash?); its log:\n{self._log_tail()}")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        """Send one command and return its ``result``; events read meanwhile are kept for `wait_event`."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self._write(message)
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method} failed: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self._events.append(reply)

    def wait_event(self, method: str, session: str | None = None) -> dict[str, Any]:
        """The params of the first event ``method`` (of ``session``) not yet taken, waiting for it."""
        deadline = time.monotonic() + self.timeout
        while True:
            for k, event in enumerate(self._events):
                if event["method"] == method and event.get("sessionId") == session:
                    return self._events.pop(k).get("params", {})
            message = self._read(deadline)
            if "method" in message:
                self._events.append(message)

    # ---------------------------------------------------------------- pages
    def evaluate_page(self, url: str, expression: str) -> Any:
        """Open ``url`` in a new tab, wait for its load event, evaluate ``expression`` there (a promise is
        awaited) and return its value as JSON; RuntimeError if the expression throws. The tab is closed."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        try:
            session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            self.send("Page.enable", session=session)
            navigation = self.send("Page.navigate", {"url": url}, session=session)
            if navigation.get("errorText"):
                raise RuntimeError(f"cannot open {url}: {navigation['errorText']}")
            self.wait_event("Page.loadEventFired", session)
            reply = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                   "returnByValue": True}, session=session)
            if "exceptionDetails" in reply:
                raise RuntimeError(f"the page script failed: {reply['exceptionDetails']}")
            return reply["result"].get("value")
        finally:
            self.send("Target.closeTarget", {"targetId": target})
