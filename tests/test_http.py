"""Real-HTTP attack and behaviour tests (SPEC §5, reference/security.md: Auth, Network
exposure, HTTP parsing).

Every request goes over a real loopback socket to a real `Server` (in-process, via the
`start_server` fixture) or to a real `patchbay.py serve` child (`serve_process`). Where a
rule applies to both front doors, it is checked on MCP (`/mcp`) and on Actions
(`/actions/<tool>`). After every attack the server must still answer `GET /health`.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import patchbay
import pytest
from pbtest import SCRIPT, Mcp, post_json, request

# ---------------------------------------------------------------------------------------
# Helpers local to this file
# ---------------------------------------------------------------------------------------

VERSION = "2025-06-18"
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": VERSION, "capabilities": {},
                   "clientInfo": {"name": "test_http", "version": "1"}}}
INIT_BYTES = json.dumps(INIT).encode()
CALL_WORKSPACE = {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                  "params": {"name": "workspace", "arguments": {}}}
# The two front doors, each as (path, a valid JSON body that reaches a tool or a session).
DOORS: Dict[str, Tuple[str, bytes]] = {
    "mcp": ("/mcp", INIT_BYTES),
    "actions": ("/actions/workspace", b"{}"),
}
WWW_AUTH = 'Bearer realm="patchbay"'

Headers = Dict[str, str]
Response = Tuple[int, Headers, bytes]


def health(url: str) -> None:
    """The server is still alive and answering."""
    status, _, body = request(url + "/health", timeout=5)
    assert status == 200, (status, body)
    assert json.loads(body)["ok"] is True


def read_response(sock: socket.socket) -> Response:
    """Read one HTTP/1.1 response (headers + Content-Length body) from a raw socket."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError("connection closed before a full response: %r" % buf[:300])
        buf += chunk
        assert len(buf) < 1 << 20
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: Headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        key = key.strip().lower()
        headers[key] = (headers[key] + ", " if key in headers else "") + value.strip()
    size = int(headers.get("content-length", "0"))
    while len(body) < size:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def raw(port: int, data: bytes, timeout: float = 5.0) -> Response:
    """Send exact bytes to 127.0.0.1:port and read one response."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        return read_response(sock)


def build(port: int, method: str, path: str, body: Optional[bytes] = None,
          headers: Optional[List[Tuple[str, Any]]] = None, host: Any = None,
          json_headers: bool = True, content_length: bool = True) -> bytes:
    """A request as bytes. Header values may be bytes (sent verbatim, e.g. non-ASCII).

    host=None sends `Host: 127.0.0.1:<port>`; host=False sends no Host header at all.
    """
    out = [("%s %s HTTP/1.1" % (method, path)).encode()]
    if host is not False:
        out.append(b"Host: " + (host or "127.0.0.1:%d" % port).encode("latin-1"))
    if json_headers:
        out.append(b"Content-Type: application/json")
        out.append(b"Accept: application/json, text/event-stream")
    for key, value in headers or []:
        out.append(key.encode() + b": " + (value if isinstance(value, bytes)
                                          else value.encode("latin-1")))
    if body is not None and content_length:
        out.append(b"Content-Length: %d" % len(body))
    out.append(b"Connection: close")
    return b"\r\n".join(out) + b"\r\n\r\n" + (body or b"")


def door_raw(port: int, door: str, **kw: Any) -> Response:
    path, body = DOORS[door]
    path = path + kw.pop("suffix", "")
    body = kw.pop("body", body)
    return raw(port, build(port, kw.pop("method", "POST"), path, body, **kw))


def mcp_workspace(base: str, token: Optional[str] = None, headers: Optional[Headers] = None,
                  query: str = "") -> Tuple[int, Any]:
    """initialize + tools/call workspace over /mcp; (status, body) of the first failure or
    of the tools/call."""
    url = base + "/mcp" + query
    status, hdrs, body = post_json(url, INIT, token, headers)
    if status != 200:
        return status, body
    session = dict(headers or {})
    session.update({"Mcp-Session-Id": hdrs["mcp-session-id"], "MCP-Protocol-Version": VERSION})
    status, _, body = post_json(url, {"jsonrpc": "2.0", "method": "notifications/initialized"},
                                token, session)
    assert status == 202, (status, body)
    status, _, body = post_json(url, CALL_WORKSPACE, token, session)
    return status, body


def actions_workspace(base: str, token: Optional[str] = None, headers: Optional[Headers] = None,
                      query: str = "") -> Tuple[int, Any]:
    status, _, body = post_json(base + "/actions/workspace" + query, {}, token, headers)
    return status, body


def call_door(door: str, base: str, **kw: Any) -> Tuple[int, Any]:
    return (mcp_workspace if door == "mcp" else actions_workspace)(base, **kw)


def assert_tool_ran(door: str, status: int, body: Any) -> None:
    assert status == 200, (door, status, body)
    if door == "mcp":
        assert body["result"]["isError"] is False, body
        assert "branch" in json.dumps(body["result"]["structuredContent"])
    else:
        assert "error" not in body, body


def audit_lines(home: Path) -> List[Dict[str, Any]]:
    path = home / "runtime" / "audit.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_private(path: Path, text: str) -> None:
    """Write a 0600 file atomically (temp + rename), as PatchBay itself does."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name("." + path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_profile(home: Path, name: str, data: Dict[str, Any]) -> str:
    write_private(home / "profiles" / (name + ".json"), json.dumps(data))
    return name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def closed_within(sock: socket.socket, limit: float, feed: Optional[bytes] = None,
                  interval: float = 0.25) -> Optional[float]:
    """Seconds until the server closes (or answers on) sock, or None if it is still open
    after `limit`. With `feed`, one byte of it is sent every `interval` (a slowloris)."""
    start = time.monotonic()
    pending = list(feed or b"")
    while time.monotonic() - start < limit:
        if feed is not None and pending:
            try:
                sock.send(bytes([pending.pop(0)]))
            except OSError:
                return time.monotonic() - start
        ready, _, _ = select.select([sock], [], [], interval)
        if ready:
            try:
                sock.recv(65536)
            except OSError:
                pass
            return time.monotonic() - start  # EOF, reset or an answer: the server let go
    return None


@pytest.fixture
def token() -> str:
    return patchbay.new_token()


@pytest.fixture
def server_log(caplog, capsys, monkeypatch):  # type: ignore[no-untyped-def]
    """Turn on the in-process server's info (access) log, as `serve -v` does, and return a
    function giving everything it wrote so far (stdlib logging or plain stderr lines)."""
    caplog.set_level(logging.INFO, logger=patchbay.NAME)
    if hasattr(patchbay.log, "verbose"):
        monkeypatch.setattr(patchbay.log, "verbose", True)
    seen: List[str] = []

    def text() -> str:
        seen.append(capsys.readouterr().err)
        return caplog.text + "".join(seen)

    return text


# ---------------------------------------------------------------------------------------
# Auth
# ---------------------------------------------------------------------------------------

def test_missing_wrong_and_malformed_tokens_get_one_identical_401(start_server, home, token):
    srv = start_server(token=token)
    port = srv.port
    routes = [("POST", "/mcp", INIT_BYTES), ("POST", "/mcp/", INIT_BYTES), ("GET", "/mcp", None),
              ("DELETE", "/mcp", None), ("POST", "/actions/workspace", b"{}"),
              ("POST", "/actions/read_file", b'{"path": "README.md"}'),
              ("POST", "/actions/no_such_tool", b"{}"), ("GET", "/no/such/route", None),
              ("PUT", "/mcp", b"{}")]
    creds: List[Tuple[str, List[Tuple[str, Any]], str]] = [
        ("missing", [], ""),
        ("wrong", [("Authorization", "Bearer " + patchbay.new_token())], ""),
        ("longer", [("Authorization", "Bearer " + token + "x")], ""),
        ("prefix", [("Authorization", "Bearer " + token[:-1])], ""),
        ("empty bearer", [("Authorization", "Bearer ")], ""),
        ("no scheme", [("Authorization", token)], ""),
        ("basic", [("Authorization", "Basic dXNlcjpwYXNz")], ""),
        ("utf-8 bytes", [("Authorization", "Bearer tökén".encode())], ""),
        ("latin-1 bytes", [("Authorization", "Bearer tökén".encode("latin-1"))], ""),
        ("invalid utf-8", [("Authorization", b"Bearer \xff\xfe\x80" + token.encode())], ""),
        ("two headers", [("Authorization", "Bearer " + token),
                         ("Authorization", "Bearer " + token)], ""),
        ("wrong query", [], "?patchbay_token=" + patchbay.new_token()),
        ("empty query", [], "?patchbay_token="),
        ("non-ascii query", [], "?patchbay_token=t%C3%B6k%C3%A9n"),
        ("bad utf-8 query", [], "?patchbay_token=%FF%FE"),
        ("two query tokens", [], "?patchbay_token=%s&patchbay_token=%s" % (token, token)),
    ]
    bodies = set()
    for label, headers, query in creds:
        for method, path, body in routes:
            status, hdrs, data = raw(port, build(port, method, path + query, body, headers))
            where = (label, method, path)
            assert status == 401, (where, status, data)
            assert hdrs.get("www-authenticate") == WWW_AUTH, (where, hdrs)
            assert hdrs.get("content-type") == "application/json", where
            assert "access-control-allow-origin" not in hdrs, where
            bodies.add(data)
    assert len(bodies) == 1, bodies  # byte-identical: no oracle for "missing" vs "wrong"
    assert json.loads(bodies.pop())["error"] == "unauthorized"
    assert audit_lines(home) == []  # no tool ran
    health(srv.url)


def test_right_token_as_bearer_and_as_query_reaches_both_doors(start_server, home, token):
    srv = start_server(token=token)
    for door in DOORS:
        assert_tool_ran(door, *call_door(door, srv.url, token=token))
        assert_tool_ran(door, *call_door(door, srv.url, query="?patchbay_token=" + token))
        # The auth scheme is case-insensitive (RFC 7235).
        assert_tool_ran(door, *call_door(door, srv.url,
                                         headers={"Authorization": "bearer " + token}))
    doors = sorted({line["door"] for line in audit_lines(home)})
    assert doors == ["actions", "mcp"]
    health(srv.url)


def test_allow_query_token_false_in_a_profile_disables_the_query_form(start_server, home, token):
    name = write_profile(home, "noquery", {"extends": "worker", "allow_query_token": False})
    srv = start_server(profile=name, token=token)
    assert srv.app.cfg.allow_query_token is False
    for door in DOORS:
        status, body = call_door(door, srv.url, query="?patchbay_token=" + token)
        assert status == 401, (door, status, body)
        assert_tool_ran(door, *call_door(door, srv.url, token=token))
    health(srv.url)


def test_a_session_id_is_not_a_credential(start_server, token):
    srv = start_server(token=token)
    status, hdrs, _ = post_json(srv.url + "/mcp", INIT, token)
    assert status == 200
    sid = hdrs["mcp-session-id"]
    status, hdrs, body = post_json(srv.url + "/mcp", CALL_WORKSPACE, None,
                                   {"Mcp-Session-Id": sid, "MCP-Protocol-Version": VERSION})
    assert status == 401, (status, body)
    assert hdrs.get("www-authenticate") == WWW_AUTH
    health(srv.url)


# ---------------------------------------------------------------------------------------
# Tokens never reach logs (real process, -v)
# ---------------------------------------------------------------------------------------

def test_tokens_never_reach_the_stderr_log_or_the_audit_log(serve_process, home, token):
    wrong = patchbay.new_token()
    proc = serve_process(env={patchbay.ENV_TOKEN: token})
    base, port = proc.url, proc.port
    q = "?patchbay_token=" + token
    for door in DOORS:
        assert_tool_ran(door, *call_door(door, base, query=q))
        assert_tool_ran(door, *call_door(door, base, token=token))
        assert call_door(door, base, query="?patchbay_token=" + wrong)[0] == 401
        assert call_door(door, base, token=wrong)[0] == 401
    # A tool argument that happens to be the token (audit keeps string arguments).
    status, _, _ = post_json(base + "/actions/search" + q, {"query": token})
    assert status == 200
    # A malformed request line carrying the token: the stdlib logs the raw line on errors.
    status, _, _ = raw(port, b"GET /mcp?patchbay_token=" + token.encode()
                       + b" HTTP/1.1 junk\r\n\r\n")
    assert status == 400
    health(base)
    assert proc.stop() == 0
    log = proc.stderr_path.read_text(errors="replace")  # stderr() needs the file open
    audit = (home / "runtime" / "audit.jsonl").read_text()
    assert "/actions/workspace" in log and "/mcp" in log  # -v access logging is on
    assert '"door":"actions"' in audit and '"door":"mcp"' in audit and "search" in audit
    for secret in (token, wrong):
        assert secret not in log, [line for line in log.splitlines() if secret in line]
        assert secret not in audit
    assert "Traceback" not in log


def test_a_token_pasted_into_the_url_path_is_not_logged(start_server, token, server_log):
    # A connector URL with '&' (or ';') where '?' belongs puts the token in the path, which
    # the access log writes out; the redactor knows the token and must still remove it.
    srv = start_server(token=token)
    port = srv.port
    for sep in ("&", ";", "/"):
        for door in DOORS:
            path = DOORS[door][0] + sep + "patchbay_token=" + token
            status, _, _ = raw(port, build(port, "POST", path, DOORS[door][1]))
            assert status == 401, (path, status)
    health(srv.url)
    logged = server_log()
    assert "POST /mcp" in logged  # the access log is on (and writes paths)
    assert token not in logged, [line for line in logged.splitlines() if token in line]


# ---------------------------------------------------------------------------------------
# Network exposure: Host, Origin, CORS, content type
# ---------------------------------------------------------------------------------------

def test_bad_host_is_421_and_runs_no_tool(start_server, home, token):
    srv = start_server(token=token)
    port = srv.port
    auth = [("Authorization", "Bearer " + token)]
    bad_hosts = ["evil.example", "evil.example:%d" % port, "127.0.0.1:1", "localhost",
                 "127.0.0.1.evil.example:%d" % port, "127.0.0.1:%d.evil.example" % port,
                 "127.0.0.1:%d@evil.example" % port, "0.0.0.0:%d" % port]
    for door in DOORS:
        for host in bad_hosts:
            status, hdrs, data = door_raw(port, door, headers=auth, host=host)
            assert status == 421, (door, host, status, data)
            assert json.loads(data)["error"] == "misdirected"
        status, _, data = door_raw(port, door, headers=auth, host=False)  # no Host at all
        assert status == 421, (door, "no Host", status, data)
    assert audit_lines(home) == []  # nothing ran
    for door in DOORS:
        for host in ("localhost:%d" % port, "127.0.0.1:%d" % port, "LOCALHOST:%d" % port):
            assert_tool_ran(door, *call_door(door, srv.url, token=token,
                                             headers={"Host": host}))
    health(srv.url)


def test_bad_origin_is_403_and_no_cors_headers_without_allowed_origins(start_server, token):
    srv = start_server(token=token)
    port = srv.port
    auth = [("Authorization", "Bearer " + token)]
    bad = ["http://evil.example", "null", "https://evil.example:%d" % port,
           "http://127.0.0.1:%d.evil.example" % port, "http://127.0.0.1:1", "file://",
           "chrome-extension://abcdef"]
    for door in DOORS:
        for origin in bad:
            status, hdrs, data = door_raw(port, door, headers=auth + [("Origin", origin)])
            assert status == 403, (door, origin, status, data)
            assert json.loads(data)["error"] == "forbidden_origin"
            assert not any(k.startswith("access-control-") for k in hdrs), hdrs
        for own in ("http://127.0.0.1:%d" % port, "http://localhost:%d" % port):
            assert_tool_ran(door, *call_door(door, srv.url, token=token,
                                             headers={"Origin": own}))
            status, hdrs, _ = door_raw(port, door, headers=auth + [("Origin", own)])
            assert status == 200
            assert not any(k.startswith("access-control-") for k in hdrs), hdrs
    # No preflight is ever granted without allowed_origins, not even for our own origin.
    for origin in ("http://127.0.0.1:%d" % port, None):
        hdrs_in = [("Origin", origin), ("Access-Control-Request-Method", "POST")] if origin \
            else []
        status, hdrs, _ = raw(port, build(port, "OPTIONS", "/mcp", headers=hdrs_in))
        assert status != 204 and status < 500, (origin, status)
        assert not any(k.startswith("access-control-") for k in hdrs), hdrs
    health(srv.url)


def test_allowed_origins_profile_enables_cors_for_listed_origins_only(start_server, home,
                                                                      token):
    listed = "https://chat.openai.com"
    name = write_profile(home, "cors", {"extends": "worker", "allowed_origins": [listed + "/"]})
    srv = start_server(profile=name, token=token)
    port = srv.port
    auth = [("Authorization", "Bearer " + token)]
    preflight = [("Access-Control-Request-Method", "POST"),
                 ("Access-Control-Request-Headers", "authorization, content-type")]
    for door in DOORS:
        path = DOORS[door][0]
        # Preflight: 204 only for the listed origin, and it needs no token.
        status, hdrs, _ = raw(port, build(port, "OPTIONS", path,
                                          headers=[("Origin", listed)] + preflight))
        assert status == 204, (door, status)
        assert hdrs.get("access-control-allow-origin") == listed
        assert "POST" in hdrs.get("access-control-allow-methods", "")
        assert "authorization" in hdrs.get("access-control-allow-headers", "").lower()
        status, hdrs, _ = raw(port, build(port, "OPTIONS", path, headers=[
            ("Origin", "http://evil.example")] + preflight))
        assert status == 403, (door, status)
        assert "access-control-allow-origin" not in hdrs
        status, hdrs, _ = raw(port, build(port, "OPTIONS", path, headers=preflight))
        assert status != 204 and "access-control-allow-origin" not in hdrs
        # Actual requests: the listed origin gets ACAO, others are refused without it.
        assert_tool_ran(door, *call_door(door, srv.url, token=token,
                                         headers={"Origin": listed}))
        status, hdrs, _ = door_raw(port, door, headers=auth + [("Origin", listed)])
        assert status == 200
        assert hdrs.get("access-control-allow-origin") == listed
        assert "origin" in hdrs.get("vary", "").lower()
        status, hdrs, _ = door_raw(port, door, headers=auth + [("Origin", "http://evil.example")])
        assert status == 403 and "access-control-allow-origin" not in hdrs
        # A listed origin still needs the token.
        status, hdrs, _ = door_raw(port, door, headers=[("Origin", listed)])
        assert status == 401
        # No Origin, no CORS headers.
        status, hdrs, _ = door_raw(port, door, headers=auth)
        assert status == 200 and "access-control-allow-origin" not in hdrs
    health(srv.url)


@pytest.mark.parametrize("ctype,body", [
    ("text/plain", b'{"jsonrpc": "2.0", "id": 1, "method": "initialize"}='),
    ("application/x-www-form-urlencoded", b"a=b"),
    ("multipart/form-data; boundary=x", b"--x\r\nContent-Disposition: form-data; "
                                        b"name=\"a\"\r\n\r\nb\r\n--x--\r\n"),
    (None, b"{}"),
])
def test_cross_site_simple_post_is_415_on_both_doors(start_server, home, ctype, body):
    # No token: the loopback case that a web page in the user's browser can reach.
    srv = start_server()
    port = srv.port
    browser = [("Accept", "text/html,application/xhtml+xml,*/*;q=0.8")]
    if ctype:
        browser.append(("Content-Type", ctype))
    for door in DOORS:
        status, hdrs, data = door_raw(port, door, body=body, headers=browser,
                                      json_headers=False)
        assert status == 415, (door, ctype, status, data)
        assert json.loads(data)["error"] == "unsupported_media_type"
    assert audit_lines(home) == []
    # application/json with parameters and odd case is still JSON.
    status, _, _ = raw(port, build(port, "POST", "/actions/workspace", b"{}", json_headers=False,
                                   headers=[("Content-Type", "Application/JSON; charset=utf-8")]))
    assert status == 200
    health(srv.url)


def test_bodyless_text_plain_post_runs_no_tool(start_server, home):
    # <form method=post enctype=text/plain> with no fields sends Content-Length: 0.
    srv = start_server()
    for door in DOORS:
        status, _, data = door_raw(srv.port, door, body=b"", json_headers=False,
                                   headers=[("Content-Type", "text/plain")])
        assert 400 <= status < 500, (door, status, data)  # 415 expected; MCP says 400
    assert audit_lines(home) == []
    health(srv.url)


# ---------------------------------------------------------------------------------------
# HTTP parsing
# ---------------------------------------------------------------------------------------

def test_body_over_the_cap_is_413(start_server, home):
    srv = start_server(limits={"body_bytes": 1024})
    port = srv.port
    for door in DOORS:
        # Declared too large: answered at once, without waiting for the body.
        status, hdrs, data = raw(port, build(port, "POST", DOORS[door][0],
                                             headers=[("Content-Length", "5000")]))
        assert status == 413, (door, status, data)
        assert hdrs.get("connection", "").lower() == "close"
        # Really sent: one byte over the cap.
        body = DOORS[door][1]
        status, _, data = door_raw(port, door, body=body + b" " * (1025 - len(body)))
        assert status == 413, (door, status, data)
        # Exactly at the cap is fine.
        status, _, data = door_raw(port, door, body=body + b" " * (1024 - len(body)))
        assert status == 200, (door, status, data)
    assert {line["door"] for line in audit_lines(home)} == {"actions"}
    health(srv.url)


def test_default_body_cap_is_4_mib(server):
    port = server.port
    for door in DOORS:
        status, _, data = raw(port, build(port, "POST", DOORS[door][0], headers=[
            ("Content-Length", str(4 * 1024 * 1024 + 1))]))
        assert status == 413, (door, status, data)
    health(server.url)


@pytest.mark.parametrize("value", [b"-1", b"1_0", b"+2", b"0x2", b"2.0", b"1e1", b" 2 2",
                                   b"\xb2", b"", b"99999999999999999999999999999999"])
def test_bad_content_length_is_400(server, value):
    port = server.port
    for door in DOORS:
        status, hdrs, data = raw(port, build(port, "POST", DOORS[door][0], b"{}",
                                             headers=[("Content-Length", value)],
                                             content_length=False))
        if value.startswith(b"9999"):
            assert status == 413, (door, value, status, data)  # well-formed, just huge
        else:
            assert status == 400, (door, value, status, data)
            assert "error" in json.loads(data)
    health(server.url)


def test_two_content_lengths_are_400(server):
    port = server.port
    for door in DOORS:
        status, _, data = raw(port, build(port, "POST", DOORS[door][0], b"{}", headers=[
            ("Content-Length", "2"), ("Content-Length", "2")], content_length=False))
        assert status == 400, (door, status, data)
    health(server.url)


def test_chunked_body_is_411(server, home):
    port = server.port
    for door in DOORS:
        body = DOORS[door][1]
        chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        status, _, data = raw(port, build(port, "POST", DOORS[door][0], chunked, headers=[
            ("Transfer-Encoding", "chunked")], content_length=False))
        assert status == 411, (door, status, data)
        # Both headers at once (request smuggling shape): still refused.
        status, _, data = raw(port, build(port, "POST", DOORS[door][0], chunked, headers=[
            ("Transfer-Encoding", "chunked")]))
        assert status == 411, (door, status, data)
    assert audit_lines(home) == []
    health(server.url)


def test_deeply_nested_json_is_a_400_parse_error(server):
    port = server.port
    deep = b"[" * 100_000
    deep_in_object = (b'{"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": '
                      + b"[" * 100_000 + b"]" * 100_000 + b"}")
    for body in (deep, deep_in_object, b"{" * 100_000):
        status, _, data = raw(port, build(port, "POST", "/mcp", body))
        assert status == 400, (status, data[:200])
        reply = json.loads(data)
        assert reply["jsonrpc"] == "2.0" and reply["error"]["code"] == -32700, reply
        status, _, data = raw(port, build(port, "POST", "/actions/read_file", body))
        assert status == 400, (status, data[:200])
        assert "error" in json.loads(data)
    health(server.url)


def test_duplicate_json_keys_are_400(server, home):
    port = server.port
    mcp_bodies = [b'{"jsonrpc": "2.0", "id": 1, "id": 2, "method": "initialize", '
                  b'"params": {"protocolVersion": "2025-06-18", "capabilities": {}}}',
                  b'{"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": '
                  b'{"protocolVersion": "2025-06-18", "protocolVersion": "2025-03-26"}}']
    for body in mcp_bodies:
        status, _, data = raw(port, build(port, "POST", "/mcp", body))
        assert status == 400, (status, data)
        assert json.loads(data)["error"]["code"] == -32700
    # The classic smuggle: a checker reads the first value, a runner the last.
    status, _, data = raw(port, build(port, "POST", "/actions/read_file",
                                      b'{"path": "README.md", "path": ".env"}'))
    assert status == 400, (status, data)
    reply = json.loads(data)
    assert "error" in reply and "supersecret" not in data.decode()
    assert audit_lines(home) == []
    health(server.url)


SURROGATE_CASES = [
    ("actions", "/actions/read_file", b'{"path": "\\ud800"}'),
    ("actions", "/actions/read_file", b'{"\\ud800": 1}'),
    ("actions", "/actions/search", b'{"query": "\\udfff"}'),
    ("mcp", "/mcp", b'{"jsonrpc": "2.0", "id": 7, "method": "\\ud800"}'),
    ("mcp", "/mcp", b'{"jsonrpc": "2.0", "id": "\\ud800", "method": "ping"}'),
    ("mcp", "/mcp", b'{"jsonrpc": "2.0", "id": 7, "method": "tools/call", '
                    b'"params": {"name": "\\udc00"}}'),
    ("mcp", "/mcp", b'{"jsonrpc": "2.0", "id": 7, "method": "tools/call", '
                    b'"params": {"name": "read_file", "arguments": {"path": "\\ud800"}}}'),
]


@pytest.mark.parametrize("door,path,body", SURROGATE_CASES,
                         ids=["act-path", "act-key", "act-query", "mcp-method", "mcp-id",
                              "mcp-tool", "mcp-arg"])
def test_lone_surrogates_are_handled_without_a_500(server, door, path, body):
    port = server.port
    headers: List[Tuple[str, Any]] = []
    if door == "mcp":
        client = Mcp(server.url)
        client.initialize()
        headers = list(client.headers().items())
    status, _, data = raw(port, build(port, "POST", path, body, headers))
    assert status < 500, (status, data)
    reply = json.loads(data)  # valid JSON (and valid UTF-8) back
    if door == "mcp" and status == 200:
        assert "error" in reply or reply["result"].get("isError") in (True, False, None)
    health(server.url)


def test_oversized_headers_are_refused_and_the_server_survives(server):
    port = server.port
    many = [("X-H%d" % i, "v") for i in range(150)]
    status, _, _ = raw(port, build(port, "GET", "/health", headers=many))
    assert status == 431
    status, _, _ = raw(port, build(port, "GET", "/health", headers=[("X-Big", "a" * 70_000)]))
    assert status == 431
    status, _, _ = raw(port, build(port, "GET", "/health?" + "a" * 70_000))
    assert status == 414
    health(server.url)


# ---------------------------------------------------------------------------------------
# TTL
# ---------------------------------------------------------------------------------------

def test_expired_access_in_config_json_is_403_but_public_routes_answer(start_server, home,
                                                                       token):
    srv = start_server(token=token)
    for door in DOORS:
        assert_tool_ran(door, *call_door(door, srv.url, token=token))
    client = Mcp(srv.url, token)  # a session opened before expiry
    client.initialize()
    write_private(home / "config.json", json.dumps({"access_expires_at": "2000-01-01T00:00:00Z"}))
    assert (home / "config.json").stat().st_mode & 0o777 == 0o600
    before = len(audit_lines(home))
    for door in DOORS:
        status, body = call_door(door, srv.url, token=token)
        assert status == 403 and body["error"] == "access_expired", (door, status, body)
        status, body = call_door(door, srv.url, query="?patchbay_token=" + token)
        assert status == 403 and body["error"] == "access_expired", (door, status, body)
        assert call_door(door, srv.url)[0] == 401  # the token is still checked first
    status, _, body = post_json(client.url, CALL_WORKSPACE, token, client.headers())
    assert status == 403 and body["error"] == "access_expired"
    assert len(audit_lines(home)) == before
    for path, ctype in (("/health", "application/json"), ("/openapi.json", "application/json"),
                        ("/privacy", "text/plain")):
        status, hdrs, _ = request(srv.url + path)
        assert status == 200 and hdrs["content-type"].startswith(ctype), path
    # Renewed in place: the running server notices without a restart.
    write_private(home / "config.json", json.dumps({"access_expires_at": "2999-01-01T00:00:00Z"}))
    for door in DOORS:
        assert_tool_ran(door, *call_door(door, srv.url, token=token))
    health(srv.url)


def test_ttl_minutes_expires_the_servers_own_access(start_server, token):
    fresh = start_server(token=token, ttl_minutes=1)
    for door in DOORS:
        assert_tool_ran(door, *call_door(door, fresh.url, token=token))
    # The same server a minute and a second after its start, without sleeping: backdate its
    # start before it answers anything (what it derives from it may be cached after that).
    old = start_server(token=token, ttl_minutes=1)
    old.app.access.started -= 61
    for door in DOORS:
        status, body = call_door(door, old.url, token=token)
        assert status == 403 and body["error"] == "access_expired", (door, status, body)
    for path in ("/health", "/openapi.json", "/privacy"):
        assert request(old.url + path)[0] == 200, path
    health(fresh.url)


# ---------------------------------------------------------------------------------------
# Binding beyond loopback
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("env_token", [None, ""])
def test_serve_beyond_loopback_without_a_token_exits_2(repo, home, env_token):
    port = free_port()
    env = dict(os.environ)
    env.pop(patchbay.ENV_TOKEN, None)
    if env_token is not None:
        env[patchbay.ENV_TOKEN] = env_token
    out = subprocess.run([sys.executable, str(SCRIPT), "--home", str(home), "serve", "--host",
                          "0.0.0.0", "--port", str(port), "--root", str(repo)],
                         env=env, capture_output=True, text=True, timeout=20,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    assert "listening" not in out.stdout
    assert out.stderr.startswith("patchbay: error:"), out.stderr
    assert "--token-file" in out.stderr or patchbay.ENV_TOKEN in out.stderr
    assert "Traceback" not in out.stderr
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_serve_beyond_loopback_with_a_token_file_starts(serve_process, tmp_path, token):
    token_file = tmp_path / "token"
    write_private(token_file, token + "\n")
    proc = serve_process("--host", "0.0.0.0", "--token-file", str(token_file))
    assert proc.url.startswith("http://0.0.0.0:")
    local = "http://127.0.0.1:%d" % proc.port  # only ever connect to loopback
    for door in DOORS:
        assert call_door(door, local)[0] == 401
        assert_tool_ran(door, *call_door(door, local, token=token))
    health(local)
    assert proc.stop() == 0


# ---------------------------------------------------------------------------------------
# Connections: keep-alive, one-piece responses, the cap, slow clients
# ---------------------------------------------------------------------------------------

def test_keep_alive_serves_several_requests_on_one_connection(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request("GET", "/health")
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 200 and int(resp.getheader("Content-Length")) == len(body)
        sock = conn.sock
        assert sock is not None
        conn.request("POST", "/actions/workspace", body=b"{}",
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 200 and int(resp.getheader("Content-Length")) == len(body)
        conn.request("POST", "/mcp", body=INIT_BYTES, headers={
            "Content-Type": "application/json", "Accept": "application/json, text/event-stream"})
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 200 and json.loads(body)["result"]["protocolVersion"] == VERSION
        assert conn.sock is sock  # the same TCP connection throughout
    finally:
        conn.close()
    health(server.url)


def test_a_response_arrives_in_one_piece_with_content_length(server):
    port = server.port
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        for path, body in (("/health", None), ("/actions/workspace", b"{}"),
                           ("/mcp", INIT_BYTES)):
            req = build(port, "POST" if body else "GET", path, body)
            sock.sendall(req.replace(b"Connection: close\r\n", b""))  # keep the socket
            ready, _, _ = select.select([sock], [], [], 5)
            assert ready
            time.sleep(0.02)  # if the server wrote in two pieces, let both arrive apart
            first = sock.recv(1 << 20)
            head, sep, rest = first.partition(b"\r\n\r\n")
            assert sep, first[:200]
            lengths = [line for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")]
            assert len(lengths) == 1, head
            assert len(rest) == int(lengths[0].split(b":")[1]), (path, head, len(rest))
            assert head.startswith(b"HTTP/1.1 200 "), head
    health(server.url)


def test_connection_cap_gives_503_then_recovers(start_server):
    srv = start_server(limits={"max_connections": 2})
    port = srv.port
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
    try:
        time.sleep(0.2)  # let the server accept both
        status, hdrs, _ = raw(port, build(port, "POST", "/mcp", INIT_BYTES))
        assert status == 503
        assert hdrs.get("connection", "").lower() == "close"
        status, _, _ = raw(port, build(port, "GET", "/health"))
        assert status == 503
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 5
    status = 0
    while time.monotonic() < deadline:
        status = raw(port, build(port, "GET", "/health"))[0]
        if status == 200:
            break
        time.sleep(0.05)
    assert status == 200
    for door in DOORS:
        assert_tool_ran(door, *call_door(door, srv.url))


def test_stalled_clients_are_dropped(start_server):
    srv = start_server(limits={"request_timeout_s": 1})
    port = srv.port
    host = b"Host: 127.0.0.1:%d\r\n" % port
    stalls = {
        "half request line": b"GET /hea",
        "headers never end": b"GET /health HTTP/1.1\r\n" + host,
    }
    for door, (path, body) in DOORS.items():
        stalls["%s body stalls" % door] = (
            b"POST %s HTTP/1.1\r\n" % path.encode() + host
            + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (len(body) + 50)
            + body)
    socks = {}
    try:
        for label, data in stalls.items():
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(data)
            socks[label] = sock
        results = {label: closed_within(sock, 4.0) for label, sock in socks.items()}
    finally:
        for sock in socks.values():
            sock.close()
    # Waited one after another; each must have been closed within ~1 s of its deadline.
    assert all(r is not None for r in results.values()), results
    health(srv.url)


def _drip(port: int, prefix: bytes, feed: bytes, out: Dict[str, Any], label: str) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(prefix)
        out[label] = closed_within(sock, 3.5, feed=feed, interval=0.2)


def test_slowloris_dripping_clients_are_dropped(start_server):
    # Each byte arrives well inside the per-read timeout, so only a whole-request deadline
    # stops these; without one, max_connections such clients lock everybody out.
    srv = start_server(limits={"request_timeout_s": 1})
    port = srv.port
    host = b"Host: 127.0.0.1:%d\r\n" % port
    jobs = {"headers": (b"GET /health HTTP/1.1\r\n" + host, b"X-Pad: " + b"a" * 100)}
    for door, (path, body) in DOORS.items():
        jobs["%s body" % door] = (
            b"POST %s HTTP/1.1\r\n" % path.encode() + host
            + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (len(body) + 100),
            body + b" " * 100)
    results: Dict[str, Any] = {}
    threads = [threading.Thread(target=_drip, args=(port, prefix, feed, results, label))
               for label, (prefix, feed) in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert set(results) == set(jobs)
    assert all(r is not None for r in results.values()), results  # None: never dropped
    health(srv.url)


# ---------------------------------------------------------------------------------------
# Routes and failures
# ---------------------------------------------------------------------------------------

def test_oauth_discovery_is_404(start_server, token):
    srv = start_server(token=token)
    port = srv.port
    for path in ("/.well-known/oauth-authorization-server",
                 "/.well-known/oauth-protected-resource",
                 "/.well-known/oauth-protected-resource/mcp",
                 "/.well-known/openid-configuration"):
        for headers in ([], [("Authorization", "Bearer " + token)]):
            for method in ("GET", "POST"):
                status, hdrs, _ = raw(port, build(port, method, path,
                                                  b"{}" if method == "POST" else None, headers))
                assert status == 404, (path, method, status)
                assert "www-authenticate" not in hdrs
    health(srv.url)


def test_unknown_routes_are_404_only_after_auth(start_server, token):
    srv = start_server(token=token)
    port = srv.port
    auth = [("Authorization", "Bearer " + token)]
    routes = [("GET", "/nope", None), ("POST", "/actions/", b"{}"),
              ("POST", "/actions/no_such_tool", b"{}"), ("GET", "/actions/workspace", None),
              ("POST", "/mcpx", INIT_BYTES), ("POST", "/MCP", INIT_BYTES),
              ("POST", "/actions/workspace/extra", b"{}"), ("GET", "/health/x", None)]
    for method, path, body in routes:
        assert raw(port, build(port, method, path, body))[0] == 401, path
        status, _, data = raw(port, build(port, method, path, body, auth))
        assert status == 404, (method, path, status, data)
        assert "error" in json.loads(data)
    health(srv.url)


def test_get_mcp_is_405(start_server, token):
    srv = start_server(token=token)
    port = srv.port
    auth = [("Authorization", "Bearer " + token)]
    for method, path in (("GET", "/mcp"), ("GET", "/mcp/"), ("PUT", "/mcp"), ("PATCH", "/mcp")):
        status, hdrs, data = raw(port, build(port, method, path,
                                             None if method == "GET" else b"{}", auth))
        assert status == 405, (method, path, status, data)
        assert "POST" in hdrs.get("allow", "")
    health(srv.url)


def test_a_handler_failure_is_a_json_500_with_an_error_id(start_server, home, token,
                                                         server_log):
    srv = start_server(token=token)

    def broken(ctx: Any, args: Any) -> Any:
        raise RuntimeError("boom with " + token)

    srv.app.dispatcher.tools["workspace"].handler = broken
    ids = []
    for door in DOORS:
        status, body = call_door(door, srv.url, token=token)
        assert status == 500, (door, status, body)
        assert body["error"] == "INTERNAL" and body["error_id"], body
        text = json.dumps(body)
        assert "boom" not in text and "Traceback" not in text and token not in text
        ids.append(body["error_id"])
        # The server keeps answering, on both doors, with other tools.
        health(srv.url)
        status, _, reply = post_json(srv.url + "/actions/read_file", {"path": "README.md"},
                                     token)
        assert status == 200 and reply["text"].startswith("# Demo")
    assert len(set(ids)) == 2
    client = Mcp(srv.url, token)
    client.initialize()
    result, is_error = client.call("read_file", {"path": "README.md"})
    assert not is_error and result["text"].startswith("# Demo")
    logged = server_log()
    for err_id in ids:
        assert err_id in logged  # the operator can find the traceback by its id
    assert "RuntimeError" in logged and token not in logged


def test_real_process_exits_0_on_sigterm(serve_process):
    proc = serve_process()
    for door in DOORS:
        assert_tool_ran(door, *call_door(door, proc.url))
    port = proc.port
    assert proc.stop() == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert "Traceback" not in proc.stderr_path.read_text(errors="replace")


def test_pipelined_requests_are_answered_in_order_and_a_flood_costs_no_stack(server):
    """Many requests in one write: answered in order (inline and worker alike), and a
    pipelined flood neither crashes the loop nor stops the server from answering."""
    import socket as _socket

    port = server.port
    with _socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        ping = "GET /health HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % port
        body = '{"path": "."}'
        listing = ("POST /actions/list_files HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                   "Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                   % (port, len(body), body))
        sock.sendall((ping + listing + ping).encode())
        data = b""
        deadline = time.monotonic() + 10
        while data.count(b"HTTP/1.1 200 OK") < 3 and time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        answers = data.split(b"HTTP/1.1 200 OK")[1:]
        assert len(answers) == 3
        assert b'"ok":true' in answers[0] and b'"entries"' in answers[1]
        assert b'"ok":true' in answers[2]
    with _socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(("GET /health HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % port).encode()
                     * 5000)
        # Count over the whole buffer: a status line may be split between two reads.
        data = bytearray()
        deadline = time.monotonic() + 20
        while data.count(b"HTTP/1.1 200 OK\r\n") < 5000 and time.monotonic() < deadline:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            data += chunk
        assert data.count(b"HTTP/1.1 200 OK\r\n") == 5000
        assert data.count(b"HTTP/1.1 ") == 5000  # and no other answer among them
    health(server.url)
