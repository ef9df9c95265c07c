"""A headless Chromium driven over the DevTools protocol (websockets), for the web view tests."""

import base64
import itertools
import json
import re
import shutil
import subprocess
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

from websockets.sync.client import connect

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


class Browser:
    def __init__(self, workdir: Path):
        self.stack = ExitStack()
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
             f"--user-data-dir={workdir / 'chromium-profile'}", "--window-size=1280,900", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            for line in self.proc.stderr:
                if m := re.search(r"DevTools listening on ws://([\d.]+:\d+)/", line):
                    break
            else:
                raise RuntimeError("chromium exited before it listened for DevTools")
            with urllib.request.urlopen(f"http://{m.group(1)}/json/list", timeout=10) as r:
                page = next(t for t in json.load(r) if t["type"] == "page")
            self.ws = self.stack.enter_context(connect(page["webSocketDebuggerUrl"], max_size=2**26, open_timeout=10))
        except BaseException:
            self.close()
            raise
        self.ids = itertools.count(1)

    def call(self, method: str, **params) -> dict:
        id_ = next(self.ids)
        self.ws.send(json.dumps({"id": id_, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=30))
            if message.get("id") == id_:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def goto(self, url: str):
        self.call("Page.enable")
        self.call("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete' && location.href === " + json.dumps(url), 30)

    def wait_for(self, expression: str, timeout: float):
        """Evaluate `expression` until it is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        while not (value := self.evaluate(expression)):
            if time.monotonic() > deadline:
                raise AssertionError(f"the page never satisfied {expression}; body:\n"
                                     + str(self.evaluate("document.body && document.body.innerText")))
            time.sleep(0.1)  # pacing between reads of the page; the DOM is what we wait on
        return value

    def screenshot(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self):
        self.stack.close()
        self.proc.kill()
        self.proc.wait(timeout=30)


def open_page(browser: Browser, api_url: str, key: str, page: str):
    """`page` of the web view at `api_url` (http://HOST:PORT/v1), with `key` kept as the page keeps it."""
    root = api_url.removesuffix("/v1") + "/"
    browser.goto(root + "chat.html")  # any page of the origin, to reach its localStorage
    browser.evaluate(f"localStorage.setItem('kimi-cluster-api-key', {json.dumps(key)})")
    browser.goto(root + page)
