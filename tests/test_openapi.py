"""The custom-GPT Actions front door: /openapi.json and POST /actions/<tool> (SPEC §5, §7;
protocols.md §3.6, T21)."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
from pbtest import Mcp, action, git, request, write_channel

openapi_spec_validator = pytest.importorskip("openapi_spec_validator")

PROFILES = ["readonly", "worker", "power", "full"]
ACTIONS_LIMIT = 100_000  # ChatGPT refuses Action responses of 100k characters or more
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def get_openapi(base: str) -> Tuple[Dict[str, Any], Dict[str, str]]:
    status, hdrs, raw = request(base + "/openapi.json")
    assert status == 200, raw[:300]
    assert hdrs["content-type"].startswith("application/json")
    return json.loads(raw), hdrs


def operations(spec: Dict[str, Any]) -> List[Tuple[str, str, Dict[str, Any]]]:
    return [(path, method, op) for path, item in spec["paths"].items()
            for method, op in item.items() if method in HTTP_METHODS]


def mcp_tools(base: str, token: str | None = None) -> Dict[str, Dict[str, Any]]:
    client = Mcp(base, token)
    client.initialize()
    return {t["name"]: t for t in client.rpc("tools/list")["result"]["tools"]}




@pytest.mark.parametrize("profile", PROFILES)
def test_openapi_validates_as_3_1(start_server, profile):
    spec, _ = get_openapi(start_server(profile=profile).url)
    assert spec["openapi"].startswith("3.1.")
    openapi_spec_validator.validate(spec, cls=openapi_spec_validator.OpenAPIV31SpecValidator)


def test_validator_really_rejects_a_broken_document(server):
    """Guard for the test above: the validator is live, not a no-op."""
    spec, _ = get_openapi(server.url)
    broken = json.loads(json.dumps(spec))
    first = next(iter(broken["paths"].values()))["post"]
    first["responses"] = "not an object"
    with pytest.raises(Exception):  # noqa: B017 - the validator's own error type
        openapi_spec_validator.validate(broken,
                                        cls=openapi_spec_validator.OpenAPIV31SpecValidator)


@pytest.mark.parametrize("profile", PROFILES)
def test_operation_ids_unique_and_texts_within_openai_limits(start_server, profile):
    spec, _ = get_openapi(start_server(profile=profile).url)
    ops = operations(spec)
    assert ops
    ids = [op["operationId"] for _, _, op in ops]
    assert all(isinstance(i, str) and i for i in ids)
    assert len(ids) == len(set(ids)), ids
    for path, _, op in ops:
        assert isinstance(op.get("summary"), str) and op["summary"].strip(), path
        assert len(op["summary"]) <= 300, (path, len(op["summary"]))
        assert len(op.get("description", "")) <= 300, path
        body_schema = op["requestBody"]["content"]["application/json"]["schema"]
        for name, prop in body_schema.get("properties", {}).items():
            assert len(prop.get("description", "")) <= 700, (path, name)
        for param in op.get("parameters", []):
            assert len(param.get("description", "")) <= 700, (path, param.get("name"))


@pytest.mark.parametrize("profile", PROFILES)
def test_is_consequential_is_explicit_and_false_exactly_for_read_only_tools(start_server,
                                                                            profile):
    srv = start_server(profile=profile)
    spec, _ = get_openapi(srv.url)
    tools = mcp_tools(srv.url)
    for path, method, op in operations(spec):
        assert "x-openai-isConsequential" in op, (path, method)
        flag = op["x-openai-isConsequential"]
        assert isinstance(flag, bool), (path, flag)
        name = path.rsplit("/", 1)[-1]
        read_only = tools[name]["annotations"]["readOnlyHint"]
        assert flag is (not read_only), (name, flag, read_only)


@pytest.mark.parametrize("profile", PROFILES)
def test_actions_paths_and_tools_are_the_same_set(start_server, profile):
    srv = start_server(profile=profile)
    spec, _ = get_openapi(srv.url)
    tools = mcp_tools(srv.url)
    paths = {}
    for path, item in spec["paths"].items():
        assert path.startswith("/actions/"), path
        assert [m for m in item if m in HTTP_METHODS] == ["post"], (path, list(item))
        paths[path[len("/actions/"):]] = item["post"]
    assert set(paths) == set(tools)
    for name, op in paths.items():
        assert op["operationId"] == name
        schema = op["requestBody"]["content"]["application/json"]["schema"]
        assert schema == tools[name]["inputSchema"], name


def test_every_actions_path_answers(server):
    """Each documented path is a live route (none 404s as 'no such tool')."""
    spec, _ = get_openapi(server.url)
    for path in spec["paths"]:
        name = path[len("/actions/"):]
        status, body = action(server.url, name, {"__no_such_argument__": 1})
        assert status == 400, (name, status, body)
        assert body["error"] == "INVALID_ARG"
    status, body = action(server.url, "no_such_tool", {})
    assert status == 404


def test_servers_url_is_the_local_url(server):
    spec, _ = get_openapi(server.url)
    assert len(spec["servers"]) >= 1
    assert spec["servers"][0]["url"].rstrip("/") == server.url
    # The servers URL plus a path is where the Action really answers.
    path = next(iter(spec["paths"]))
    status, _ = action(spec["servers"][0]["url"].rstrip("/"), path.rsplit("/", 1)[-1], {})
    assert status != 404


def test_servers_url_is_the_public_base_url_when_configured(start_server):
    srv = start_server(public_base_url="https://x.example")
    spec, _ = get_openapi(srv.url)
    assert spec["servers"][0]["url"].rstrip("/") == "https://x.example"
    assert "127.0.0.1" not in json.dumps(spec["servers"])


def test_servers_url_follows_the_channel_public_url_without_restart(start_server, home):
    srv = start_server()
    spec, _ = get_openapi(srv.url)
    assert spec["servers"][0]["url"].rstrip("/") == srv.url
    write_channel(home, {"public_base_url": "https://tunnel.example"})
    spec, _ = get_openapi(srv.url)
    assert spec["servers"][0]["url"].rstrip("/") == "https://tunnel.example"


def test_openapi_declares_bearer_auth(start_server):
    token = secrets.token_urlsafe(32)
    srv = start_server(token=token)
    spec, _ = get_openapi(srv.url)  # public: ChatGPT imports it before it has a key
    schemes = spec["components"]["securitySchemes"]
    assert any(s.get("type") == "http" and s.get("scheme", "").lower() == "bearer"
               for s in schemes.values())
    assert spec.get("security"), "no top-level security requirement"
    status, _ = action(srv.url, "workspace", {})
    assert status == 401
    status, body = action(srv.url, "workspace", {}, token)
    assert status == 200 and body["workspace"]


# -- response sizes ----------------------------------------------------------------------

def _big_files(repo: Path) -> Dict[str, int]:
    """Realistic big files: source code, a log-like text with short lines, minified JSON."""
    code_line = "    result = compute_value(\"alpha\", 'beta', items[index])  # step\n"
    (repo / "big_module.py").write_text(code_line * 8000)                 # ~530 KB
    (repo / "notes.txt").write_text("".join("n%d\n" % i for i in range(60000)))
    records = [{"id": i, "name": "item-%d" % i, "tags": ["a", "b"], "ok": True}
               for i in range(6000)]
    (repo / "data.json").write_text(json.dumps(records, separators=(",", ":")))
    (repo / "unicode.txt").write_text("é\"ü\\ 𝄞\n" * 30000)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "big files")
    return {p: (repo / p).stat().st_size for p in
            ("big_module.py", "notes.txt", "data.json", "unicode.txt")}


@pytest.mark.parametrize("path", ["big_module.py", "notes.txt", "data.json", "unicode.txt"])
def test_actions_read_of_a_big_file_is_under_the_limit_and_truncated(repo, start_server, path):
    _big_files(repo)
    srv = start_server()
    status, hdrs, raw = request(srv.url + "/actions/read_file", "POST",
                                {"path": path, "max_lines": 20000},
                                {"Content-Type": "application/json"})
    text = raw.decode("utf-8")
    assert len(text) < ACTIONS_LIMIT, len(text)
    assert status == 200, text[:300]
    body = json.loads(text)
    assert body["truncated"] is True or body["next_start_line"] is not None
    assert body["text"] and body["end_line"] >= body["start_line"]


@pytest.mark.parametrize("path", ["big_module.py", "notes.txt", "data.json", "unicode.txt"])
def test_actions_fetch_of_a_big_file_is_under_the_limit_and_truncated(repo, start_server, path):
    _big_files(repo)
    srv = start_server()
    status, _, raw = request(srv.url + "/actions/fetch", "POST", {"id": path},
                             {"Content-Type": "application/json"})
    text = raw.decode("utf-8")
    assert len(text) < ACTIONS_LIMIT, len(text)
    assert status == 200, text[:300]
    body = json.loads(text)
    assert body["metadata"]["truncated"] is True and body["text"]


def test_actions_search_with_many_hits_is_under_the_limit(repo, start_server):
    _big_files(repo)
    srv = start_server()
    status, _, raw = request(srv.url + "/actions/search", "POST",
                             {"query": "compute_value", "max_results": 1000},
                             {"Content-Type": "application/json"})
    text = raw.decode("utf-8")
    assert len(text) < ACTIONS_LIMIT, len(text)
    assert status == 200, text[:300]
    body = json.loads(text)
    assert body["results"] and body["truncated"] is True
