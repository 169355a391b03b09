"""A stdlib-only fake of the OpenAI Responses API for driving the real Codex CLI.

The fake listens on 127.0.0.1 only and answers every ``POST /v1/responses``
with a Server-Sent-Events stream taken from a script of steps, one step per
request, in the formats Codex 0.169.0 expects; only the minimum it needs is
sent here.

Typical use from pytest::

    with FakeModel([shell("echo hi > out.txt"), message("done")]) as fake, \
            codex_home(fake.url) as env:
        run = run_codex(codex_bin, exec_args(repo), "do it", env)
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator, Self

# The model slug must be one the binary knows: unknown slugs add a warning
# item to every run and change the advertised tool set (codex.md, section 1).
MODEL_SLUG = "gpt-5.5"
FAKE_API_KEY = "fake-key-for-tests"
CODEX_BIN_ENV = "PATCHBAY_TEST_CODEX_BIN"

_REPO_ROOT = Path(__file__).resolve().parent.parent
_NPM_MODULES = _REPO_ROOT / ".cache" / "npm" / "node_modules"
# The native binary is preferred: it starts faster and, unlike the Node
# wrapper, leaves no orphans when killed (codex.md, section 3).
_NATIVE_BIN = (
    _NPM_MODULES
    / "@openai"
    / "codex-linux-x64"
    / "vendor"
    / "x86_64-unknown-linux-musl"
    / "bin"
    / "codex"
)
_WRAPPER_BIN = _NPM_MODULES / ".bin" / "codex"

STEP_KINDS = frozenset(
    {"shell", "apply_patch", "message", "http_error", "failed", "hang", "stall"}
)
TOOL_OUTPUT_TYPES = frozenset({"function_call_output", "custom_tool_call_output"})
# Upper bounds so that no handler thread can outlive a forgotten close().
MAX_HOLD_SECONDS = 120.0
MAX_BODY_BYTES = 64 * 1024 * 1024
CLOSE_JOIN_SECONDS = 5.0


@dataclass(frozen=True)
class Step:
    """One scripted answer.  ``text`` is the cmd, patch, message or error."""

    kind: str
    text: str = ""
    status: int = 500

    def __post_init__(self) -> None:
        if self.kind not in STEP_KINDS:
            raise ValueError(f"unknown step kind {self.kind!r}")


def shell(cmd: str) -> Step:
    """An ``exec_command`` function call running ``cmd`` in the workdir."""
    return Step("shell", cmd)


def apply_patch(patch: str) -> Step:
    """A freeform apply_patch call; ``patch`` is a full Codex patch envelope."""
    return Step("apply_patch", patch)


def message(text: str) -> Step:
    """A final assistant message, which ends the turn."""
    return Step("message", text)


def http_error(status: int, text: str = "fake model error") -> Step:
    """A plain HTTP error response with a JSON error body."""
    return Step("http_error", text, status)


def failed(text: str = "fake response failure") -> Step:
    """A 200 stream that ends with a ``response.failed`` event."""
    return Step("failed", text)


def hang() -> Step:
    """Never send headers; released only by ``FakeModel.close()``."""
    return Step("hang")


def stall() -> Step:
    """Send headers and ``response.created``, then go silent until close."""
    return Step("stall")


def default_step(body: Any) -> Step:
    """Stateless answer once the script is exhausted.

    A tool output as the last input item means a tool call just ran, so the
    turn is closed with a message; anything else also gets a plain "done".
    Both end the turn, which keeps runs with a short script deterministic.
    """
    items = body.get("input") if isinstance(body, dict) else None
    last = items[-1] if isinstance(items, list) and items else {}
    if isinstance(last, dict) and last.get("type") in TOOL_OUTPUT_TYPES:
        return message("done after tool output")
    return message("done")


def input_texts(body: Any, role: str = "user") -> list[str]:
    """All text parts of ``role`` messages in a request body's ``input``."""
    texts: list[str] = []
    items = body.get("input", []) if isinstance(body, dict) else []
    for item in items:
        if not isinstance(item, dict) or item.get("role") != role:
            continue
        content = item.get("content")
        if isinstance(content, str):
            texts.append(content)
            continue
        for part in content or []:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                texts.append(part["text"])
    return texts


# --------------------------------------------------------------------------
# SSE payloads


def _usage() -> dict[str, Any]:
    return {
        "input_tokens": 10,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 2,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 12,
    }


def _output_item(step: Step, seq: int) -> dict[str, Any]:
    """The single output item a successful step produces."""
    if step.kind == "shell":
        args = json.dumps({"cmd": step.text})
        return {
            "type": "function_call",
            "call_id": f"call_{seq}",
            "name": "exec_command",
            "arguments": args,
        }
    if step.kind == "apply_patch":
        # Must be a custom (freeform) tool call: a function_call named
        # apply_patch is answered "aborted" by gpt-5.5 (codex.md, section 2).
        return {
            "type": "custom_tool_call",
            "call_id": f"call_{seq}",
            "name": "apply_patch",
            "input": step.text,
        }
    return {
        "type": "message",
        "role": "assistant",
        "id": f"msg_{seq}",
        "content": [{"type": "output_text", "text": step.text}],
    }


def _item_events(step: Step, seq: int) -> list[dict[str, Any]]:
    resp_id = f"resp_{seq}"
    return [
        {"type": "response.created", "response": {"id": resp_id}},
        {"type": "response.output_item.done", "item": _output_item(step, seq)},
        {"type": "response.completed", "response": {"id": resp_id, "usage": _usage()}},
    ]


def _failed_events(step: Step, seq: int) -> list[dict[str, Any]]:
    resp_id = f"resp_{seq}"
    error = {"code": "server_error", "message": step.text}
    return [
        {"type": "response.created", "response": {"id": resp_id}},
        {
            "type": "response.failed",
            "response": {"id": resp_id, "status": "failed", "error": error},
        },
    ]


def _sse(event: dict[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()


# --------------------------------------------------------------------------
# HTTP server


class _Handler(BaseHTTPRequestHandler):
    """Answers one request per connection; everything else is the fake's."""

    protocol_version = "HTTP/1.1"
    # A socket timeout bounds reads and writes, so a silent or dead client
    # can never pin a handler thread forever.
    timeout = 10
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Keep pytest output clean; requests are recorded instead."""

    def do_GET(self) -> None:
        self._record(None)
        self._send_json(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:
        body = self._read_json()
        fake = self.server.fake
        if not self.path.rstrip("/").endswith("/responses"):
            self._record(body)
            self._send_json(404, {"error": {"message": "not found"}})
            return
        seq, step = fake._next_step(body)
        self._record(body, seq, step)
        self._answer(step, seq)

    def _answer(self, step: Step, seq: int) -> None:
        fake = self.server.fake
        if step.kind == "hang":
            fake._hold()
            self.close_connection = True
        elif step.kind == "http_error":
            err = {"message": step.text, "type": "fake_error"}
            self._send_json(step.status, {"error": err})
        elif step.kind == "stall":
            self._start_sse()
            self._write_events(_item_events(step, seq)[:1])
            fake._hold()
        elif step.kind == "failed":
            self._start_sse()
            self._write_events(_failed_events(step, seq))
        else:
            self._start_sse()
            self._write_events(_item_events(step, seq))

    def _read_json(self) -> Any:
        length = max(0, int(self.headers.get("Content-Length") or 0))
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            raw = self._read_chunked()
        else:
            raw = self.rfile.read(min(length, MAX_BODY_BYTES))
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return {"_unparsed": raw.decode("utf-8", "replace")}

    def _read_chunked(self) -> bytes:
        data = bytearray()
        while len(data) < MAX_BODY_BYTES:  # bounded by the size cap
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                self.rfile.readline()  # the CRLF after the last chunk
                break
            data += self.rfile.read(size)
            self.rfile.readline()
        return bytes(data)

    def _record(self, body: Any, seq: int = 0, step: Step | None = None) -> None:
        self.server.fake._record(
            {
                "seq": seq,
                "method": self.command,
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "body": body,
                "step": step.kind if step else None,
            }
        )

    def _send_json(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        self.close_connection = True

    def _start_sse(self) -> None:
        # No Content-Length: the stream ends when the connection closes.
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    def _write_events(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            self.wfile.write(_sse(event))
        self.wfile.flush()


class _Server(ThreadingHTTPServer):
    # Handler threads are tracked and joined by FakeModel.close() with a
    # deadline; the stdlib's unbounded join is switched off.
    block_on_close = False
    daemon_threads = True

    def __init__(self, fake: FakeModel, host: str) -> None:
        self.fake = fake
        super().__init__((host, 0), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            daemon=True,
        )
        self.fake._track(thread)
        thread.start()


def _check_loopback(host: str) -> str:
    """Refuse anything but an IPv4 loopback literal: tests must stay local."""
    try:
        addr = ipaddress.IPv4Address(host)
    except ValueError as err:
        raise ValueError(f"host must be an IPv4 loopback address: {host!r}") from err
    if not addr.is_loopback:
        raise ValueError(f"refusing to listen on non-loopback {host!r}")
    return host


class FakeModel:
    """A scripted Responses API server on 127.0.0.1 with a random port."""

    def __init__(
        self, script: list[Step] | None = None, host: str = "127.0.0.1"
    ) -> None:
        self._host = _check_loopback(host)
        self._script: deque[Step] = deque(script or [])
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._threads: list[threading.Thread] = []
        self._seq = 0
        self.requests: list[dict[str, Any]] = []
        self._server: _Server | None = None
        self._serve_thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> Self:
        self._server = _Server(self, self._host)
        self._serve_thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fake-model",
            daemon=True,
        )
        self._serve_thread.start()
        return self

    def close(self) -> None:
        """Release held requests, stop serving and join handler threads."""
        self._release.set()
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        deadline = time.monotonic() + CLOSE_JOIN_SECONDS
        for thread in [self._serve_thread, *self._threads]:
            if thread is not None:
                thread.join(max(0.0, deadline - time.monotonic()))
        self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- public helpers ----------------------------------------------------

    @property
    def url(self) -> str:
        """The provider base_url; Codex appends ``/responses``."""
        if self._server is None:
            raise RuntimeError("FakeModel is not started")
        port = self._server.server_address[1]
        return f"http://{self._host}:{port}/v1"

    def add(self, *steps: Step) -> None:
        """Append steps, e.g. before a ``resume`` run."""
        with self._lock:
            self._script.extend(steps)

    def remaining(self) -> int:
        with self._lock:
            return len(self._script)

    def responses_requests(self) -> list[dict[str, Any]]:
        """Recorded model requests (POSTs to .../responses) in order."""
        with self._lock:
            return [r for r in self.requests if r["seq"]]

    def alive_handlers(self) -> int:
        with self._lock:
            return sum(t.is_alive() for t in self._threads)

    # -- used by the handler -----------------------------------------------

    def _next_step(self, body: Any) -> tuple[int, Step]:
        with self._lock:
            self._seq += 1
            step = self._script.popleft() if self._script else None
            seq = self._seq
        return seq, step or default_step(body)

    def _record(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self.requests.append(entry)

    def _track(self, thread: threading.Thread) -> None:
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)

    def _hold(self) -> None:
        self._release.wait(MAX_HOLD_SECONDS)


# --------------------------------------------------------------------------
# Running codex


def find_codex_bin() -> str | None:
    """The codex binary to test with, or None when it is not installed.

    ``$PATCHBAY_TEST_CODEX_BIN`` wins; a set but wrong value is an error
    rather than a silent skip.  Otherwise the npm cache in the repo is used.
    """
    override = os.environ.get(CODEX_BIN_ENV)
    if override:
        if not os.access(override, os.X_OK):
            raise FileNotFoundError(f"{CODEX_BIN_ENV}={override} is not executable")
        return override
    for candidate in (_NATIVE_BIN, _WRAPPER_BIN):
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def codex_config(base_url: str, idle_timeout_ms: int = 20000) -> str:
    """config.toml text for an offline run against ``base_url``."""
    # json.dumps yields a valid TOML basic string for these ASCII values.
    return f"""\
model = {json.dumps(MODEL_SLUG)}
model_provider = "fake"
approval_policy = "never"

[model_providers.fake]
name = "fake"
base_url = {json.dumps(base_url)}
wire_api = "responses"
env_key = "FAKE_API_KEY"
# Fail fast: default retries turn one scripted error into ~7 s of backoff.
request_max_retries = 0
stream_max_retries = 0
stream_idle_timeout_ms = {int(idle_timeout_ms)}

[analytics]
# Otherwise ~5 s extra per run and DNS lookups at shutdown.
enabled = false

[features]
# Otherwise plugin marketplace sync looks up github.com.
plugins = false
"""


def write_codex_home(
    directory: str | os.PathLike[str], base_url: str, idle_timeout_ms: int = 20000
) -> dict[str, str]:
    """Write config.toml into ``directory`` and return the env to run codex.

    The env is built from scratch so the developer's own ~/.codex, shell
    profile and API keys never leak into a test run.  HOME is a sibling
    directory so login shells spawned by exec_command read no rc files.
    """
    codex_home = Path(directory)
    codex_home.mkdir(parents=True, exist_ok=True)
    (codex_home / "config.toml").write_text(codex_config(base_url, idle_timeout_ms))
    home = codex_home / "home"
    home.mkdir(exist_ok=True)
    node = shutil.which("node")
    path_dirs = [os.path.dirname(node)] if node else []
    path_dirs += ["/usr/local/bin", "/usr/bin", "/bin"]
    return {
        "CODEX_HOME": str(codex_home),
        "FAKE_API_KEY": FAKE_API_KEY,
        "HOME": str(home),
        "PATH": os.pathsep.join(dict.fromkeys(path_dirs)),
        "LANG": "C.UTF-8",
        "NO_COLOR": "1",
    }


# Where bubblewrap is installed, Codex runs its tools through its own sandbox helper, which
# it links into CODEX_HOME at start, and it refuses to make those links under the system
# temporary directory (/tmp): a CODEX_HOME there makes every tool call fail. So test homes
# live under /var/tmp, which the system's temp_dir() does not name.
CODEX_HOME_BASE = "/var/tmp" if os.path.isdir("/var/tmp") else None


@contextlib.contextmanager
def codex_home(base_url: str, idle_timeout_ms: int = 20000) -> Iterator[dict[str, str]]:
    """``write_codex_home`` in a fresh directory outside /tmp, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="pb-codex-home-", dir=CODEX_HOME_BASE) as d:
        yield write_codex_home(d, base_url, idle_timeout_ms)


def exec_args(workdir: str | os.PathLike[str], *extra: str) -> list[str]:
    """``exec --json`` arguments; ``extra`` goes before the stdin prompt ``-``."""
    return ["exec", "--json", "-C", str(workdir), "-s", "workspace-write", *extra, "-"]


@dataclass
class CodexRun:
    returncode: int | None
    stdout: str
    stderr: str
    elapsed: float
    timed_out: bool
    events: list[dict[str, Any]] = field(default_factory=list)

    def of_type(self, event_type: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("type") == event_type]

    def items(self, item_type: str) -> list[dict[str, Any]]:
        """Completed items of one type (command_execution, agent_message...)."""
        return [
            e["item"]
            for e in self.of_type("item.completed")
            if e.get("item", {}).get("type") == item_type
        ]

    def thread_id(self) -> str | None:
        started = self.of_type("thread.started")
        return started[0].get("thread_id") if started else None


def _parse_jsonl(text: str) -> list[dict[str, Any]]:
    events = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line.startswith("{"):
            continue  # tolerate stray lines; assertions are on events
        try:
            events.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a kill
    return events


def run_codex(
    codex_bin: str,
    args: list[str],
    prompt: str,
    env: dict[str, str],
    timeout: float = 30.0,
) -> CodexRun:
    """Run codex with ``prompt`` on stdin, then EOF, under a wall-clock limit.

    stdin must reach EOF or codex waits for it forever.  Codex gets its own
    session so a timeout can kill the whole group, including the native
    binary under the Node wrapper and any tool processes.
    """
    start = time.monotonic()
    proc = subprocess.Popen(
        [codex_bin, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
        text=True,
    )
    timed_out = False
    try:
        out, err = proc.communicate(prompt, timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc.pid)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            _kill_group(proc.pid)
            proc.wait(timeout=10)
    elapsed = time.monotonic() - start
    return CodexRun(proc.returncode, out, err, elapsed, timed_out, _parse_jsonl(out))


def _kill_group(pgid: int) -> None:
    # The group may already be gone when codex exited on its own.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
