"""Shared test helpers: real git repositories, real servers, a small HTTP/MCP client.

Nothing here mocks PatchBay: servers are real `Server` objects on 127.0.0.1 (in-process)
or real `python3 patchbay.py serve` processes.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import patchbay
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "patchbay.py"
JSON_HEADERS = {"Content-Type": "application/json",
                "Accept": "application/json, text/event-stream"}
# The ripgrep that ships inside the Codex npm package tests/run installs.
RG = (ROOT / ".cache" / "npm" / "node_modules" / "@openai" / "codex-linux-x64" / "vendor"
      / "x86_64-unknown-linux-musl" / "codex-path" / "rg")
# Settings a developer's shell may hold that would change what a child PatchBay does.
PATCHBAY_ENV = (patchbay.ENV_TOKEN, patchbay.ENV_ROOT, patchbay.ENV_HOME,
                patchbay.ENV_PROFILE, "CLOUDFLARED_BIN", "NGROK_BIN")

# call(tool, args) -> (result, is_error): one front door, as both_doors yields it.
Call = Callable[[str, Dict[str, Any]], Tuple[Any, bool]]


def ok(call: Call, tool: str, args: Dict[str, Any]) -> Dict[str, Any]:
    """Call a tool that must succeed; return its result."""
    result, is_error = call(tool, args)
    assert not is_error, (tool, args, result)
    return result


def err(call: Call, tool: str, args: Dict[str, Any]) -> str:
    """Call a tool that must fail; return its error code."""
    result, is_error = call(tool, args)
    assert is_error, (tool, args, result)
    assert isinstance(result, dict) and "error" in result, result
    return str(result["error"])


def need_rg() -> None:
    if not os.access(RG, os.X_OK):
        pytest.skip("rg from the Codex npm package is not installed (run sh tests/run)")


def cli(home: Path, *args: str, env: Optional[Dict[str, str]] = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`python patchbay.py --home HOME ARGS...` as a real process, without the caller's
    PATCHBAY_* settings; `env` adds to (or overrides) the rest of the environment."""
    full = {k: v for k, v in os.environ.items() if k not in PATCHBAY_ENV}
    full.update(env or {})
    return subprocess.run([sys.executable, str(SCRIPT), "--home", str(home), *args],
                          env=full, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def one_error(proc: subprocess.CompletedProcess[str], code: int = 2) -> str:
    """The failure is exactly one `patchbay: error:` line on stderr and no traceback."""
    assert proc.returncode == code, (proc.args, proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("patchbay: error: "), proc.stderr
    assert "listening" not in proc.stdout
    return lines[0]


def git(cwd: Path, *args: str) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.com",
               GIT_CONFIG_GLOBAL=os.devnull, GIT_CONFIG_NOSYSTEM="1")
    out = subprocess.run(["git", *args], cwd=cwd, env=env, check=True,
                         capture_output=True, text=True)
    return out.stdout


def write_channel(home: Path, data: Dict[str, Any]) -> None:
    """Replace HOME/config.json the way PatchBay does: a 0600 temp file, fsync, rename,
    so a running server never reads it half-written."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = home / (".config.json.test-%d.tmp" % time.monotonic_ns())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(data, indent=2))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, home / "config.json")


def make_repo(path: Path) -> Path:
    """A small real repository: code, docs, an ignored build dir and secret files."""
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q", "-b", "main")
    files = {
        "README.md": "# Demo\n\nA demo repository for PatchBay tests.\n",
        "AGENTS.md": "Run the tests with pytest.\n",
        "src/app.py": "def greet(name):\n    return 'hello ' + name\n\n\nTOKEN_NAME = 'x'\n",
        "src/util.py": "import os\n\n\ndef here():\n    return os.getcwd()\n",
        "docs/guide.md": "Guide\n=====\n\nUse --help to see flags.\n",
        ".gitignore": "build/\n*.log\n",
        ".env": "API_KEY=supersecret\n",
        "config/server.pem": "-----BEGIN PRIVATE KEY-----\nabc\n-----END PRIVATE KEY-----\n",
    }
    for rel, text in files.items():
        p = path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    (path / "build").mkdir()
    (path / "build" / "out.txt").write_text("generated\n")
    (path / "debug.log").write_text("log line\n")
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "initial")
    return path


def make_app(repo: Path, home: Path, profile: str = "worker", token: Optional[str] = None,
             **overrides: Any) -> patchbay.App:
    overrides.setdefault("roots", [str(repo)])
    overrides.setdefault("port", 0)
    cfg = patchbay.Config.resolve(str(home), profile, overrides, environ={})
    return patchbay.App(cfg, token)


class InProcessServer:
    """A real patchbay Server on 127.0.0.1:0, serving from a thread."""

    def __init__(self, app: patchbay.App) -> None:
        self.app = app
        self.server = patchbay.Server(("127.0.0.1", 0), app)
        self.port = self.server.server_address[1]
        self.url = "http://127.0.0.1:%d" % self.port
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
        self.app.close()


class ServeProcess:
    """`python3 patchbay.py serve --port 0` as a real child process."""

    def __init__(self, home: Path, roots: List[Path], extra: Tuple[str, ...] = (),
                 env: Optional[Dict[str, str]] = None, verbose: bool = True) -> None:
        argv = [sys.executable, str(SCRIPT), "--home", str(home)]
        argv += ["-v"] if verbose else []
        argv += ["serve", "--port", "0"]
        for r in roots:
            argv += ["--root", str(r)]
        argv += list(extra)
        self.stderr_path = home.parent / ("serve-stderr-%d.log" % time.monotonic_ns())
        self._stderr = open(self.stderr_path, "wb")
        full_env = dict(os.environ)
        full_env.pop(patchbay.ENV_TOKEN, None)
        full_env.update(env or {})
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._stderr,
                                     stdin=subprocess.DEVNULL, env=full_env)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("patchbay listening on http://"):
            self.proc.kill()
            raise AssertionError("serve did not start: %r %s" % (line, self.stderr()))
        self.url = line.split()[-1].rstrip("/")
        self.port = int(self.url.rsplit(":", 1)[1])

    def stderr(self) -> str:
        if not self._stderr.closed:
            self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(5)
        self._stderr.close()
        return code


def request(url: str, method: str = "GET", body: Any = None,
            headers: Optional[Dict[str, str]] = None,
            timeout: float = 30) -> Tuple[int, Dict[str, str], bytes]:
    """One HTTP request on a fresh connection; body may be bytes, str or a JSON value."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    if body is not None and not isinstance(body, (bytes, str)):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode()
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def post_json(url: str, obj: Any, token: Optional[str] = None,
              headers: Optional[Dict[str, str]] = None) -> Tuple[int, Dict[str, str], Any]:
    h = dict(JSON_HEADERS)
    if token:
        h["Authorization"] = "Bearer " + token
    h.update(headers or {})
    status, hdrs, data = request(url, "POST", obj, h)
    return status, hdrs, (json.loads(data) if data else None)


class Mcp:
    """A minimal MCP Streamable HTTP client for tests (the official SDK is tested too)."""

    def __init__(self, base: str, token: Optional[str] = None,
                 version: str = "2025-06-18") -> None:
        self.url = base.rstrip("/") + "/mcp"
        self.token = token
        self.version = version
        self.session: Optional[str] = None
        self._id = 0

    def headers(self) -> Dict[str, str]:
        h: Dict[str, str] = {}
        if self.session:
            h["Mcp-Session-Id"] = self.session
            h["MCP-Protocol-Version"] = self.version
        return h

    def initialize(self) -> Dict[str, Any]:
        status, hdrs, body = post_json(self.url, {
            "jsonrpc": "2.0", "id": 0, "method": "initialize",
            "params": {"protocolVersion": self.version, "capabilities": {},
                       "clientInfo": {"name": "pbtest", "version": "1"}}}, self.token)
        assert status == 200, (status, body)
        self.session = hdrs["mcp-session-id"]
        post_json(self.url, {"jsonrpc": "2.0", "method": "notifications/initialized"},
                  self.token, self.headers())
        return body["result"]

    def rpc(self, method: str, params: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        self._id += 1
        msg: Dict[str, Any] = {"jsonrpc": "2.0", "id": self._id, "method": method}
        if params is not None:
            msg["params"] = params
        status, _, body = post_json(self.url, msg, self.token, self.headers())
        assert status == 200, (status, body)
        return body

    def call(self, name: str, args: Optional[Dict[str, Any]] = None) -> Tuple[Dict[str, Any], bool]:
        """Return (structuredContent, isError) of a tools/call."""
        body = self.rpc("tools/call", {"name": name, "arguments": args or {}})
        result = body["result"]
        assert json.loads(result["content"][0]["text"]) == result["structuredContent"]
        return result["structuredContent"], result["isError"]


def action(base: str, name: str, args: Any, token: Optional[str] = None) -> Tuple[int, Any]:
    status, _, body = post_json(base.rstrip("/") + "/actions/" + name, args, token)
    return status, body


def both_doors(base: str, token: Optional[str] = None):  # type: ignore[no-untyped-def]
    """Yield ('mcp'|'actions', call) where call(name, args) -> (result, is_error)."""
    client = Mcp(base, token)
    client.initialize()
    yield "mcp", client.call

    def via_actions(name: str, args: Optional[Dict[str, Any]] = None) -> Tuple[Any, bool]:
        status, body = action(base, name, args or {}, token)
        return body, status != 200

    yield "actions", via_actions
