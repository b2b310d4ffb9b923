"""Runs the code blocks of a Markdown page as a reader would, for tests/test_docs.py.

A page's blocks run in order in one working folder. `bash` blocks run in bash (`set -e`), each
block in a new shell started in that folder; `python` blocks run in one Python interpreter per
page, as cells of a notebook share their names. `text` blocks after an `<!-- expected output -->`
marker are compared with what the block before them printed. The markers a page may carry, on
the line before a block:

    <!-- not run: REASON -->        the block is shown, not run (tests/test_docs.py lists them all)
    <!-- expected output -->        (before a text block) these lines appear, in this order, in the
                                    previous block's output; a line `...` stands for any lines, a
                                    line ending in `...` for any line that begins so
    <!-- exit status: N -->         the block is expected to end with status N (an error example)

A block whose first line is `# save as PATH` is written to PATH in the working folder instead of
being run (a plug-in module, a config file), and may be used by later blocks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

RUN_LANGUAGES = ("bash", "python")
SHOWN_LANGUAGES = ("text", "yaml", "json")  # displayed only (a `# save as` block of them is written)
FENCE = re.compile(r"^(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
MARKER = re.compile(r"^<!--\s*(?P<name>not run|expected output|exit status)\s*(?::\s*(?P<value>.*?))?\s*-->$")
SAVE_AS = re.compile(r"^#\s*save as\s+(?P<path>\S+)\s*$")


@dataclasses.dataclass
class Block:
    page: str
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    not_run: str | None = None
    expected_output: bool = False
    exit_status: int = 0

    @property
    def save_as(self) -> str | None:
        first = self.code.splitlines()[0] if self.code.strip() else ""
        match = SAVE_AS.match(first.strip())
        return match.group("path") if match else None

    def where(self) -> str:
        return f"{self.page}:{self.line}"


def parse_blocks(path: Path, name: str) -> list:
    """Every fenced code block of a Markdown file, with the marker on the line before it.
    MyST directives (```{name}) are not code blocks and are skipped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, info = match.group("fence"), match.group("info").strip()
        start, body = i, []
        i += 1
        while i < len(lines) and not (lines[i].startswith(fence[0] * len(fence)) and not lines[i].strip(fence[0]).strip()):
            body.append(lines[i])
            i += 1
        i += 1  # the closing fence
        if info.startswith("{"):
            continue
        marker = None
        j = start - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        if j >= 0:
            marker = MARKER.match(lines[j].strip())
        block = Block(name, start + 1, info.split()[0] if info else "", "\n".join(body) + "\n")
        if marker:
            kind, value = marker.group("name"), marker.group("value")
            if kind == "not run":
                block.not_run = value or ""
            elif kind == "expected output":
                block.expected_output = True
            else:
                block.exit_status = int(value)
        blocks.append(block)
    return blocks


def logical_lines(code: str) -> list:
    """Shell lines with backslash continuations joined."""
    out, current = [], ""
    for line in code.splitlines():
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        out.append(current + line)
        current = ""
    if current:
        out.append(current)
    return out


def contains_in_order(output: str, expected: str) -> str | None:
    """None when every expected line (stripped) appears in `output`, in order ('...' skips lines,
    a trailing '...' matches the beginning of a line); else the first line not found."""
    got = [line.rstrip() for line in strip_ansi(output).splitlines()]
    position = 0
    for line in expected.splitlines():
        line = line.rstrip()
        if not line.strip() or line.strip() == "...":
            continue
        want = line.strip()
        prefix = want[:-3] if want.endswith("...") else None  # a line ending in ... matches its beginning
        for k in range(position, len(got)):
            if got[k].strip() == want or (prefix is not None and got[k].strip().startswith(prefix)):
                position = k + 1
                break
        else:
            return line
    return None


def strip_ansi(text: str) -> str:
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)
    return "\n".join(part.split("\r")[-1] for part in text.split("\n"))


WORKER = r'''
import io, json, sys, traceback, contextlib
out_channel = sys.__stdout__
namespace = {"__name__": "__main__"}
for request in sys.stdin:
    code = json.loads(request)["code"]
    buffer = io.StringIO()
    ok, error = True, ""
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        try:
            exec(compile(code, "<docs block>", "exec"), namespace)
        except BaseException:
            ok, error = False, traceback.format_exc()
    out_channel.write("\x00RESULT " + json.dumps({"ok": ok, "output": buffer.getvalue(), "error": error}) + "\n")
    out_channel.flush()
'''


class PythonSession:
    """One interpreter per page: every python block of the page runs in it, in order."""

    def __init__(self, folder: Path, env: dict):
        self.proc = subprocess.Popen([sys.executable, "-u", "-c", WORKER], cwd=folder, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def run(self, code: str) -> tuple:
        self.proc.stdin.write(json.dumps({"code": code}) + "\n")
        self.proc.stdin.flush()
        stray = []
        for line in self.proc.stdout:
            if line.startswith("\x00RESULT "):
                result = json.loads(line[len("\x00RESULT "):])
                return result["ok"], "".join(stray) + result["output"], result["error"]
            stray.append(line)
        return False, "".join(stray), "the Python session ended"

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


@dataclasses.dataclass
class BlockResult:
    block: Block
    seconds: float
    output: str


class PageRun:
    """Runs the blocks of one page in `folder`; `rewrite(line)` applies the budget rule to each
    logical shell line (returns None for a line that is not executed)."""

    def __init__(self, folder: Path, env: dict, rewrite, timeout: float = 300):
        self.folder, self.env, self.rewrite, self.timeout = folder, env, rewrite, timeout
        self.python = None
        self.groups = []  # process groups of the shells (a block may leave a server running)
        self.results = []

    def _shell(self, block: Block) -> tuple:
        lines = []
        for line in logical_lines(block.code):
            new = self.rewrite(line)
            if new is not None:
                lines.append(new)
        script = "set -eo pipefail\n" + "\n".join(lines) + "\n"
        # Output goes to a file, not a pipe: a server the block leaves running in the background
        # keeps its output open, and the block is over when its shell exits.
        log = self.folder / f".block-{block.line}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(["bash", "-c", script], cwd=self.folder, env=self.env, text=True,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            self.groups.append(proc.pid)
            try:
                status = proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                status = -1
        output = log.read_text(errors="replace")
        log.unlink()
        if status == -1:
            output += f"\n[timed out after {self.timeout} s]"
        return status, output

    def run(self, blocks: list, stop_before: int | None = None):
        previous_output = ""
        try:
            for block in blocks:
                if block.not_run is not None:
                    continue
                started = time.monotonic()
                if block.save_as:
                    target = self.folder / block.save_as
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(block.code)
                    if block.language == "python":
                        compile(block.code, str(target), "exec")
                    continue
                if block.expected_output:
                    missing = contains_in_order(previous_output, block.code)
                    if missing is not None:
                        raise AssertionError(f"{block.where()}: the page shows the line\n    {missing}\nwhich the "
                                             f"block before it did not print. It printed:\n"
                                             + textwrap.indent(strip_ansi(previous_output)[-4000:], "    "))
                    continue
                if block.language == "bash":
                    status, output = self._shell(block)
                    if status != block.exit_status:
                        raise AssertionError(f"{block.where()}: exit status {status} (expected {block.exit_status})"
                                             f"\n{textwrap.indent(strip_ansi(output)[-6000:], '    ')}")
                elif block.language == "python":
                    if self.python is None:
                        self.python = PythonSession(self.folder, self.env)
                    ok, output, error = self.python.run(block.code)
                    if not ok:
                        raise AssertionError(f"{block.where()}: the Python block raised\n"
                                             f"{textwrap.indent(strip_ansi(output)[-3000:] + error, '    ')}")
                else:
                    continue
                previous_output = output
                self.results.append(BlockResult(block, time.monotonic() - started, output))
        finally:
            self.close()

    def close(self):
        if self.python is not None:
            self.python.close()
            self.python = None
        for group in self.groups:
            try:
                os.killpg(group, signal.SIGTERM)
            except ProcessLookupError:
                pass
        self.groups = []
