"""MCP protocol behaviour over real HTTP (and stdio): SPEC §6, protocols.md §1, §2, §4.1.

Every test talks to a real `patchbay.Server` on 127.0.0.1 (or a real `patchbay.py stdio`
child) with raw HTTP, so status codes, headers and bodies are checked exactly as a client
sees them.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import queue
import re
import secrets
import shutil
import string
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
from pbtest import JSON_HEADERS, SCRIPT, Mcp, post_json, request, write_channel

SUPPORTED = ("2025-03-26", "2025-06-18", "2025-11-25")
LATEST = "2025-11-25"
ANNOTATION_KEYS = ("readOnlyHint", "destructiveHint", "idempotentHint", "openWorldHint")
CONTEXT_TOOLS = ("workspace", "switch_workspace", "list_files", "read_file", "search",
                 "fetch", "changes")
TOOL_NAME = re.compile(r"^[a-z0-9_]{1,64}$")


# -- helpers ------------------------------------------------------------------------------

def init_msg(version: str, msg_id: Any = 0) -> Dict[str, Any]:
    return {"jsonrpc": "2.0", "id": msg_id, "method": "initialize",
            "params": {"protocolVersion": version, "capabilities": {},
                       "clientInfo": {"name": "test_mcp", "version": "1"}}}


def mcp_url(base: str) -> str:
    return base.rstrip("/") + "/mcp"


def session_headers(client: Mcp, **extra: str) -> Dict[str, str]:
    h = client.headers()
    h.update(extra)
    return h


def rpc_raw(client: Mcp, msg: Any, headers: Optional[Dict[str, str]] = None):  # type: ignore[no-untyped-def]
    """POST one message (or batch) on the client's session; return (status, headers, raw)."""
    h = dict(JSON_HEADERS)
    if client.token:
        h["Authorization"] = "Bearer " + client.token
    h.update(client.headers() if headers is None else headers)
    return request(client.url, "POST", msg, h)


def tools_list(base: str, token: Optional[str] = None) -> List[Dict[str, Any]]:
    client = Mcp(base, token)
    client.initialize()
    body = client.rpc("tools/list")
    return body["result"]["tools"]




# -- initialize and version negotiation ---------------------------------------------------

@pytest.mark.parametrize("version", SUPPORTED)
def test_initialize_echoes_each_supported_revision(server, version):
    status, hdrs, body = post_json(mcp_url(server.url), init_msg(version, "init-1"))
    assert status == 200, body
    assert hdrs["content-type"].startswith("application/json")
    assert body["jsonrpc"] == "2.0" and body["id"] == "init-1"
    result = body["result"]
    assert result["protocolVersion"] == version
    assert isinstance(result["capabilities"]["tools"], dict)
    assert result["serverInfo"]["name"] == "patchbay"
    assert isinstance(result["serverInfo"]["version"], str) and result["serverInfo"]["version"]
    assert hdrs.get("mcp-session-id")


@pytest.mark.parametrize("version", ["1999-01-01", "2024-11-05", "2026-07-28", "latest"])
def test_initialize_with_an_unsupported_revision_answers_the_latest(server, version):
    status, hdrs, body = post_json(mcp_url(server.url), init_msg(version))
    assert status == 200, body
    assert body["result"]["protocolVersion"] == LATEST
    assert hdrs.get("mcp-session-id")


def test_initialize_without_protocol_version_is_invalid_params(server):
    status, hdrs, body = post_json(mcp_url(server.url), {
        "jsonrpc": "2.0", "id": 5, "method": "initialize", "params": {"capabilities": {}}})
    assert body["id"] == 5 and body["error"]["code"] == -32602
    assert "mcp-session-id" not in hdrs  # no session for a failed handshake


def test_session_id_is_visible_ascii_with_at_least_128_bits(server):
    ids = []
    for _ in range(16):
        status, hdrs, _ = post_json(mcp_url(server.url), init_msg(LATEST))
        assert status == 200
        ids.append(hdrs["mcp-session-id"])
    assert len(set(ids)) == len(ids), "session ids repeat"
    for sid in ids:
        assert sid and all(0x21 <= ord(c) <= 0x7E for c in sid), sid
        # The smallest alphabet the id could have been drawn from bounds its entropy.
        if set(sid) <= set(string.hexdigits):
            bits_per_char = 4.0
        elif set(sid) <= set(string.ascii_letters + string.digits + "-_"):
            bits_per_char = 6.0
        else:
            bits_per_char = math.log2(94)
        assert len(sid) * bits_per_char >= 128, (sid, len(sid))
    # Not a counter: ids share no long common prefix.
    prefix = os.path.commonprefix(ids)
    assert len(prefix) < 4, prefix


# -- sessions -----------------------------------------------------------------------------

def test_request_without_session_id_is_400(server):
    client = Mcp(server.url)
    client.initialize()
    status, _, raw = rpc_raw(client, {"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                             headers={"MCP-Protocol-Version": client.version})
    assert status == 400
    assert json.loads(raw)["error"]["code"] == -32600


def test_unknown_session_id_is_404(server):
    client = Mcp(server.url)
    client.initialize()
    for bogus in ("0" * 32, client.session + "x", secrets.token_urlsafe(24)):
        status, _, raw = rpc_raw(client, {"jsonrpc": "2.0", "id": 1, "method": "ping"},
                                 headers={"Mcp-Session-Id": bogus,
                                          "MCP-Protocol-Version": client.version})
        assert status == 404, (bogus, raw)
    # The real one still works: the 404s were about the ids, not the server.
    assert client.rpc("ping")["result"] == {}


def test_delete_ends_the_session(server):
    client = Mcp(server.url)
    client.initialize()
    assert client.rpc("ping")["result"] == {}
    status, _, raw = request(client.url, "DELETE", headers=client.headers())
    assert status in (200, 204), raw
    status, _, _ = rpc_raw(client, {"jsonrpc": "2.0", "id": 2, "method": "ping"})
    assert status == 404
    status, _, _ = request(client.url, "DELETE", headers=client.headers())
    assert status == 404
    # Only that session ended: a new one works at once.
    other = Mcp(server.url)
    other.initialize()
    assert other.rpc("ping")["result"] == {}


def test_delete_without_session_id_is_400(server):
    status, _, _ = request(mcp_url(server.url), "DELETE")
    assert status == 400


def test_get_mcp_is_405_with_allow(server):
    client = Mcp(server.url)
    client.initialize()
    for headers in ({"Accept": "text/event-stream"},
                    dict(client.headers(), Accept="text/event-stream")):
        status, hdrs, _ = request(client.url, "GET", headers=headers)
        assert status == 405
        assert "POST" in [m.strip() for m in hdrs["allow"].split(",")]


def test_trailing_slash_is_the_same_endpoint(server):
    status, hdrs, body = post_json(server.url + "/mcp/", init_msg(LATEST))
    assert status == 200 and body["result"]["protocolVersion"] == LATEST
    assert "location" not in hdrs


# -- notifications, batches, headers ------------------------------------------------------

@pytest.mark.parametrize("note", [
    {"jsonrpc": "2.0", "method": "notifications/initialized"},
    {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 999}},
    {"jsonrpc": "2.0", "method": "notifications/unknown_kind", "params": {}},
    {"jsonrpc": "2.0", "id": 77, "result": {}},  # a client's response
])
def test_notifications_and_responses_get_202_with_empty_body(server, note):
    client = Mcp(server.url)
    client.initialize()
    status, hdrs, raw = rpc_raw(client, note)
    assert status == 202
    assert raw == b""
    assert hdrs.get("content-length", "0") == "0"


def test_batch_in_a_2025_03_26_session(server):
    client = Mcp(server.url, version="2025-03-26")
    assert client.initialize()["protocolVersion"] == "2025-03-26"
    batch = [{"jsonrpc": "2.0", "id": "a", "method": "ping"},
             {"jsonrpc": "2.0", "method": "notifications/initialized"},
             {"jsonrpc": "2.0", "id": "b", "method": "tools/list"},
             {"jsonrpc": "2.0", "id": "c", "method": "no/such_method"}]
    status, _, raw = rpc_raw(client, batch)
    assert status == 200
    replies = {r["id"]: r for r in json.loads(raw)}
    assert set(replies) == {"a", "b", "c"}  # nothing for the notification
    assert replies["a"]["result"] == {}
    assert any(t["name"] == "read_file" for t in replies["b"]["result"]["tools"])
    assert replies["c"]["error"]["code"] == -32601
    # A batch of notifications only: accepted, nothing to say.
    status, _, raw = rpc_raw(client, [{"jsonrpc": "2.0", "method": "notifications/initialized"}])
    assert status == 202 and raw == b""


def test_empty_batch_is_invalid_even_in_2025_03_26(server):
    client = Mcp(server.url, version="2025-03-26")
    client.initialize()
    status, _, raw = rpc_raw(client, [])
    assert status == 400
    assert json.loads(raw)["error"]["code"] == -32600


@pytest.mark.parametrize("version", ["2025-06-18", "2025-11-25"])
def test_batch_rejected_after_2025_03_26(server, version):
    client = Mcp(server.url, version=version)
    client.initialize()
    status, _, raw = rpc_raw(client, [{"jsonrpc": "2.0", "id": 1, "method": "ping"},
                                      {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}])
    assert status == 400
    body = json.loads(raw)
    assert isinstance(body, dict) and body["error"]["code"] == -32600


@pytest.mark.parametrize("bad", ["1999-01-01", "2024-11-05", "2026-07-28", "garbage", ""])
def test_bad_protocol_version_header_is_400(server, bad):
    client = Mcp(server.url)
    client.initialize()
    status, _, raw = rpc_raw(client, {"jsonrpc": "2.0", "id": 1, "method": "ping"},
                             headers=session_headers(client, **{"MCP-Protocol-Version": bad}))
    assert status == 400, raw
    assert "error" in json.loads(raw)


def test_missing_protocol_version_header_is_accepted(server):
    client = Mcp(server.url)
    client.initialize()
    status, _, raw = rpc_raw(client, {"jsonrpc": "2.0", "id": 1, "method": "ping"},
                             headers={"Mcp-Session-Id": client.session})
    assert status == 200 and json.loads(raw)["result"] == {}


def test_modern_2026_probe_gets_400_with_a_non_modern_code(server):
    """A dual-era client probes with server/discover; we must make it fall back (T13)."""
    probe = {"jsonrpc": "2.0", "id": 1, "method": "server/discover", "params": {"_meta": {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": {"name": "probe", "version": "1"}}}}
    status, hdrs, body = post_json(mcp_url(server.url), probe, headers={
        "MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "server/discover"})
    assert status == 400, body
    code = body["error"]["code"]
    assert isinstance(code, int)
    assert not -32022 <= code <= -32020, code
    assert "mcp-session-id" not in hdrs
    # And the fallback the client then does works.
    status, _, body = post_json(mcp_url(server.url), init_msg(LATEST))
    assert status == 200 and body["result"]["protocolVersion"] == LATEST


def test_accept_without_json_is_406(server):
    status, _, _ = request(mcp_url(server.url), "POST", init_msg(LATEST), {
        "Content-Type": "application/json", "Accept": "text/html"})
    assert status == 406


def test_unparseable_body_is_400_parse_error(server):
    status, _, raw = request(mcp_url(server.url), "POST", b"{not json", JSON_HEADERS)
    assert status == 400
    body = json.loads(raw)
    assert body["error"]["code"] == -32700 and body["id"] is None


# -- methods ------------------------------------------------------------------------------

def test_ping_returns_empty_result(server):
    client = Mcp(server.url)
    client.initialize()
    body = client.rpc("ping")
    assert body == {"jsonrpc": "2.0", "id": body["id"], "result": {}}


@pytest.mark.parametrize("method", ["resources/list", "prompts/list", "no/such",
                                    "logging/setLevel"])
def test_unknown_method_is_32601(server, method):
    client = Mcp(server.url)
    client.initialize()
    body = client.rpc(method, {})
    assert body["error"]["code"] == -32601
    assert body["id"] == client._id


def test_unknown_tool_is_32602(server):
    client = Mcp(server.url)
    client.initialize()
    for name in ("no_such_tool", "", "READ_FILE", "run_command"):  # worker has no shell
        body = client.rpc("tools/call", {"name": name, "arguments": {}})
        assert "result" not in body
        assert body["error"]["code"] == -32602, (name, body)


def test_cursor_on_tools_list_is_32602(server):
    client = Mcp(server.url)
    client.initialize()
    body = client.rpc("tools/list", {"cursor": "page-2"})
    assert body["error"]["code"] == -32602
    body = client.rpc("tools/list", {})
    assert "nextCursor" not in body["result"]


@pytest.mark.parametrize("args, code", [
    ({}, "INVALID_ARG"),                                        # missing required path
    ({"path": "README.md", "start_line": "one"}, "INVALID_ARG"),  # wrong type
    ({"path": "README.md", "start_line": 0}, "INVALID_ARG"),      # below minimum
    ({"path": "README.md", "bogus": True}, "INVALID_ARG"),        # unknown argument
    ({"path": "no/such/file.txt"}, "NOT_FOUND"),
    ({"path": ".env"}, "BLOCKED_FILE"),
    ({"path": "../outside.txt"}, "DENIED_PATH"),
])
def test_tool_errors_are_results_with_a_machine_code(server, args, code):
    client = Mcp(server.url)
    client.initialize()
    body = client.rpc("tools/call", {"name": "read_file", "arguments": args})
    assert "error" not in body, body  # a tool failure is not a protocol error
    result = body["result"]
    assert result["isError"] is True
    assert len(result["content"]) == 1 and result["content"][0]["type"] == "text"
    assert json.loads(result["content"][0]["text"]) == result["structuredContent"]
    assert result["structuredContent"]["error"] == code
    assert result["structuredContent"]["message"]


def test_successful_call_mirrors_structured_content_as_text(server):
    client = Mcp(server.url)
    client.initialize()
    body = client.rpc("tools/call", {"name": "read_file", "arguments": {"path": "src/app.py"}})
    result = body["result"]
    assert result["isError"] is False
    assert [c["type"] for c in result["content"]] == ["text"]
    assert json.loads(result["content"][0]["text"]) == result["structuredContent"]
    assert result["structuredContent"]["text"].startswith("def greet(name):")


@pytest.mark.parametrize("profile", ["readonly", "worker", "power", "full"])
def test_tool_list_names_and_explicit_annotations(start_server, profile):
    tools = tools_list(start_server(profile=profile).url)
    names = [t["name"] for t in tools]
    assert len(names) == len(set(names))
    assert set(CONTEXT_TOOLS) <= set(names)
    for tool in tools:
        assert TOOL_NAME.match(tool["name"]), tool["name"]
        assert isinstance(tool["description"], str) and tool["description"].strip()
        assert tool["inputSchema"]["type"] == "object"
        ann = tool["annotations"]
        for key in ANNOTATION_KEYS:
            assert isinstance(ann.get(key), bool), (tool["name"], key, ann)
        if ann["readOnlyHint"]:
            assert ann["destructiveHint"] is False, tool["name"]
    for name in CONTEXT_TOOLS:
        tool = next(t for t in tools if t["name"] == name)
        assert tool["annotations"]["readOnlyHint"] is True, name
        assert tool["annotations"]["openWorldHint"] is False, name


def test_mutating_tools_are_annotated_as_such(start_server):
    """SPEC §4/§7: power adds write/edit/patch and run_command; they overwrite or delete."""
    power = {t["name"]: t for t in tools_list(start_server(profile="power").url)}
    for name in ("write_file", "edit_file", "apply_patch", "run_command"):
        assert name in power, name
        ann = power[name]["annotations"]
        assert ann["readOnlyHint"] is False, name
        assert ann["destructiveHint"] is True, name
    readonly = {t["name"] for t in tools_list(start_server(profile="readonly").url)}
    assert not readonly & {"write_file", "edit_file", "apply_patch", "run_command"}


def test_tools_list_is_deterministic(server):
    assert tools_list(server.url) == tools_list(server.url)


def test_power_tools_list_fits_chatgpt_budget(start_server):
    srv = start_server(profile="power")
    client = Mcp(srv.url)
    client.initialize()
    status, _, raw = rpc_raw(client, {"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    assert status == 200
    tools = json.loads(raw)["result"]["tools"]
    assert tools
    assert len(raw) < 16_000, len(raw)
    # The profile really is the power one: at least everything the worker profile has.
    worker = {t["name"] for t in tools_list(start_server(profile="worker").url)}
    assert worker <= {t["name"] for t in tools}


# -- ChatGPT's search/fetch contract (protocols.md §3.2) ----------------------------------

def test_search_and_fetch_follow_chatgpt_contract(server):
    client = Mcp(server.url)
    client.initialize()
    body = client.rpc("tools/call", {"name": "search", "arguments": {"query": "hello"}})
    result = body["result"]
    assert result["isError"] is False
    assert len(result["content"]) == 1 and result["content"][0]["type"] == "text"
    found = json.loads(result["content"][0]["text"])
    assert isinstance(found["results"], list) and found["results"]
    for item in found["results"]:
        for key in ("id", "title", "url"):
            assert isinstance(item[key], str) and item[key], (key, item)
    hit = next(r for r in found["results"] if r["id"].startswith("src/app.py:"))

    body = client.rpc("tools/call", {"name": "fetch", "arguments": {"id": hit["id"]}})
    result = body["result"]
    assert result["isError"] is False
    assert len(result["content"]) == 1 and result["content"][0]["type"] == "text"
    doc = json.loads(result["content"][0]["text"])
    assert doc["id"] == hit["id"]
    for key in ("title", "text", "url"):
        assert isinstance(doc[key], str) and doc[key], key
    assert isinstance(doc["metadata"], dict)
    assert "return 'hello ' + name" in doc["text"]


def test_search_finds_nothing_in_blocked_files(server):
    client = Mcp(server.url)
    client.initialize()
    result = client.rpc("tools/call", {"name": "search",
                                       "arguments": {"query": "supersecret"}})["result"]
    assert result["isError"] is False
    assert json.loads(result["content"][0]["text"])["results"] == []


# -- sessions are bound to the credential that created them --------------------------------

def test_session_bound_to_credential_across_token_rotation(start_server, home):
    old = "old-" + secrets.token_urlsafe(24)
    new = "new-" + secrets.token_urlsafe(24)
    write_channel(home, {"token": old})
    srv = start_server(token=None)  # the channel token in HOME/config.json is the credential
    url = mcp_url(srv.url)
    status, hdrs, _ = post_json(url, init_msg(LATEST))
    assert status == 401 and hdrs["www-authenticate"].startswith("Bearer")

    client = Mcp(srv.url, token=old)
    client.initialize()
    assert client.rpc("ping")["result"] == {}
    sid = client.session

    write_channel(home, {"token": new})

    probe = {"jsonrpc": "2.0", "id": 9, "method": "ping"}
    hdrs_for = {"Mcp-Session-Id": sid, "MCP-Protocol-Version": client.version}
    # The new token cannot use the old session: the same answer as for an unknown id.
    status_old, _, body_old = post_json(url, probe, token=new, headers=hdrs_for)
    status_unknown, _, body_unknown = post_json(
        url, probe, token=new,
        headers={"Mcp-Session-Id": secrets.token_urlsafe(24),
                 "MCP-Protocol-Version": client.version})
    assert status_old == 404
    assert (status_old, body_old) == (status_unknown, body_unknown)
    # The old token is no longer a credential at all.
    status, hdrs, _ = post_json(url, probe, token=old, headers=hdrs_for)
    assert status == 401 and hdrs["www-authenticate"].startswith("Bearer")
    # Nor can the new token end the old session.
    status, _, _ = request(url, "DELETE", headers=dict(hdrs_for, Authorization="Bearer " + new))
    assert status == 404
    # The new token works with a session of its own.
    fresh = Mcp(srv.url, token=new)
    fresh.initialize()
    assert fresh.rpc("ping")["result"] == {}


@pytest.mark.parametrize("first_headers", [
    {"Authorization": "Bearer wrong-token"},                        # 401 before the body
    {"Origin": "http://evil.example.com"},                         # 403 before the body
], ids=["wrong-token", "bad-origin"])
def test_rejected_post_does_not_desync_a_kept_alive_connection(start_server, first_headers):
    """A request refused before its body is read must not leave that body on the wire to
    be parsed as the next request (tunnels and the SDK reuse connections)."""
    token = secrets.token_urlsafe(32)
    srv = start_server(token=token)
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    try:
        body = json.dumps(init_msg(LATEST))
        good = dict(JSON_HEADERS, Authorization="Bearer " + token)
        conn.request("POST", "/mcp", body, dict(good, **first_headers))
        first = conn.getresponse()
        first.read()
        assert first.status in (401, 403)
        # Same connection object: http.client reconnects only if the server said close.
        conn.request("POST", "/mcp", body, good)
        second = conn.getresponse()
        raw = second.read()
        assert second.status == 200, (second.status, raw[:200])
        assert json.loads(raw)["result"]["protocolVersion"] == LATEST
    finally:
        conn.close()


def test_static_token_session_via_query_token_is_the_same_credential(start_server):
    token = secrets.token_urlsafe(32)
    srv = start_server(token=token)
    client = Mcp(srv.url, token=token)
    client.initialize()
    status, _, body = request(
        mcp_url(srv.url) + "?patchbay_token=" + token, "POST",
        {"jsonrpc": "2.0", "id": 3, "method": "ping"},
        dict(JSON_HEADERS, **client.headers()))
    assert status == 200 and json.loads(body)["result"] == {}
    status, _, _ = request(mcp_url(srv.url), "POST",
                           {"jsonrpc": "2.0", "id": 4, "method": "ping"},
                           dict(JSON_HEADERS, **client.headers()))
    assert status == 401


# -- stdio ----------------------------------------------------------------------------------

class StdioChild:
    """`patchbay.py stdio` with a reader thread, so every read has a timeout."""

    def __init__(self, home: Path, root: Path) -> None:
        python = shutil.which("python3") or sys.executable  # a plain, stdlib-only Python
        argv = [python, str(SCRIPT), "--home", str(home), "-v", "stdio",
                "--root", str(root)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PATCHBAY_")}
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env)
        self.lines: queue.Queue[Optional[bytes]] = queue.Queue()
        self.raw: List[bytes] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.raw.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def send(self, obj: Any) -> None:
        assert self.proc.stdin is not None
        data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        self.proc.stdin.write(data + b"\n")
        self.proc.stdin.flush()

    def recv(self, timeout: float = 20) -> Any:
        line = self.lines.get(timeout=timeout)
        assert line is not None, "stdio child closed stdout"
        return json.loads(line)

    def close(self) -> str:
        assert self.proc.stdin is not None and self.proc.stderr is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise
        self.thread.join(5)
        return self.proc.stderr.read().decode(errors="replace")


@pytest.fixture
def stdio_child(repo, tmp_path):
    children: List[StdioChild] = []

    def start() -> StdioChild:
        child = StdioChild(tmp_path / "stdio-home", repo)
        children.append(child)
        return child

    yield start
    for child in children:
        if child.proc.poll() is None:
            child.proc.kill()
            child.proc.wait(5)


def test_stdio_session_reads_a_file(stdio_child):
    child = stdio_child()
    child.send(init_msg(LATEST, 1))
    init = child.recv()
    assert init["id"] == 1 and init["result"]["protocolVersion"] == LATEST
    assert init["result"]["serverInfo"]["name"] == "patchbay"
    assert "tools" in init["result"]["capabilities"]
    child.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
    child.send({"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
    listed = child.recv()
    assert listed["id"] == 2  # nothing was sent back for the notification
    names = [t["name"] for t in listed["result"]["tools"]]
    assert "read_file" in names and "search" in names
    child.send({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
                "params": {"name": "read_file", "arguments": {"path": "README.md"}}})
    called = child.recv()
    assert called["id"] == 3
    result = called["result"]
    assert result["isError"] is False
    assert result["structuredContent"]["text"].startswith("# Demo")
    assert json.loads(result["content"][0]["text"]) == result["structuredContent"]
    child.send({"jsonrpc": "2.0", "id": 4, "method": "ping"})
    assert child.recv() == {"jsonrpc": "2.0", "id": 4, "result": {}}
    child.close()
    assert child.proc.returncode == 0
    # stdout carried JSON-RPC messages and nothing else: one object per line.
    assert len(child.raw) == 4
    for line in child.raw:
        assert line.endswith(b"\n")
        msg = json.loads(line)
        assert isinstance(msg, dict) and msg["jsonrpc"] == "2.0" and "id" in msg


def test_stdio_errors_stay_json_rpc(stdio_child):
    child = stdio_child()
    child.send({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})  # before initialize
    assert child.recv()["error"]["code"] == -32600
    child.send(init_msg("2025-03-26", 2))
    assert child.recv()["result"]["protocolVersion"] == "2025-03-26"
    child.send(b"{this is not json")
    err = child.recv()
    assert err["error"]["code"] == -32700 and err["id"] is None
    child.send({"jsonrpc": "2.0", "id": 3, "method": "no/such"})
    assert child.recv()["error"]["code"] == -32601
    child.send({"jsonrpc": "2.0", "id": 4, "method": "tools/call",
                "params": {"name": "nope", "arguments": {}}})
    assert child.recv()["error"]["code"] == -32602
    child.send([{"jsonrpc": "2.0", "id": 5, "method": "ping"},
                {"jsonrpc": "2.0", "id": 6, "method": "ping"}])
    replies = child.recv()
    assert sorted(r["id"] for r in replies) == [5, 6]
    stderr = child.close()
    assert child.proc.returncode == 0
    for line in child.raw:
        json.loads(line)
    assert "Traceback" not in stderr
