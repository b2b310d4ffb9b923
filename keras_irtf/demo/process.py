"""Run the demo server in a child process and drive the page in the system's Chromium: what the
demo's tests and latency benchmark share.

    with DemoProcess("exported/css_tirg_s0/1") as demo:        # tools/demo.py on a free port
        print(demo.url)                                          # http://127.0.0.1:<port>/
        with chromium_page() as page:                            # headless, loopback only
            page.goto(demo.url)

The child runs tools/demo.py (so this needs a source checkout) with keras and Playwright made
unimportable, so it proves on every run that the export is served by TensorFlow alone and that
the demo itself never needs Playwright (the test extra's browser driver, used here by
`chromium_page` only). It binds to 127.0.0.1 on a port the OS picks.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from keras_irtf.utils import optional_import

REPO = Path(__file__).resolve().parents[2]
_READY = re.compile(r"serving on (http://\S+/)")

# The child: keras cannot be imported (as in a TF Serving-only environment), nor Playwright (the
# demo extra does not install it), then the CLI.
UNIMPORTABLE_IN_THE_CHILD = ("keras", "tf_keras", "playwright")
_CHILD = (
    "import runpy, sys\n"
    f"for name in {UNIMPORTABLE_IN_THE_CHILD!r}:\n"
    "    sys.modules[name] = None\n"
    "sys.argv = [{tool!r}] + sys.argv[1:]\n"
    "runpy.run_path({tool!r}, run_name='__main__')\n"
)


class DemoProcess:
    """tools/demo.py for `model` in a child process; `url` once it listens. Stop with stop() or
    by leaving the `with` block (SIGINT, then SIGKILL after `stop_timeout` s)."""

    def __init__(self, model, *args, start_timeout: float = 180.0, stop_timeout: float = 20.0, log_path=None):
        self.model = str(model)
        self.args = [str(a) for a in args]
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.log_path = log_path
        self.url = None
        self.proc = None
        self.lines = []  # the child's output (stdout and stderr)
        self._queue = queue.Queue()

    def start(self):
        tool = str(REPO / "tools" / "demo.py")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        self.proc = subprocess.Popen(
            [sys.executable, "-u", "-c", _CHILD.format(tool=tool), "--model", self.model, "--port", "0", *self.args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, env=env,
            cwd=str(REPO))
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()
        deadline = time.monotonic() + self.start_timeout
        while self.url is None:
            if self.proc.poll() is not None:
                time.sleep(0.2)  # let the pump collect the last lines
                raise RuntimeError(f"the demo server exited with code {self.proc.returncode}:\n" + self.output())
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the demo server did not start within {self.start_timeout:.0f} s:\n" + self.output())
            try:
                line = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            match = _READY.search(line)
            if match:
                self.url = match.group(1)
        return self

    def _pump(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self._queue.put(line)

    def output(self) -> str:
        return "\n".join(self.lines)

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)  # uvicorn shuts down gracefully on SIGINT
        try:
            self.proc.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._pump_thread.join(timeout=10)  # the child's last lines
        if self.log_path:
            Path(self.log_path).write_text(self.output() + "\n")

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ---- HTTP (standard library only) ------------------------------------------------------------

    def request(self, method: str, path: str, body=None, raw: bytes = None, timeout: float = 60.0):
        """(status, parsed JSON or raw bytes) of a request to the demo."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url.rstrip("/") + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data is not None else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, content, ctype = resp.status, resp.read(), resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            status, content, ctype = e.code, e.read(), e.headers.get("Content-Type", "")
        return status, (json.loads(content) if "json" in ctype else content)


def find_chromium():
    """The Chromium binary to drive: $KERAS_IRTF_CHROMIUM, else chromium / chromium-browser /
    google-chrome on the PATH; None when there is none."""
    candidates = [os.environ.get("KERAS_IRTF_CHROMIUM")] + [shutil.which(n) for n in
                                                           ("chromium", "chromium-browser", "google-chrome")]
    return next((c for c in candidates if c and os.path.isfile(c)), None)


@contextlib.contextmanager
def chromium_page(width: int = 1200, height: int = 900, executable=None):
    """A headless page of the system's Chromium through Playwright (never a downloaded browser).
    Host names do not resolve, so the page can reach nothing but addresses given as IPs (the demo
    on 127.0.0.1)."""
    sync_playwright = optional_import("playwright.sync_api", "test", "the demo's browser page").sync_playwright
    executable = executable or find_chromium()
    if executable is None:
        raise RuntimeError("no Chromium found: install Debian's package (apt-get install -y chromium) "
                           "or set KERAS_IRTF_CHROMIUM to a Chromium binary")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True,
                                    args=["--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            yield page
        finally:
            browser.close()
