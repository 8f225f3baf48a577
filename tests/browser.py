"""A real headless Chromium for the tests that look at a page the way a person does (dedup's
review page, the explorer), driven over the Chrome DevTools Protocol on a pipe
(--remote-debugging-pipe): no websocket, no port, no driver package. `from browser import
CHROMIUM, DevTools`; a test that needs it is skipped where CHROMIUM is None."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# Each key a test presses: its code and its Windows virtual key code, as a keyboard sends them.
KEYS = {
    "ArrowDown": ("ArrowDown", 40),
    "ArrowUp": ("ArrowUp", 38),
    "ArrowRight": ("ArrowRight", 39),
    "ArrowLeft": ("ArrowLeft", 37),
    "Escape": ("Escape", 27),
    **{c: (f"Key{c.upper()}", ord(c.upper())) for c in "abcdefghijklmnopqrstuvwxyz"},
}
# Nothing but this machine: every host name resolves to nothing, so a page that reaches for the
# network fails to (and the test that watches its requests sees it try).
OFFLINE = "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"


class DevTools:
    """Headless Chromium driven over the Chrome DevTools Protocol on a pipe
    (--remote-debugging-pipe: JSON messages, each ended by a NUL byte, which Chromium reads
    from its file descriptor 3 and writes to its 4). No websocket, no server, no port. Events
    that arrive while a command waits are kept in `events` (enable a domain to get them:
    `page("Network.enable")`)."""

    def __init__(
        self,
        profile: Path,
        downloads: Path | None = None,
        size: tuple[int, int] = (1200, 900),
        flags: tuple[str, ...] = ("--disable-gpu",),
        timeout: float = 60,
    ) -> None:
        commands, self._to_browser = os.pipe()
        self._from_browser, replies = os.pipe()
        # Chromium's fds 3 and 4, set by bash (dash takes one-digit fds only) from two fds
        # above 9, which no redirection can clobber; the wrapper /usr/bin/chromium keeps them.
        ends = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (commands, replies)]
        os.close(commands)
        os.close(replies)
        script = f'exec "$0" "$@" 3<&{ends[0]} 4>&{ends[1]} {ends[0]}<&- {ends[1]}>&-'
        self.process = subprocess.Popen(
            [
                "bash",
                "-c",
                script,
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                *flags,
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--remote-debugging-pipe",
                "about:blank",
            ],
            pass_fds=ends,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for fd in ends:
            os.close(fd)
        self.timeout, self._buffer, self._sent = timeout, b"", 0
        self.events: list[dict] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        if downloads is not None:
            self.call("Browser.setDownloadBehavior", behavior="allow", downloadPath=str(downloads))
        self.page(
            "Emulation.setDeviceMetricsOverride",
            width=size[0],
            height=size[1],
            deviceScaleFactor=1,
            mobile=False,
        )

    def call(self, method: str, session: str | None = None, **params: object) -> dict:
        """A command's result (events that come first are kept in `events`)."""
        self._sent += 1
        message = {"id": self._sent, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            while b"\0" not in self._buffer:
                left = deadline - time.monotonic()
                assert left > 0, f"Chromium did not answer {method} in {self.timeout} s"
                if select.select([self._from_browser], [], [], left)[0]:
                    chunk = os.read(self._from_browser, 1 << 20)
                    assert chunk, f"Chromium closed the pipe (exit {self.process.poll()})"
                    self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._sent:
                assert "error" not in reply, (method, reply["error"])
                return reply["result"]
            if "method" in reply:
                self.events.append(reply)

    def page(self, method: str, **params: object) -> dict:
        return self.call(method, self.session, **params)

    def evaluate(self, expression: str, wait: bool = False) -> object:
        """The expression's value in the page (`wait`: a promise's, once it settles)."""
        result = self.page(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=wait
        )
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def open(self, url: str, ready: str = "true", seconds: float = 30) -> None:
        """Load `url` and wait until the page is loaded and `ready` is true in it: in the new
        document (the one it replaces, marked first, may still be there when navigate returns,
        complete and ready; a reload of the same URL would pass at once)."""
        self.evaluate("window.__replaced = true")
        self.page("Page.navigate", url=url)
        condition = f"!window.__replaced && document.readyState === 'complete' && ({ready})"
        self.wait_for(condition, seconds)

    def wait_for(self, condition: str, seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        while not self.evaluate(condition):
            assert time.monotonic() < deadline, f"never true: {condition}"
            time.sleep(0.05)

    def press(self, *keys: str) -> None:
        for key in keys:
            code, virtual = KEYS[key]
            down = {"key": key, "code": code, "windowsVirtualKeyCode": virtual}
            typed = {"type": "keyDown", "text": key} if len(key) == 1 else {"type": "rawKeyDown"}
            self.page("Input.dispatchKeyEvent", **down, **typed)
            self.page("Input.dispatchKeyEvent", type="keyUp", **down)

    def move_mouse(self, x: float, y: float) -> None:
        self.page("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)

    def click(self, x: float, y: float) -> None:
        self.move_mouse(x, y)
        for kind in ("mousePressed", "mouseReleased"):
            self.page("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(
            base64.b64decode(self.page("Page.captureScreenshot", format="png")["data"])
        )
        return path

    def close(self) -> None:
        try:
            self.call("Browser.close")
        finally:
            try:
                self.process.wait(30)
            finally:
                os.close(self._to_browser)
                os.close(self._from_browser)
