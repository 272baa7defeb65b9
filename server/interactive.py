"""Talking to running commands: `send_input`, output filtered by a pattern, the terminal's screen, and
waiting for a pattern in new output.

Input goes to the stdin a command was fired to keep open (`stdin: "pipe"`, or its terminal with `pty`);
the server holds it in memory only (tools/terminal.py), so a task of another server process, or of a
server that stopped, takes none here. Reads stay bounded like every other read: a filter scans at most
`FILTER_SCAN_BYTES` of output per call and returns whole lines up to `max_bytes`; the screen is
rendered (pyte) from at most the last `SCREEN_FEED_BYTES` of output.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import anyio
import pyte

from server.errors import BadPatternError, NoInputError, TooLargeError
from server.output import Output
from server.tasks import DroppedRange, ErrorKind, OutputView, Status, Task, TaskView, _View
from tools.context import InputClosed
from tools.shell import MAX_PATTERN_CHARS, interaction_of

MAX_INPUT_BYTES = 64 * 1024
SEND_TIMEOUT_S = 10.0
"""A command that reads none of its input fills the pipe (64 KiB on Linux); `send_input` gives up then."""
FILTER_SCAN_BYTES = 4 * 1024 * 1024
SCREEN_FEED_BYTES = 256 * 1024
READ_BYTES = 256 * 1024
LOST_INPUT = (
    "its input was held by a server that stopped; the command's stdin is closed "
    "(a restarted server cannot reattach a pipe or terminal)"
)


class InputReply(_View):
    offset: int
    """The output's size when the input was written: read from here to see what it answered."""


def compile_pattern(argument: str, pattern: str) -> re.Pattern[str]:
    if len(pattern) > MAX_PATTERN_CHARS:
        raise BadPatternError(argument, pattern, f"{len(pattern)} characters; at most {MAX_PATTERN_CHARS}")
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise BadPatternError(argument, pattern, str(exc)) from None


async def send_input(task: Task, text: str, eof: bool) -> InputReply:
    """Writes `text` (then EOF if asked) to the task's open input; refuses plainly when there is none."""
    data = text.encode()
    if len(data) > MAX_INPUT_BYTES:
        raise TooLargeError("send_input text", len(data), MAX_INPUT_BYTES, "send it in parts of 64 KiB at most")
    stdin = _open_input(task)
    offset = task.output.total_bytes
    task.handle.input_offset = offset  # what it answers is new output for `wait_for`
    try:
        with anyio.fail_after(SEND_TIMEOUT_S):
            await stdin.send(data, eof)
    except InputClosed as exc:
        raise NoInputError(task.id, str(exc)) from exc
    except TimeoutError:
        raise NoInputError(
            task.id, f"the command read none of it for {SEND_TIMEOUT_S:g} s (its input is full); part may be written"
        ) from None
    return InputReply(offset=offset)


def _open_input(task: Task) -> Any:
    if task.status.finished:
        lost = task.error is not None and task.error.kind in (ErrorKind.INTERRUPTED, ErrorKind.SHUTDOWN)
        why = LOST_INPUT if lost else "there is no command left to write to"
        raise NoInputError(task.id, f"it has {task.status.value}; {why}")
    if not task.local:
        raise NoInputError(
            task.id,
            f"another server process runs it, and its input is held there (if that server stopped, {LOST_INPUT})",
        )
    talks = interaction_of(task.arguments)
    if talks is None or not talks.keeps_input:
        raise NoInputError(
            task.id, 'it was not fired with stdin "pipe" or pty true, so its stdin is closed; fire it again with one'
        )
    stdin = task.handle.stdin
    if stdin is None and task.status is Status.QUEUED:
        raise NoInputError(task.id, "it is queued and has not started; send again once it runs")
    if stdin is None or not stdin.open:
        raise NoInputError(task.id, "its stdin is closed (it was sent eof, or the command closed it)")
    return stdin


# ---- reading: filtered lines, the screen ----


def read_view(task: Task, offset: int, max_bytes: int, pattern: str | None, view: str) -> TaskView:
    """The task with its output as matching lines (`filter`), or as its terminal's screen."""
    if view == "screen":
        return task.view().model_copy(update={"output": screen(task)})
    assert pattern is not None
    lines = filtered(task.output, offset, max_bytes, compile_pattern("filter", pattern), task.status.finished)
    return task.view().model_copy(update={"output": lines})


def filtered(output: Output, offset: int, max_bytes: int, pattern: re.Pattern[str], finished: bool) -> OutputView:
    """Whole lines from `offset` that match, up to `max_bytes`; `next_offset` is where the next call
    goes on (the start of a line not yet complete, or not scanned)."""
    scan = _Scan(pattern, max_bytes, offset)
    total = output.total_bytes
    end, pos, dropped = min(total, offset + FILTER_SCAN_BYTES), offset, None
    while pos < end and not scan.full:
        chunk = output.read(pos, min(READ_BYTES, end - pos))
        dropped = chunk.dropped or dropped
        if chunk.offset != pos:  # the middle of a long output is gone: lines start again after it
            scan.restart(chunk.offset)
        if chunk.next_offset <= chunk.offset:
            break
        scan.feed(chunk.data)
        pos = chunk.next_offset
    if finished and pos >= total and not scan.full:
        scan.last_line()
    text = "".join(scan.lines)
    next_offset = scan.resume_at
    return OutputView(
        text=text,
        offset=offset,
        next_offset=next_offset,
        total_bytes=total,
        truncated=next_offset < total,
        dropped=None if dropped is None else DroppedRange.model_validate({"from": dropped[0], "to": dropped[1]}),
        line_offsets=scan.offsets,
    )


@dataclass
class _Scan:
    pattern: re.Pattern[str]
    max_bytes: int
    resume_at: int
    """The start of the first byte not yet judged (a partial line is judged when it is complete)."""
    carry: bytes = b""
    lines: list[str] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    used: int = 0
    full: bool = False
    matched_to: int = 0
    """The end of the line that did not fit (for `wait_for`: the line that matched)."""

    def restart(self, at: int) -> None:
        self.carry, self.resume_at = b"", at

    def feed(self, data: bytes) -> None:
        parts = (self.carry + data).split(b"\n")
        self.carry = parts.pop()
        for part in parts:
            if not self._judge(part + b"\n"):
                return

    def last_line(self) -> None:
        if self.carry:
            self._judge(self.carry)
            self.carry = b""

    def matches(self, line: bytes) -> bool:
        return self.pattern.search(line.decode("utf-8", errors="replace").rstrip("\r\n")) is not None

    def _judge(self, line: bytes) -> bool:
        text = line.decode("utf-8", errors="replace")
        if self.matches(line):
            if self.used + len(line) > self.max_bytes:
                self.full, self.matched_to = True, self.resume_at + len(line)
                return False
            self.lines.append(text)
            self.offsets.append(self.resume_at)
            self.used += len(line)
        self.resume_at += len(line)
        return True


@dataclass
class _Terminal:
    screen: pyte.Screen
    stream: pyte.ByteStream
    fed_to: int


def screen(task: Task) -> OutputView:
    """The terminal's current screen as text (rows x cols, trailing blanks trimmed), rendered by pyte from
    the output: fed on from where the last render stopped, or from the last `SCREEN_FEED_BYTES`."""
    talks = interaction_of(task.arguments)
    rows, cols = (24, 80) if talks is None or talks.pty is None else talks.pty
    output = task.output
    total = output.total_bytes
    terminal = task.handle.screen
    if not isinstance(terminal, _Terminal) or terminal.fed_to < output.tail(SCREEN_FEED_BYTES):
        terminal = _Terminal(pyte.Screen(cols, rows), pyte.ByteStream(), output.tail(SCREEN_FEED_BYTES))
        terminal.stream.attach(terminal.screen)
        task.handle.screen = terminal
    start = terminal.fed_to
    while terminal.fed_to < total:
        chunk = output.read(terminal.fed_to, READ_BYTES)
        if chunk.next_offset <= terminal.fed_to:
            break
        terminal.stream.feed(chunk.data)
        terminal.fed_to = chunk.next_offset
    text = "\n".join(line.rstrip() for line in terminal.screen.display).rstrip("\n")
    return OutputView(text=text, offset=start, next_offset=terminal.fed_to, total_bytes=total, truncated=False)


# ---- waiting for new output ----


def _since(task: Task) -> int:
    """Where `wait_for` starts looking: past the last line a `wait_for` matched and the output's size at
    the last `send_input` (what answers it may be out before the poll starts), so a prompt or a rebuild
    already printed is found, and an old one is not found twice; from the start if neither happened
    (bounded: at most the last `FILTER_SCAN_BYTES`)."""
    handle = task.handle
    total = task.output.total_bytes
    return max(handle.input_offset or 0, handle.watched_to, total - FILTER_SCAN_BYTES, 0)


class OutputWatch:
    """What `poll_output` waits for: a task is done when finished, ready (`ready_when`), or, with
    `wait_for`, once its output matches (see `_since`); a line still being written (a prompt) counts."""

    def __init__(self, tasks: list[Task], wait_for: str | None) -> None:
        pattern = None if wait_for is None else compile_pattern("wait_for", wait_for)
        self.watches_output = pattern is not None
        self._scans = {t.id: _Scan(pattern, 0, _since(t)) for t in tasks} if pattern else {}
        self._matched: set[str] = set()

    def __call__(self, task: Task) -> bool:
        if task.status.finished or task.ready_at is not None or task.id in self._matched:
            return True
        scan = self._scans.get(task.id)
        if scan is None:
            return False
        total = task.output.total_bytes
        while scan.resume_at + len(scan.carry) < total and not scan.full:
            at = scan.resume_at + len(scan.carry)
            chunk = task.output.read(at, READ_BYTES)
            if chunk.offset != at:
                scan.restart(chunk.offset)
            if chunk.next_offset <= chunk.offset:
                break
            scan.feed(chunk.data)
        if not scan.full and scan.carry and scan.matches(scan.carry):  # a prompt: no newline yet
            scan.full, scan.matched_to = True, scan.resume_at + len(scan.carry)
        if scan.full:  # max_bytes 0: the first matching line fills it
            self._matched.add(task.id)
            task.handle.watched_to = max(task.handle.watched_to, scan.matched_to)
        return task.id in self._matched
