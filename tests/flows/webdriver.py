"""A minimal W3C WebDriver client (chromedriver over HTTP, stdlib only) for the UI test."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C key of an element reference


class WebDriverError(RuntimeError):
    pass


class Chrome:
    """Headless Chromium driven through a chromedriver process on 127.0.0.1."""

    def __init__(self, port: int, chromium: str = "/usr/bin/chromium", chromedriver: str = "/usr/bin/chromedriver", log=None):
        self.base = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([chromedriver, f"--port={port}"], stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                self._call("GET", "/status")
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        caps = {"browserName": "chrome", "goog:chromeOptions": {
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"],
        }}
        self.session = self._call("POST", "/session", {"capabilities": {"alwaysMatch": caps}})["sessionId"]

    def _call(self, method: str, path: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read())["value"]
        except urllib.error.HTTPError as exc:
            raise WebDriverError(f"{method} {path}: {exc.read().decode()[:500]}") from None

    def _s(self, method: str, path: str, body: dict | None = None):
        return self._call(method, f"/session/{self.session}{path}", body)

    def get(self, url: str) -> None:
        self._s("POST", "/url", {"url": url})

    def script(self, source: str, *args):
        return self._s("POST", "/execute/sync", {"script": source, "args": list(args)})

    def find_all(self, css: str) -> list[dict]:
        return self._s("POST", "/elements", {"using": "css selector", "value": css})

    def wait_for(self, css: str, timeout: float = 30.0, text: str | None = None) -> dict:
        """The first element matching ``css`` (whose text contains ``text``), waiting for it."""
        deadline = time.monotonic() + timeout
        while True:
            for element in self.find_all(css):
                if text is None or text in self.text(element):
                    return element
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {css!r}" + (f" with text {text!r}" if text else "") + f" after {timeout:.0f} s")
            time.sleep(0.3)

    def text(self, element: dict) -> str:
        return self._s("GET", f"/element/{element[ELEMENT]}/text")

    def click(self, element: dict) -> None:
        self._s("POST", f"/element/{element[ELEMENT]}/click", {})

    def type(self, element: dict, keys: str) -> None:
        self._s("POST", f"/element/{element[ELEMENT]}/value", {"text": keys})

    def clear(self, element: dict) -> None:
        self._s("POST", f"/element/{element[ELEMENT]}/clear", {})

    def screenshot(self) -> bytes:
        import base64

        return base64.b64decode(self._s("GET", "/screenshot"))

    def url(self) -> str:
        return self._s("GET", "/url")

    def quit(self) -> None:
        try:
            self._call("DELETE", f"/session/{self.session}")
        finally:
            self.proc.terminate()
            self.proc.wait(timeout=10)
