"""Other people's clients against a real `patchbay.py serve` process.

1. The official MCP Python SDK (mcp 2.x) over Streamable HTTP, without a token (loopback)
   and with a bearer token; a wrong token must make it fail.
2. The official conformance runner (@modelcontextprotocol/conformance) for the scenarios
   a repository server can pass: server-initialize, ping, tools-list,
   dns-rebinding-protection, server-session-lifecycle.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest
from pbtest import ROOT, post_json

anyio = pytest.importorskip("anyio")
httpx2 = pytest.importorskip("httpx2")
mcp = pytest.importorskip("mcp")
from mcp import Client  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402

SDK_TIMEOUT_S = 60


# -- the official Python SDK --------------------------------------------------------------

async def _sdk_run(url: str, token: Optional[str], mode: str,
                   seen: List[Tuple[str, Optional[str], int]]) -> Dict[str, Any]:
    """Connect, list tools, call read_file, search and fetch; return what came back."""

    async def on_response(response: Any) -> None:
        req = response.request
        seen.append((req.method, req.headers.get("mcp-protocol-version"), response.status_code))

    headers = {"Authorization": "Bearer " + token} if token else {}
    out: Dict[str, Any] = {}
    with anyio.fail_after(SDK_TIMEOUT_S):
        async with httpx2.AsyncClient(headers=headers, timeout=20,
                                      event_hooks={"response": [on_response]}) as http:
            async with Client(streamable_http_client(url, http_client=http), mode=mode) as c:
                out["version"] = c.protocol_version
                out["server"] = c.server_info
                out["capabilities"] = c.server_capabilities
                listed = await c.list_tools()
                out["tools"] = {t.name: t for t in listed.tools}
                out["read"] = await c.call_tool("read_file", {"path": "README.md"})
                out["search"] = await c.call_tool("search", {"query": "hello"})
                hits = json.loads(out["search"].content[0].text)["results"]
                out["fetch"] = await c.call_tool("fetch", {"id": hits[0]["id"]})
                out["bad"] = await c.call_tool("read_file", {"path": ".env"})
    return out


def sdk_session(url: str, token: Optional[str] = None, mode: str = "legacy"
                ) -> Tuple[Dict[str, Any], List[Tuple[str, Optional[str], int]]]:
    seen: List[Tuple[str, Optional[str], int]] = []
    return anyio.run(_sdk_run, url, token, mode, seen), seen


def check_sdk_results(out: Dict[str, Any]) -> None:
    assert out["version"] == "2025-11-25"
    assert out["server"] is not None and out["server"].name == "patchbay"
    assert out["capabilities"].tools is not None
    assert {"read_file", "search", "fetch", "workspace"} <= set(out["tools"])
    ann = out["tools"]["read_file"].annotations
    assert ann is not None and ann.read_only_hint is True and ann.destructive_hint is False

    read = out["read"]
    assert read.is_error is False
    assert read.structured_content["text"].startswith("# Demo")
    assert json.loads(read.content[0].text) == read.structured_content

    search = out["search"]
    assert search.is_error is False
    assert len(search.content) == 1 and search.content[0].type == "text"
    results = json.loads(search.content[0].text)["results"]
    assert any(r["id"].startswith("src/app.py:") and r["url"] for r in results)

    fetched = json.loads(out["fetch"].content[0].text)
    assert fetched["id"] == results[0]["id"] and "hello" in fetched["text"]

    assert out["bad"].is_error is True
    assert out["bad"].structured_content["error"] == "BLOCKED_FILE"


@pytest.mark.parametrize("mode", ["legacy", "auto"])
def test_sdk_client_without_token_on_loopback(serve_process, mode):
    proc = serve_process()
    out, seen = sdk_session(proc.url + "/mcp", None, mode)
    check_sdk_results(out)
    if mode == "auto":
        # The SDK first probed the 2026-07-28 era and fell back to initialize (T13).
        first_method, first_version, first_status = seen[0]
        assert first_method == "POST" and first_version == "2026-07-28"
        assert 400 <= first_status < 500
    assert any(m == "DELETE" and s in (200, 204) for m, _, s in seen), seen


@pytest.mark.parametrize("mode", ["legacy", "auto"])
def test_sdk_client_with_bearer_token(serve_process, mode):
    token = secrets.token_urlsafe(32)
    proc = serve_process(env={"PATCHBAY_HTTP_TOKEN": token})
    # The token is really required by this server ...
    status, hdrs, _ = post_json(proc.url + "/mcp", {"jsonrpc": "2.0", "id": 1, "method": "ping"})
    assert status == 401 and hdrs["www-authenticate"].startswith("Bearer")
    # ... and the SDK, sending it, gets everything.
    out, seen = sdk_session(proc.url + "/mcp", token, mode)
    check_sdk_results(out)
    assert all(s != 401 for _, _, s in seen), seen


@pytest.mark.parametrize("mode", ["legacy", "auto"])
def test_sdk_client_with_wrong_token_fails(serve_process, mode):
    token = secrets.token_urlsafe(32)
    proc = serve_process(env={"PATCHBAY_HTTP_TOKEN": token})
    seen: List[Tuple[str, Optional[str], int]] = []
    with pytest.raises(Exception):  # noqa: B017 - the SDK wraps it in an ExceptionGroup
        anyio.run(_sdk_run, proc.url + "/mcp", "wrong-" + token, mode, seen)
    assert seen, "the SDK never reached the server"
    # Every POST must be refused with 401. Anything else (the SDK's auto mode saw 501)
    # means the server misread the connection after an early 401: see
    # test_mcp.py::test_rejected_post_does_not_desync_a_kept_alive_connection.
    assert all(s == 401 for m, _, s in seen if m == "POST"), seen
    assert token not in proc.stderr()


# -- the official conformance runner ------------------------------------------------------

CONFORMANCE_BIN = ROOT / ".cache" / "npm" / "node_modules" / ".bin" / "conformance"
SCENARIOS = ["server-initialize", "ping", "tools-list", "dns-rebinding-protection",
             "server-session-lifecycle"]

# conformance 0.2.0-alpha.11 imports `globSync` from "fs" (Node >= 22) at load time, but
# only its tier-check command calls it. On Node 20 an ESM resolve hook hands it an "fs"
# with that one name added (it throws if ever called), so every `server` scenario runs.
_FS_SHIM = """export * from 'node:fs';
export { default } from 'node:fs';
export function globSync() { throw new Error('fs.globSync needs Node >= 22'); }
"""
_HOOKS = """const shim = new URL('./fs-shim.mjs', import.meta.url).href;
export async function resolve(specifier, context, next) {
  if (specifier === 'fs' && context.parentURL && context.parentURL !== shim) {
    return { url: shim, shortCircuit: true };
  }
  return next(specifier, context);
}
"""
_REGISTER = """import { register } from 'node:module';
register('./hooks.mjs', import.meta.url);
"""


def _node_major() -> int:
    out = subprocess.run(["node", "--version"], capture_output=True, text=True, timeout=30)
    m = re.match(r"v(\d+)", out.stdout.strip())
    return int(m.group(1)) if m else 0


def conformance_argv(workdir: Path) -> List[str]:
    if not CONFORMANCE_BIN.exists() or shutil.which("node") is None:
        pytest.skip("conformance runner not installed (run sh tests/run)")
    if _node_major() >= 22:
        return [str(CONFORMANCE_BIN)]
    shim = workdir / "node20-shim"
    shim.mkdir(exist_ok=True)
    (shim / "fs-shim.mjs").write_text(_FS_SHIM)
    (shim / "hooks.mjs").write_text(_HOOKS)
    (shim / "register.mjs").write_text(_REGISTER)
    script = os.path.realpath(CONFORMANCE_BIN)
    return ["node", "--import", (shim / "register.mjs").as_uri(), script]


def run_conformance(workdir: Path, *args: str, timeout: float = 180
                    ) -> subprocess.CompletedProcess:
    env = dict(os.environ, NO_COLOR="1", FORCE_COLOR="0")
    return subprocess.run(conformance_argv(workdir) + list(args), cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def test_conformance_lists_the_scenarios_we_run(tmp_path):
    done = run_conformance(tmp_path, "list", timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    listed = set(re.findall(r"^\s*-\s+([a-z0-9-]+)\s", done.stdout, re.M))
    missing = [s for s in SCENARIOS if s not in listed]
    assert not missing, (missing, done.stdout[:2000])


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_conformance_scenario_passes(serve_process, tmp_path, scenario):
    proc = serve_process()
    work = tmp_path / "conformance"
    work.mkdir()
    done = run_conformance(work, "server", "--url", proc.url + "/mcp",
                           "--scenario", scenario, "-o", "results")
    report = done.stdout + "\n" + done.stderr
    checks_files = sorted((work / "results").rglob("checks.json"))
    assert checks_files, report[-3000:]
    checks: List[Dict[str, Any]] = []
    for path in checks_files:
        checks.extend(json.loads(path.read_text()))
    failed = [c for c in checks if c.get("status") == "FAILURE"]
    assert not failed, json.dumps(failed, indent=1)[:3000]
    assert any(c.get("status") == "SUCCESS" for c in checks), checks
    assert done.returncode == 0, report[-3000:]
    summary = re.search(r"Passed:\s*(\d+)/(\d+),\s*(\d+) failed", report)
    assert summary, report[-3000:]
    passed, total, nfailed = (int(g) for g in summary.groups())
    assert nfailed == 0 and passed == total > 0, summary.group(0)
    assert proc.proc.poll() is None, "the server died during the scenario"
