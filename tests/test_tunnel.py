"""Tunnels (SPEC §9, issue 5): `serve --tunnel ...` and `patchbay tunnel`, driven against
the fake `cloudflared` and `ngrok` in tests/fakes (they print what the real ones print and
serve nothing; everything here stays on loopback).

PatchBay starts a tunnel child with an allow-listed environment (no FAKE_TUNNEL_*), so each
test writes a small wrapper script that sets the fake's variables and `exec`s it: the pid
the fake records is the pid PatchBay started. One test uses the bare fake through
CLOUDFLARED_BIN. Every wait is bounded; every fake exits by itself after a minute at most.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any, Callable, Dict, Iterator, List, Optional, Tuple

import patchbay
import pytest
from pbtest import PATCHBAY_ENV, SCRIPT, ServeProcess, cli, one_error, post_json, request

PY = sys.executable
FAKES = Path(__file__).resolve().parent / "fakes"
READY = r"^patchbay tunnel ready: (https://\S+)$"
WAIT_S = 10.0
JSON_H = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}

# ---------------------------------------------------------------------------------------
# Helpers local to this file
# ---------------------------------------------------------------------------------------


def base_env(**extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in PATCHBAY_ENV}
    env.update(extra)
    return env


def register(home: Path, repo: Path) -> str:
    proc = cli(home, "channel", "register", "--workspace", str(repo))
    assert proc.returncode == 0, proc.stderr
    return str(config(home)["token"])


def config(home: Path) -> Dict[str, Any]:
    data: Dict[str, Any] = json.loads((home / "config.json").read_text())
    return data


class Fake:
    """A wrapper around tests/fakes/<tool> with the fake's settings baked in."""

    def __init__(self, tmp_path: Path, tool: str, die_first_after: Optional[float] = None,
                 **settings: str) -> None:
        self.record = tmp_path / ("%s-record.jsonl" % tool)
        self.path = tmp_path / ("%s-wrapper" % tool)
        env = {"FAKE_TUNNEL_RECORD": str(self.record), "FAKE_TUNNEL_MAX_S": "60"}
        env.update({"FAKE_TUNNEL_" + k.upper(): v for k, v in settings.items()})
        lines = ["#!/bin/sh"]
        lines += ["export %s=%s" % (k, shlex.quote(v)) for k, v in env.items()]
        if die_first_after is not None:  # only the first child dies: later ones stay up
            marker = shlex.quote(str(tmp_path / ("%s-died-once" % tool)))
            lines += ["if [ ! -e %s ]; then : > %s; export FAKE_TUNNEL_DIE_AFTER=%s; fi"
                      % (marker, marker, die_first_after)]
        lines.append('exec %s %s "$@"' % (shlex.quote(PY), shlex.quote(str(FAKES / tool))))
        self.path.write_text("\n".join(lines) + "\n")
        self.path.chmod(0o755)

    def events(self, kind: Optional[str] = None) -> List[Dict[str, Any]]:
        if not self.record.exists():
            return []
        out = [json.loads(line) for line in self.record.read_text().splitlines() if line]
        return [e for e in out if kind is None or e["event"] == kind]

    def starts(self) -> List[Dict[str, Any]]:
        return self.events("start")

    def pid(self) -> int:
        starts = self.starts()
        assert starts, "the fake was never started"
        pid: int = starts[-1]["pid"]
        return pid

    def kill_leftovers(self) -> None:
        for event in self.starts():
            if pid_alive(event["pid"]):
                try:
                    os.kill(event["pid"], signal.SIGKILL)
                except ProcessLookupError:
                    pass


class Lines:
    """Lines of a child's stdout, collected by a thread; wait_for is bounded."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.seen: List[str] = []
        self._queue: queue.Queue[Optional[str]] = queue.Queue()
        self._closed = False
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            self._queue.put(raw.decode("utf-8", "replace").rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float = WAIT_S) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._closed:
                raise AssertionError("no line matching %r within %.0f s; seen: %s"
                                     % (pattern, timeout, self.seen))
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                self._closed = True
                continue
            self.seen.append(line)
            m = re.search(pattern, line)
            if m:
                return m

    def drain(self, timeout: float = 1.0) -> List[str]:
        """Whatever else arrives (until the stream ends or `timeout` passes)."""
        deadline = time.monotonic() + timeout
        while not self._closed and time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                continue
            if line is None:
                self._closed = True
            else:
                self.seen.append(line)
        return self.seen


def pid_alive(pid: int) -> bool:
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def wait_gone(pid: int, timeout: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return False


def host_of(url: str) -> str:
    return url.split("://", 1)[1].rstrip("/")


def health_as(base: str, host: str) -> int:
    return request(base + "/health", headers={"Host": host})[0]


def workspace_as(base: str, host: str, token: Optional[str]) -> Tuple[int, Any]:
    status, _, body = post_json(base + "/actions/workspace", {}, token, {"Host": host})
    return status, body


@pytest.fixture
def serve(home: Path, repo: Path) -> Iterator[Callable[..., Tuple[ServeProcess, Lines]]]:
    """Factory: serve(*extra, roots=(), env=None) -> (server, its stdout lines)."""
    started: List[ServeProcess] = []

    def start(*extra: str, roots: Tuple[Path, ...] = (),
              env: Optional[Dict[str, str]] = None) -> Tuple[ServeProcess, Lines]:
        proc = ServeProcess(home, list(roots), tuple(extra), env)
        started.append(proc)
        assert proc.proc.stdout is not None
        return proc, Lines(proc.proc.stdout)

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def fakes(tmp_path: Path) -> Iterator[Callable[..., Fake]]:
    made: List[Fake] = []

    def make(tool: str = "cloudflared", **kw: Any) -> Fake:
        fake = Fake(tmp_path, tool, **kw)
        made.append(fake)
        return fake

    yield make
    for fake in made:
        fake.kill_leftovers()


# ---------------------------------------------------------------------------------------
# serve --tunnel cloudflare
# ---------------------------------------------------------------------------------------


def test_quick_tunnel_url_found_saved_and_allowed(repo: Path, home: Path, serve: Any,
                                                  fakes: Any) -> None:
    token = register(home, repo)
    fake = fakes("cloudflared", api_errors="3", host="amber-basin-cedar-delta")
    srv, out = serve("--tunnel", "cloudflare", "--tunnel-bin", str(fake.path))
    url = out.wait_for(READY).group(1)
    assert url == "https://amber-basin-cedar-delta.trycloudflare.com"
    out.wait_for(r"Auth Type: Bearer")  # the end of the ChatGPT settings block
    assert not [ln for ln in out.seen if "api.trycloudflare.com" in ln]
    starts = fake.starts()
    assert len(starts) == 1
    assert starts[0]["argv"] == ["tunnel", "--no-autoupdate", "--url",
                                 "http://127.0.0.1:%d" % srv.port]
    # what to paste into ChatGPT, with the token redacted
    text = "\n".join(out.seen)
    assert token not in text
    assert re.search(r"^\s+%s/mcp\?patchbay_token=<[^>]*patchbay token[^>]*>$"
                     % re.escape(url), text, re.M), text
    assert re.search(r"^\s+%s/openapi\.json$" % re.escape(url), text, re.M), text
    assert len([ln for ln in out.drain(0.3) if re.search(READY, ln)]) == 1
    # saved to the channel
    assert config(home)["public_base_url"] == url
    assert os.stat(home / "config.json").st_mode & 0o077 == 0
    # the Host allow list follows it
    host = host_of(url)
    assert health_as(srv.url, host) == 200
    st, body = workspace_as(srv.url, host, token)
    assert st == 200 and body["workspace"] == "repo", body
    assert workspace_as(srv.url, host, None)[0] == 401
    assert health_as(srv.url, "other-word-here-now.trycloudflare.com") == 421
    assert health_as(srv.url, "api.trycloudflare.com") == 421
    assert workspace_as(srv.url, "evil.example", token)[0] == 421
    # the schema advertises the tunnel
    st, _, body = request(srv.url + "/openapi.json", headers={"Host": host})
    assert st == 200 and json.loads(body)["servers"][0]["url"] == url
    st, _, body = request(srv.url + "/openapi.json")
    assert json.loads(body)["servers"][0]["url"] == url


def test_bare_fake_from_cloudflared_bin(repo: Path, home: Path, serve: Any) -> None:
    """The fake as it is in tests/fakes, found through CLOUDFLARED_BIN (no --tunnel-bin)."""
    token = register(home, repo)
    srv, out = serve("--tunnel", "cloudflare",
                     env={"CLOUDFLARED_BIN": str(FAKES / "cloudflared")})
    url = out.wait_for(READY).group(1)
    assert re.fullmatch(r"https://[a-z]+(-[a-z]+){3}\.trycloudflare\.com", url), url
    assert config(home)["public_base_url"] == url
    assert workspace_as(srv.url, host_of(url), token)[0] == 200
    assert srv.stop() == 0


@pytest.mark.parametrize("argv", [
    ["serve", "--port", "0", "--tunnel", "cloudflare"],
    ["serve", "--port", "0", "--tunnel", "ngrok"],
    ["serve", "--port", "0", "--tunnel", "cloudflare-named", "--hostname", "pb.example.com"],
    ["tunnel", "cloudflare", "--port", "9"],
])
def test_refuses_tunnel_without_token(tmp_path: Path, repo: Path, home: Path, fakes: Any,
                                      argv: List[str]) -> None:
    fake = fakes("ngrok" if "ngrok" in argv else "cloudflared")
    roots = ["--root", str(repo)] if argv[0] == "serve" else []
    proc = cli(home, *argv, *roots, "--tunnel-bin", str(fake.path))
    line = one_error(proc)
    assert "token" in line and "channel register" in line
    assert not fake.record.exists()  # never started


def test_refuses_tunnel_with_empty_token_file(tmp_path: Path, repo: Path, home: Path,
                                              fakes: Any) -> None:
    fake = fakes()
    empty = tmp_path / "empty-token"
    empty.write_text("\n")
    one_error(cli(home, "serve", "--port", "0", "--root", str(repo), "--tunnel", "cloudflare",
                  "--tunnel-bin", str(fake.path), "--token-file", str(empty)))
    assert not fake.record.exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_ends_server_and_tunnel_child(repo: Path, home: Path, serve: Any,
                                             fakes: Any, signum: int) -> None:
    register(home, repo)
    fake = fakes()
    srv, out = serve("--tunnel", "cloudflare", "--tunnel-bin", str(fake.path))
    out.wait_for(READY)
    pid = fake.pid()
    assert pid_alive(pid)
    srv.proc.send_signal(signum)
    assert srv.proc.wait(WAIT_S) == 0
    assert wait_gone(pid), "tunnel child %d outlived the server" % pid
    signals = [e for e in fake.events("signal") if e["pid"] == pid]
    assert [e["signal"] for e in signals] == ["SIGTERM"], fake.events()
    assert not fake.events("exit")  # it was stopped, it did not die of its own accord
    assert len(fake.starts()) == 1  # and it was not restarted on the way out


def test_dying_tunnel_is_restarted_with_new_url(repo: Path, home: Path, serve: Any,
                                                fakes: Any) -> None:
    token = register(home, repo)
    fake = fakes(die_first_after=1)  # no FAKE_TUNNEL_HOST: the host comes from the pid
    srv, out = serve("--tunnel", "cloudflare", "--tunnel-bin", str(fake.path))
    first = out.wait_for(READY).group(1)
    second = out.wait_for(READY, timeout=15).group(1)
    assert first != second
    starts = fake.starts()
    assert len(starts) == 2 and starts[0]["pid"] != starts[1]["pid"]
    exits = fake.events("exit")
    assert exits and exits[0]["pid"] == starts[0]["pid"] and exits[0]["code"] == 1
    assert not pid_alive(starts[0]["pid"])
    # the server said so, and follows the new URL
    err = srv.stderr()
    assert re.search(r"tunnel: cloudflared exited with status 1; restarting", err), err
    assert config(home)["public_base_url"] == second
    assert health_as(srv.url, host_of(second)) == 200
    assert workspace_as(srv.url, host_of(second), token)[0] == 200
    assert health_as(srv.url, host_of(first)) == 421
    st, _, body = request(srv.url + "/openapi.json")
    assert json.loads(body)["servers"][0]["url"] == second
    assert srv.stop() == 0
    assert wait_gone(starts[1]["pid"])


# ---------------------------------------------------------------------------------------
# ngrok and named Cloudflare tunnels
# ---------------------------------------------------------------------------------------


def test_ngrok_fixed_hostname(repo: Path, home: Path, serve: Any, fakes: Any) -> None:
    token = register(home, repo)
    fake = fakes("ngrok", api_errors="2")
    srv, out = serve("--tunnel", "ngrok", "--hostname", "fixed.ngrok-free.app",
                     "--tunnel-bin", str(fake.path))
    url = out.wait_for(READY).group(1)
    assert url == "https://fixed.ngrok-free.app"
    assert fake.starts()[0]["argv"] == ["http", str(srv.port), "--log", "stdout",
                                        "--log-format", "json", "--url",
                                        "fixed.ngrok-free.app"]
    assert config(home)["public_base_url"] == url
    assert health_as(srv.url, "fixed.ngrok-free.app") == 200
    assert workspace_as(srv.url, "fixed.ngrok-free.app", token)[0] == 200
    assert health_as(srv.url, "other.ngrok-free.app") == 421
    assert srv.stop() == 0
    assert wait_gone(fake.pid())


def test_ngrok_url_from_json_log(repo: Path, home: Path, serve: Any, fakes: Any) -> None:
    register(home, repo)
    fake = fakes("ngrok", host="abcd-203-0-113-7")
    srv, out = serve("--tunnel", "ngrok", "--tunnel-bin", str(fake.path))
    assert out.wait_for(READY).group(1) == "https://abcd-203-0-113-7.ngrok-free.app"
    assert "--url" not in fake.starts()[0]["argv"]
    assert health_as(srv.url, "abcd-203-0-113-7.ngrok-free.app") == 200


def test_cloudflare_named_needs_hostname(repo: Path, home: Path, fakes: Any) -> None:
    register(home, repo)
    fake = fakes()
    line = one_error(cli(home, "serve", "--port", "0", "--tunnel", "cloudflare-named",
                         "--tunnel-name", "pb", "--tunnel-bin", str(fake.path)))
    assert "--hostname" in line
    assert not fake.record.exists()


def test_cloudflare_named_with_hostname(repo: Path, home: Path, serve: Any,
                                        fakes: Any) -> None:
    token = register(home, repo)
    fake = fakes()
    srv, out = serve("--tunnel", "cloudflare-named", "--hostname", "pb.example.com",
                     "--tunnel-name", "pb", "--tunnel-bin", str(fake.path))
    assert out.wait_for(READY).group(1) == "https://pb.example.com"
    argv = fake.starts()[0]["argv"]
    assert argv[0] == "tunnel" and "run" in argv and argv[-1] == "pb", argv
    assert workspace_as(srv.url, "pb.example.com", token)[0] == 200
    assert config(home)["public_base_url"] == "https://pb.example.com"
    # four "Registered tunnel connection" lines, one announcement
    assert len([ln for ln in out.drain(0.3) if re.search(READY, ln)]) == 1


def test_cloudflare_token_file_goes_to_env_not_argv(tmp_path: Path, repo: Path, home: Path,
                                                    serve: Any, fakes: Any) -> None:
    """A named tunnel's credential (profile key cloudflare_token_file) reaches cloudflared
    as TUNNEL_TOKEN in its environment: never in argv, logs or PatchBay's state."""
    register(home, repo)
    secret = "eyJhIjoi" + patchbay.new_token()
    token_file = tmp_path / "cf-token"
    token_file.write_text(secret + "\n")
    profile = tmp_path / "named.json"
    profile.write_text(json.dumps({"extends": "worker",
                                   "cloudflare_token_file": str(token_file)}))
    fake = fakes()
    srv, out = serve("--profile", str(profile), "--tunnel", "cloudflare-named", "--hostname",
                     "pb.example.com", "--tunnel-bin", str(fake.path))
    assert out.wait_for(READY).group(1) == "https://pb.example.com"
    environ = Path("/proc/%d/environ" % fake.pid()).read_bytes().split(b"\0")
    assert b"TUNNEL_TOKEN=" + secret.encode() in environ
    assert secret not in json.dumps(fake.starts()[0]["argv"])
    assert srv.stop() == 0
    assert secret not in srv.stderr() + "\n".join(out.drain())
    assert [n for n, data in files_under(home).items() if secret.encode() in data] == []


@pytest.mark.parametrize("argv,install", [
    (["serve", "--port", "0", "--tunnel", "cloudflare"], "cloudflared"),
    (["serve", "--port", "0", "--tunnel", "ngrok"], "ngrok"),
    (["tunnel", "cloudflare", "--port", "9"], "cloudflared"),
    (["tunnel", "ngrok", "--port", "9"], "ngrok"),
])
def test_missing_binary_says_how_to_install(repo: Path, home: Path, argv: List[str],
                                            install: str) -> None:
    register(home, repo)
    line = one_error(cli(home, *argv, "--tunnel-bin", "/nonexistent/%s" % install))
    assert "not found" in line and "install" in line and install in line
    assert "never downloads" in line


# ---------------------------------------------------------------------------------------
# The token: never in a log, never in a state file but config.json
# ---------------------------------------------------------------------------------------


def files_under(home: Path) -> Dict[str, bytes]:
    out: Dict[str, bytes] = {}
    for dirpath, _dirs, names in os.walk(home):
        for name in names:
            path = Path(dirpath) / name
            if path.is_file():
                out[str(path.relative_to(home))] = path.read_bytes()
    return out


def test_token_in_no_log_and_no_state_file(repo: Path, home: Path, serve: Any,
                                           fakes: Any) -> None:
    token = register(home, repo)
    fake = fakes(api_errors="1")
    srv, out = serve("--tunnel", "cloudflare", "--tunnel-bin", str(fake.path),
                     "--save-profile", "tunnelled")  # -v: requests are logged
    url = out.wait_for(READY).group(1)
    host = host_of(url)
    pid = fake.pid()
    environ = Path("/proc/%d/environ" % pid).read_bytes()
    # calls through the tunnel's Host: bearer, query token, a wrong token, MCP
    assert workspace_as(srv.url, host, token)[0] == 200
    assert workspace_as(srv.url, host, token[:-2] + "xy")[0] == 401
    init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "test_tunnel", "version": "1"}}}
    st, hdrs, _ = request(srv.url + "/mcp?patchbay_token=" + token, "POST", init,
                          dict(JSON_H, Host=host))
    assert st == 200
    session = {"Mcp-Session-Id": hdrs["mcp-session-id"], "MCP-Protocol-Version": "2025-06-18"}
    st, _, body = request(srv.url + "/mcp?patchbay_token=" + token, "POST", {
        "jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "read_file", "arguments": {"path": "README.md"}}},
        dict(JSON_H, Host=host, **session))
    assert st == 200 and not json.loads(body)["result"]["isError"]
    assert request(srv.url + "/mcp/?patchbay_token=" + token + "zz", "POST", init,
                   dict(JSON_H, Host=host))[0] == 401
    assert srv.stop() == 0
    stdout = "\n".join(out.drain())
    stderr = srv.stderr()
    assert "tunnel:" in stderr and "trycloudflare.com" in stderr  # tunnel output is logged
    assert "/mcp" in stderr  # and so are the requests (-v)
    assert token not in stdout, stdout
    assert token not in stderr, stderr
    assert token.encode() not in environ  # the child never had it
    assert token not in fake.record.read_text()
    files = files_under(home)
    assert token.encode() in files["config.json"]
    assert "runtime/audit.jsonl" in files and "profiles/tunnelled.json" in files, list(files)
    leaked = [name for name, data in files.items()
              if name != "config.json" and token.encode() in data]
    assert leaked == []


def test_env_token_stays_out_of_tunnel_child_and_files(repo: Path, home: Path, serve: Any,
                                                       fakes: Any) -> None:
    token = patchbay.new_token()
    fake = fakes()
    srv, out = serve("--tunnel", "cloudflare", "--tunnel-bin", str(fake.path), roots=(repo,),
                     env={patchbay.ENV_TOKEN: token})
    url = out.wait_for(READY).group(1)
    environ = Path("/proc/%d/environ" % fake.pid()).read_bytes()
    assert token.encode() not in environ
    assert patchbay.ENV_TOKEN.encode() not in environ
    assert workspace_as(srv.url, host_of(url), token)[0] == 200
    assert config(home)["public_base_url"] == url
    assert srv.stop() == 0
    assert token not in "\n".join(out.drain()) + srv.stderr()
    # A quick tunnel's URL dies with it: the channel no longer advertises it.
    assert config(home)["public_base_url"] == ""
    assert [n for n, data in files_under(home).items() if token.encode() in data] == []


def test_reveal_token_prints_a_working_mcp_url(repo: Path, home: Path, serve: Any,
                                               fakes: Any) -> None:
    token = register(home, repo)
    fake = fakes(host="cedar-delta-ember-fjord")
    srv, out = serve("--tunnel", "cloudflare", "--tunnel-bin", str(fake.path),
                     "--reveal-token")
    url = out.wait_for(READY).group(1)
    mcp_url = out.wait_for(r"^\s+(https://\S+/mcp\?patchbay_token=\S+)$").group(1)
    assert mcp_url == "%s/mcp?patchbay_token=%s" % (url, token)
    path = mcp_url[len(url):]
    init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "test_tunnel", "version": "1"}}}
    st, hdrs, _ = request(srv.url + path, "POST", init, dict(JSON_H, Host=host_of(url)))
    assert st == 200 and hdrs.get("mcp-session-id")


# ---------------------------------------------------------------------------------------
# `patchbay tunnel` for a server that is already running
# ---------------------------------------------------------------------------------------


def test_tunnel_command_for_running_server(repo: Path, home: Path, serve: Any,
                                           fakes: Any) -> None:
    token = register(home, repo)
    fake = fakes(host="island-juniper-kettle-lagoon")
    srv, _ = serve()
    host = "island-juniper-kettle-lagoon.trycloudflare.com"
    assert health_as(srv.url, host) == 421
    proc = subprocess.Popen([PY, str(SCRIPT), "--home", str(home), "tunnel", "cloudflare",
                             "--port", str(srv.port), "--tunnel-bin", str(fake.path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=base_env())
    try:
        assert proc.stdout is not None
        out = Lines(proc.stdout)
        url = out.wait_for(READY).group(1)
        assert url == "https://" + host
        assert fake.starts()[0]["argv"][-1] == "http://127.0.0.1:%d" % srv.port
        assert config(home)["public_base_url"] == url
        # the running server takes the new Host at once
        assert health_as(srv.url, host) == 200
        st, body = workspace_as(srv.url, host, token)
        assert st == 200 and body["workspace"] == "repo"
        st, _, body = request(srv.url + "/openapi.json", headers={"Host": host})
        assert json.loads(body)["servers"][0]["url"] == url
        pid = fake.pid()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT_S) == 0
        assert wait_gone(pid)
        assert [e["signal"] for e in fake.events("signal")] == ["SIGTERM"]
        assert proc.stderr is not None
        assert token not in "\n".join(out.drain()) + proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
