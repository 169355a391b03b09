"""The channel (PATCHBAY_HOME/config.json), its token, access and workspaces, profiles, and
the checking commands doctor, verify, status and api-smoke (SPEC §2, §3; issue 5).

Everything runs as the user would run it: `python patchbay.py --home H COMMAND ...` as a
real process, against real `patchbay.py serve` children. A server started without --root
reads its workspaces and token from the channel, so every change made by a CLI command
must be seen by the running server on its next request, with no restart.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import patchbay
import pytest
from pbtest import (PATCHBAY_ENV, SCRIPT, Mcp, ServeProcess, action, cli, make_repo, one_error,
                    post_json, request, write_channel)

PY = sys.executable
TOKEN_SHAPE = re.compile(r"^[A-Za-z0-9_-]{43}$")  # 32 random bytes, URL-safe base64

# ---------------------------------------------------------------------------------------
# Helpers local to this file
# ---------------------------------------------------------------------------------------


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, (proc.args, proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stdout


def config(home: Path) -> Dict[str, Any]:
    data: Dict[str, Any] = json.loads((home / "config.json").read_text())
    return data




def register(home: Path, workspace: Path, *extra: str) -> str:
    out = ok(cli(home, "channel", "register", "--workspace", str(workspace), *extra))
    token = str(config(home)["token"])
    assert token in out  # register is one of the commands that print it
    return token


def printed_token(stdout: str) -> str:
    m = re.search(r"^token: (\S+)$", stdout, re.M)
    assert m, stdout
    return m.group(1)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def workspace_of(base: str, token: Optional[str]) -> Tuple[int, Any]:
    return action(base, "workspace", {}, token)


def mcp_call(base: str, token: str, session: Optional[str], name: str) -> Tuple[int, Any]:
    headers = {"Mcp-Session-Id": session, "MCP-Protocol-Version": "2025-06-18"} \
        if session else {}
    status, _, body = post_json(base + "/mcp", {
        "jsonrpc": "2.0", "id": 7, "method": "tools/call",
        "params": {"name": name, "arguments": {}}}, token, headers)
    return status, body


def mcp_init_status(base: str, token: str) -> Tuple[int, Any]:
    status, _, body = post_json(base + "/mcp", {
        "jsonrpc": "2.0", "id": 0, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                   "clientInfo": {"name": "test_channel", "version": "1"}}}, token)
    return status, body


@pytest.fixture
def serve(home: Path) -> Iterator[Callable[..., ServeProcess]]:
    """Factory: serve(*extra, roots=(), env=None). No roots: the server uses the channel."""
    started: List[ServeProcess] = []

    def start(*extra: str, roots: Tuple[Path, ...] = (),
              env: Optional[Dict[str, str]] = None) -> ServeProcess:
        proc = ServeProcess(home, list(roots), tuple(extra), env)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


# ---------------------------------------------------------------------------------------
# register, status, token: what is written and what is printed
# ---------------------------------------------------------------------------------------


def test_stdio_creates_a_private_home_with_private_parents(tmp_path: Path, repo: Path) -> None:
    """`stdio` may be the first to create PATCHBAY_HOME (on the way to its logs): every
    directory it makes is 0700 even under a 022 umask."""
    home = tmp_path / "new" / "nested" / "home"
    lines = [{"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "t", "version": "1"}}},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
         "params": {"name": "read_file", "arguments": {"path": "README.md"}}}]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PATCHBAY_")}
    out = subprocess.run([sys.executable, str(SCRIPT), "--home", str(home), "stdio",
                          "--root", str(repo)], input="".join(json.dumps(m) + "\n"
                                                               for m in lines),
                         capture_output=True, text=True, timeout=60, env=env, umask=0o022)
    answers = [json.loads(line) for line in out.stdout.splitlines()]
    assert answers[-1]["result"]["isError"] is False, out
    made = [tmp_path / "new", tmp_path / "new" / "nested"]
    made += [Path(d) for d, _, _ in os.walk(home)]
    assert len(made) > 3, made  # the home and at least its logs directory
    for directory in made:
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700, directory


def test_register_writes_private_config_and_prints_token(repo: Path, home: Path) -> None:
    home.mkdir(mode=0o755)
    os.chmod(home, 0o755)  # an existing, too open home is tightened
    proc = cli(home, "channel", "register", "--workspace", str(repo), "--name", "demo",
               "--public-base-url", "https://pb.example.com/", "--ttl-minutes", "30")
    out = ok(proc)
    assert stat.S_IMODE(os.stat(home).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(home / "config.json").st_mode) == 0o600
    data = config(home)
    token = data["token"]
    assert TOKEN_SHAPE.match(token), token
    assert token in out
    assert data["workspaces"] == {"demo": os.path.realpath(repo)}
    assert data["active_workspace"] == "demo"
    assert data["public_base_url"] == "https://pb.example.com"
    expires = patchbay.parse_iso(data["access_expires_at"])
    assert expires is not None
    left = (expires - patchbay.utc_now()).total_seconds()
    assert 25 * 60 < left <= 30 * 60 + 5
    # the ChatGPT settings it prints point at the public URL
    assert "https://pb.example.com/mcp?patchbay_token=" + token in out
    assert "https://pb.example.com/openapi.json" in out
    # no temp files left behind by the atomic write
    assert sorted(p.name for p in home.iterdir()) == ["config.json"]


def test_second_register_needs_force(repo: Path, home: Path, tmp_path: Path) -> None:
    first = register(home, repo)
    line = one_error(cli(home, "channel", "register", "--workspace", str(repo)))
    assert "already exists" in line and "--force" in line
    assert first not in line
    assert config(home)["token"] == first  # untouched
    other = make_repo(tmp_path / "other")
    out = ok(cli(home, "channel", "register", "--workspace", str(other), "--force"))
    data = config(home)
    assert data["token"] != first and data["token"] in out
    assert data["workspaces"] == {"other": os.path.realpath(other)}


def test_token_never_printed_by_status_commands(repo: Path, home: Path) -> None:
    token = register(home, repo, "--ttl-minutes", "10")
    port = str(free_port())  # nothing listens there: status says so
    for argv in (["channel", "status"], ["--json", "channel", "status"],
                 ["access", "status"], ["--json", "access", "status"],
                 ["status", "--port", port], ["--json", "status", "--port", port],
                 ["doctor", "--port", port], ["--json", "doctor", "--port", port],
                 ["workspace", "list"]):
        proc = cli(home, *argv)
        out = ok(proc)
        assert token not in proc.stdout + proc.stderr, argv
        assert out.strip(), argv
    status = json.loads(ok(cli(home, "--json", "channel", "status")))
    assert status["token"] == "set (hidden)"
    assert status["active_workspace"] == "repo"
    assert status["access"].startswith("active until")
    access = json.loads(ok(cli(home, "--json", "access", "status")))
    assert access["access_expires_at"] == config(home)["access_expires_at"]
    summary = json.loads(ok(cli(home, "--json", "status", "--port", port)))
    assert summary["channel"].startswith("registered")
    assert "not reachable" in summary["server"]
    # the explicit one
    assert ok(cli(home, "token")).strip() == token


@pytest.mark.parametrize("argv,needle", [
    (["channel", "status"], "channel register"),
    (["channel", "renew"], "channel register"),
    (["channel", "revoke"], "channel register"),
    (["token"], "channel register"),
    (["rotate-token"], "channel register"),
    (["access", "status"], "channel register"),
    (["access", "grant", "--ttl-minutes", "5"], "channel register"),
    (["channel", "register"], "--workspace"),
    (["channel", "register", "--workspace", "/nonexistent/dir"], "not a directory"),
    (["workspace", "switch", "nope"], "nope"),
    (["workspace", "add", "--name", "x"], "--path"),
    (["serve", "--port", "0"], "channel register"),  # no --root, no channel
])
def test_errors_are_one_line(home: Path, argv: List[str], needle: str) -> None:
    proc = cli(home, *argv)
    line = one_error(proc)
    assert needle in line
    assert proc.stdout == ""
    assert not (home / "config.json").exists()


def test_bad_public_url_and_broken_config_are_one_line_errors(repo: Path, home: Path) -> None:
    line = one_error(cli(home, "channel", "register", "--workspace", str(repo),
                         "--public-base-url", "ftp://x.example"))
    assert "--public-base-url" in line
    register(home, repo)
    (home / "config.json").write_text("{not json")
    proc = cli(home, "channel", "status")
    assert proc.returncode in (1, 2)
    line = one_error(proc, proc.returncode)
    assert "config.json" in line


# ---------------------------------------------------------------------------------------
# The lifecycle against a running server (no restart between steps)
# ---------------------------------------------------------------------------------------


def test_lifecycle_register_rotate_revoke_renew(repo: Path, home: Path,
                                                serve: Callable[..., ServeProcess]) -> None:
    token = register(home, repo)
    srv = serve()  # no --root, no --token-file: the channel gives both
    st, body = workspace_of(srv.url, token)
    assert st == 200 and body["workspace"] == "repo", body
    assert workspace_of(srv.url, None)[0] == 401
    assert workspace_of(srv.url, token + "x")[0] == 401
    client = Mcp(srv.url, token)
    client.initialize()
    result, is_error = client.call("workspace")
    assert not is_error and result["workspace"] == "repo"

    # rotate-token: the old token is dead on the next request
    rotated = ok(cli(home, "rotate-token")).strip()
    assert rotated != token and TOKEN_SHAPE.match(rotated)
    assert config(home)["token"] == rotated
    status, hdrs, _ = post_json(srv.url + "/actions/workspace", {}, token)
    assert status == 401 and hdrs["www-authenticate"].lower().startswith("bearer")
    assert mcp_call(srv.url, token, client.session, "workspace")[0] == 401
    assert mcp_init_status(srv.url, token)[0] == 401
    st, body = workspace_of(srv.url, rotated)
    assert st == 200 and body["workspace"] == "repo"
    client = Mcp(srv.url, rotated)
    client.initialize()
    assert client.call("workspace")[1] is False

    # revoke: the token is rotated without being printed, and access is expired
    proc = cli(home, "channel", "revoke")
    ok(proc)
    revoked = config(home)["token"]
    assert revoked not in (rotated, token)
    assert revoked not in proc.stdout + proc.stderr
    assert rotated not in proc.stdout + proc.stderr
    assert workspace_of(srv.url, rotated)[0] == 401
    st, body = workspace_of(srv.url, revoked)
    assert st == 403 and body["error"] == "access_expired", body
    assert mcp_init_status(srv.url, revoked)[0] == 403
    assert request(srv.url + "/health")[0] == 200  # public GETs still answer
    assert "expired" in ok(cli(home, "access", "status"))

    # renew with a TTL: prints a token that works at once
    out = ok(cli(home, "channel", "renew", "--ttl-minutes", "1"))
    renewed = printed_token(out)
    assert renewed == config(home)["token"]
    expires = patchbay.parse_iso(config(home)["access_expires_at"])
    assert expires is not None
    assert 30 < (expires - patchbay.utc_now()).total_seconds() <= 65
    st, body = workspace_of(srv.url, renewed)
    assert st == 200 and body["workspace"] == "repo", body
    assert mcp_init_status(srv.url, renewed)[0] == 200

    # renew --rotate-token: a new printed token, the previous one is refused
    out = ok(cli(home, "channel", "renew", "--rotate-token"))
    newest = printed_token(out)
    assert newest != renewed
    assert workspace_of(srv.url, renewed)[0] == 401
    assert workspace_of(srv.url, newest)[0] == 200
    assert srv.proc.poll() is None  # the same server process throughout


@pytest.mark.parametrize("source", ["env", "file"])
def test_rotation_retires_a_static_token_for_good(tmp_path: Path, repo: Path, home: Path,
                                                  serve: Callable[..., ServeProcess],
                                                  source: str) -> None:
    """A static token (PATCHBAY_HTTP_TOKEN or --token-file) never silently outlives a
    rotation: once the channel's token changes, the running server takes the channel's
    token and refuses the static one, also after revoke and renew."""
    channel_token = register(home, repo)
    static = patchbay.new_token()
    if source == "env":
        srv = serve(env={patchbay.ENV_TOKEN: static})
    else:
        (tmp_path / "token").write_text(static + "\n")
        srv = serve("--token-file", str(tmp_path / "token"))
    assert workspace_of(srv.url, static)[0] == 200
    assert workspace_of(srv.url, channel_token)[0] == 401
    ok(cli(home, "access", "grant", "--ttl-minutes", "60"))  # no rotation: static still rules
    assert workspace_of(srv.url, static)[0] == 200

    rotated = ok(cli(home, "rotate-token")).strip()
    assert workspace_of(srv.url, static)[0] == 401
    assert workspace_of(srv.url, rotated)[0] == 200

    ok(cli(home, "channel", "revoke"))
    assert workspace_of(srv.url, static)[0] == 401
    assert workspace_of(srv.url, rotated)[0] == 401
    renewed = printed_token(ok(cli(home, "channel", "renew")))
    assert workspace_of(srv.url, renewed)[0] == 200
    for old in (static, rotated, channel_token):  # renew brings no old token back
        assert workspace_of(srv.url, old)[0] == 401
    assert srv.proc.poll() is None


def test_access_ttl_passes_while_server_runs(repo: Path, home: Path,
                                             serve: Callable[..., ServeProcess]) -> None:
    token = register(home, repo)
    srv = serve()
    for margin in (1.5, 6.0):  # a second try only if this machine was too slow
        expires_at = time.time() + margin
        stamp = datetime.datetime.fromtimestamp(expires_at, datetime.timezone.utc)
        write_channel(home, dict(config(home), access_expires_at=stamp.isoformat(
            timespec="milliseconds").replace("+00:00", "Z")))
        st, body = workspace_of(srv.url, token)
        if time.time() < expires_at:  # the call was answered before the expiry
            break
    assert st == 200, body
    while time.time() < expires_at + 0.2:
        time.sleep(0.1)
    st, body = workspace_of(srv.url, token)
    assert st == 403 and body == {"error": "access_expired", "message": body["message"]}
    assert mcp_init_status(srv.url, token)[0] == 403
    status, _, _ = request(srv.url + "/mcp?patchbay_token=" + token, "POST", {
        "jsonrpc": "2.0", "id": 1, "method": "ping"},
        {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"})
    assert status == 403
    assert request(srv.url + "/health")[0] == 200
    assert "expired at" in ok(cli(home, "access", "status"))

    # grant brings it back, revoke ends it again, no restart
    assert "active until" in ok(cli(home, "access", "grant", "--ttl-minutes", "5"))
    assert workspace_of(srv.url, token)[0] == 200
    ok(cli(home, "access", "revoke"))
    assert workspace_of(srv.url, token)[0] == 403
    assert config(home)["token"] == token  # access revoke does not rotate
    ok(cli(home, "access", "grant"))  # no TTL: no expiry
    assert config(home)["access_expires_at"] == ""
    assert workspace_of(srv.url, token)[0] == 200


def test_workspace_add_switch_remove_seen_by_running_server(
        tmp_path: Path, repo: Path, home: Path, serve: Callable[..., ServeProcess]) -> None:
    token = register(home, repo)
    second = make_repo(tmp_path / "second")
    (second / "only-b.txt").write_text("bee\n")
    srv = serve()
    client = Mcp(srv.url, token)
    client.initialize()
    assert client.call("workspace")[0]["workspace"] == "repo"

    out = ok(cli(home, "workspace", "add", "--name", "b", "--path", str(second)))
    assert "b" in out.split()
    st, body = workspace_of(srv.url, token)
    assert st == 200 and body["workspace"] == "repo" and set(body["workspaces"]) == {"repo", "b"}

    ok(cli(home, "workspace", "switch", "b"))
    assert config(home)["active_workspace"] == "b"
    st, body = workspace_of(srv.url, token)
    assert st == 200 and body["workspace"] == "b", body
    result, is_error = client.call("workspace")  # the session made no choice of its own
    assert not is_error and result["workspace"] == "b", result
    st, body = action(srv.url, "read_file", {"path": "only-b.txt"}, token)
    assert st == 200 and body["text"] == "bee\n", body
    listing = ok(cli(home, "workspace", "list"))
    assert re.search(r"^\* b\s+%s$" % re.escape(os.path.realpath(second)), listing, re.M)

    ok(cli(home, "workspace", "remove", "b"))
    data = config(home)
    assert data["workspaces"] == {"repo": os.path.realpath(repo)}
    assert data["active_workspace"] == "repo"
    st, body = workspace_of(srv.url, token)
    assert st == 200 and body["workspace"] == "repo" and body["workspaces"] == ["repo"], body
    assert client.call("workspace")[0]["workspace"] == "repo"
    st, body = action(srv.url, "read_file", {"path": "only-b.txt"}, token)
    assert st == 404, body
    one_error(cli(home, "workspace", "switch", "b"))


def test_root_narrows_and_ignores_the_registry(tmp_path: Path, repo: Path, home: Path,
                                               serve: Callable[..., ServeProcess]) -> None:
    token = register(home, repo)
    second = make_repo(tmp_path / "second")
    srv = serve(roots=(second,))
    st, body = workspace_of(srv.url, token)  # the token still comes from the channel
    assert st == 200 and body["workspace"] == "second" and body["workspaces"] == ["second"]
    ok(cli(home, "workspace", "switch", "repo"))
    st, body = workspace_of(srv.url, token)
    assert st == 200 and body["workspaces"] == ["second"], body


def test_removing_the_last_workspace_stops_serving_it(
        repo: Path, home: Path, serve: Callable[..., ServeProcess]) -> None:
    """`workspace remove` hides a workspace from a running server; removing the only one
    must not leave the server serving it (either the CLI refuses, or calls are refused)."""
    token = register(home, repo)
    srv = serve()
    st, body = action(srv.url, "read_file", {"path": "README.md"}, token)
    assert st == 200, body
    proc = cli(home, "workspace", "remove", "repo")
    if proc.returncode == 2:  # refusing to remove the last workspace is fine too
        one_error(proc)
        return
    ok(proc)
    assert config(home)["workspaces"] == {}
    st, body = action(srv.url, "read_file", {"path": "README.md"}, token)
    assert st != 200, "the removed workspace is still served: %r" % (body,)
    st, body = workspace_of(srv.url, token)
    assert st != 200 or body.get("workspace") != "repo", body


def test_running_server_follows_new_public_url(repo: Path, home: Path,
                                               serve: Callable[..., ServeProcess]) -> None:
    token = register(home, repo, "--public-base-url", "https://old.example")
    srv = serve()
    assert json.loads(request(srv.url + "/openapi.json")[2])["servers"][0]["url"] == \
        "https://old.example"
    assert request(srv.url + "/health", headers={"Host": "old.example"})[0] == 200
    assert request(srv.url + "/health", headers={"Host": "new.example"})[0] == 421
    out = ok(cli(home, "channel", "renew", "--public-base-url", "https://new.example"))
    assert "https://new.example/mcp?patchbay_token=" + token in out
    assert json.loads(request(srv.url + "/openapi.json")[2])["servers"][0]["url"] == \
        "https://new.example"
    assert request(srv.url + "/health", headers={"Host": "new.example"})[0] == 200
    assert request(srv.url + "/health", headers={"Host": "old.example"})[0] == 421
    status, _, body = post_json(srv.url + "/actions/workspace", {}, token,
                                {"Host": "new.example"})
    assert status == 200, body


def test_token_sources_in_order(tmp_path: Path, repo: Path, home: Path,
                                serve: Callable[..., ServeProcess]) -> None:
    """--token-file, then PATCHBAY_HTTP_TOKEN, then the channel (SPEC §2, issue 5)."""
    channel_token = register(home, repo)
    env_token, file_token = patchbay.new_token(), patchbay.new_token()
    token_file = tmp_path / "token"
    token_file.write_text(file_token + "\n")
    srv = serve("--token-file", str(token_file), env={patchbay.ENV_TOKEN: env_token})
    assert workspace_of(srv.url, file_token)[0] == 200
    assert workspace_of(srv.url, env_token)[0] == 401
    assert workspace_of(srv.url, channel_token)[0] == 401
    srv = serve(env={patchbay.ENV_TOKEN: env_token})
    assert workspace_of(srv.url, env_token)[0] == 200
    assert workspace_of(srv.url, channel_token)[0] == 401
    srv = serve()
    assert workspace_of(srv.url, channel_token)[0] == 200
    assert workspace_of(srv.url, env_token)[0] == 401


# ---------------------------------------------------------------------------------------
# Launch profiles
# ---------------------------------------------------------------------------------------


def test_save_profile_keeps_token_named_settings_drops_secrets(home: Path) -> None:
    settings = {"token": "s3cret-one", "http_token": "s3cret-two", "password": "s3cret-3",
                "token_file": "/etc/pb/token", "cloudflare_token_file": "/etc/pb/cf",
                "allow_query_token": False, "port": 9123, "roots": ["/srv/repo"],
                "tunnel": "cloudflare", "public_base_url": "https://pb.example.com"}
    path = Path(patchbay.save_profile(str(home), "x", settings))
    assert path == home / "profiles" / "x.json"
    text = path.read_text()
    assert "s3cret" not in text
    saved = json.loads(text)
    for key in ("token", "http_token", "password"):
        assert key not in saved
    assert saved["token_file"] == "/etc/pb/token"
    assert saved["cloudflare_token_file"] == "/etc/pb/cf"
    assert saved["allow_query_token"] is False
    assert saved["port"] == 9123 and saved["roots"] == ["/srv/repo"]
    assert saved["tunnel"] == "cloudflare"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    cfg = patchbay.Config.resolve(str(home), "x", environ={})  # and it loads back
    assert cfg.token_file == "/etc/pb/token" and cfg.allow_query_token is False
    assert cfg.port == 9123 and cfg.tunnel == "cloudflare"


def test_serve_save_profile_then_profile(tmp_path: Path, repo: Path, home: Path,
                                         serve: Callable[..., ServeProcess]) -> None:
    token = patchbay.new_token()
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    port = free_port()
    srv = serve("--port", str(port), "--save-profile", "mine", "--allow-host", "box.example",
                "--token-file", str(token_file), roots=(repo,))
    assert srv.port == port
    assert srv.stop() == 0
    assert "profile" in srv.stderr() and "mine" in srv.stderr()
    path = home / "profiles" / "mine.json"
    saved = json.loads(path.read_text())
    assert token not in path.read_text()
    assert saved["port"] == port
    assert saved["roots"] == [str(repo)]
    assert saved["token_file"] == str(token_file)
    assert saved["allow_hosts"] == ["box.example"]

    # --profile NAME, and nothing else: port, roots, token file and hosts come back
    env = {k: v for k, v in os.environ.items() if k not in PATCHBAY_ENV}
    proc = subprocess.Popen([PY, str(SCRIPT), "--home", str(home), "serve", "--profile",
                             "mine"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert line == "patchbay listening on http://127.0.0.1:%d/\n" % port, line
        base = "http://127.0.0.1:%d" % port
        st, body = workspace_of(base, token)
        assert st == 200 and body["workspace"] == "repo" and body["profile"] == "mine", body
        assert workspace_of(base, None)[0] == 401
        assert request(base + "/health", headers={"Host": "box.example"})[0] == 200
        assert request(base + "/health", headers={"Host": "other.example"})[0] == 421
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)


def test_save_profile_with_a_builtin_name_is_not_silently_shadowed(
        repo: Path, home: Path, serve: Callable[..., ServeProcess]) -> None:
    """`--save-profile readonly` must either be refused, or `--profile readonly` must then
    give back what was saved; it must not say "use --profile readonly" and then load the
    built-in profile instead."""
    port = free_port()
    try:
        srv = serve("--port", str(port), "--save-profile", "readonly", roots=(repo,))
    except AssertionError as exc:  # refused at start: a clear one-line error is enough
        assert "patchbay: error:" in str(exc) and "Traceback" not in str(exc)
        return
    srv.stop()
    cfg = patchbay.Config.resolve(str(home), "readonly", environ={})
    assert cfg.port == port and cfg.roots == [str(repo)], (
        "saved as profiles/readonly.json, but --profile readonly loads the built-in: "
        "port %s, roots %s" % (cfg.port, cfg.roots))


def test_unknown_profile_is_one_line_error(home: Path) -> None:
    line = one_error(cli(home, "serve", "--profile", "nosuchprofile", "--port", "0"))
    assert "nosuchprofile" in line and "--save-profile" in line


# ---------------------------------------------------------------------------------------
# doctor, api-smoke, verify, status
# ---------------------------------------------------------------------------------------


def bare_path(tmp_path: Path) -> str:
    """A PATH with git and python only: no codex, no cloudflared, no ngrok, no rg."""
    bindir = tmp_path / "bin"
    if bindir.is_dir():
        return str(bindir)
    bindir.mkdir()
    git = shutil.which("git")
    assert git
    os.symlink(git, bindir / "git")
    os.symlink(PY, bindir / "python3")
    os.symlink(PY, bindir / "python")
    return str(bindir)


def doctor_lines(stdout: str) -> Dict[str, Tuple[str, str]]:
    rows: Dict[str, Tuple[str, str]] = {}
    for line in stdout.splitlines():
        m = re.match(r"^(ok|warn|fail)\s+(\S+)\s+(.*)$", line)
        assert m, "doctor line without ok/warn/fail: %r" % line
        rows[m.group(2)] = (m.group(1), m.group(3))
    return rows


def test_doctor_without_codex_and_tunnels(tmp_path: Path, repo: Path, home: Path) -> None:
    token = register(home, repo)
    env = {"PATH": bare_path(tmp_path)}
    proc = cli(home, "doctor", "--port", str(free_port()), env=env)
    out = ok(proc)
    assert token not in proc.stdout + proc.stderr
    rows = doctor_lines(out)
    assert rows["python"][0] == "ok"
    assert rows["git"][0] == "ok" and "git version" in rows["git"][1]
    status, detail = rows["codex"]
    assert status == "warn" and "install" in detail and "@openai/codex" in detail
    status, detail = rows["cloudflared"]
    assert status == "warn" and "install" in detail and "cloudflared" in detail
    assert "http" in detail  # where to get it
    status, detail = rows["ngrok"]
    assert status == "warn" and "install" in detail and "ngrok" in detail
    assert rows["token"][0] == "ok" and "hidden" in rows["token"][1]
    assert rows["home"][0] == "ok"
    assert not [k for k, (st, _) in rows.items() if st == "fail"]
    checks = json.loads(ok(cli(home, "--json", "doctor", "--port", str(free_port()), env=env)))
    assert {c["check"]: c["status"] for c in checks}["codex"] == "warn"
    assert all(c["status"] in ("ok", "warn") for c in checks), checks
    # the same PATH, with the binaries named by CLOUDFLARED_BIN / NGROK_BIN: found
    fakes = Path(__file__).resolve().parent / "fakes"
    rows = doctor_lines(ok(cli(home, "doctor", "--port", str(free_port()), env=dict(
        env, CLOUDFLARED_BIN=str(fakes / "cloudflared"), NGROK_BIN=str(fakes / "ngrok")))))
    assert rows["cloudflared"] == ("ok", "cloudflared version 2024.6.1 (built "
                                         "2024-06-18-1402 UTC)")
    assert rows["ngrok"] == ("ok", "ngrok version 3.19.0")
    assert rows["codex"][0] == "warn"


def test_doctor_fails_on_open_home(tmp_path: Path, repo: Path, home: Path) -> None:
    register(home, repo)
    os.chmod(home, 0o755)
    proc = cli(home, "doctor", "--port", str(free_port()), env={"PATH": bare_path(tmp_path)})
    assert proc.returncode == 1, proc.stdout
    status, detail = doctor_lines(proc.stdout)["home"]
    assert status == "fail" and "chmod 700" in detail
    os.chmod(home / "config.json", 0o644)
    os.chmod(home, 0o700)
    proc = cli(home, "doctor", "--port", str(free_port()), env={"PATH": bare_path(tmp_path)})
    assert proc.returncode == 1
    status, detail = doctor_lines(proc.stdout)["config.json"]
    assert status == "fail" and "chmod 600" in detail


def test_api_smoke_passes(home: Path) -> None:
    out = ok(cli(home, "api-smoke"))
    assert "FAIL" not in out
    rows = {}
    for line in out.splitlines()[1:]:
        parts = line.split()
        if len(parts) == 3 and parts[1] in ("PASS", "SKIP", "FAIL"):
            rows[parts[0]] = (parts[1], parts[2])
    for tool in ("workspace", "list_files", "read_file", "search", "fetch", "write_file",
                 "edit_file", "apply_patch", "run_command"):
        assert rows.get(tool) == ("PASS", "PASS"), (tool, out)
    assert re.search(r"^\d+ passed, 0 failed", out, re.M), out
    assert not home.exists() or not (home / "config.json").exists()  # a throwaway home


def test_verify_passes_against_running_server(repo: Path, home: Path,
                                              serve: Callable[..., ServeProcess]) -> None:
    token = register(home, repo)
    srv = serve()
    proc = cli(home, "verify", "--base-url", srv.url)
    out = ok(proc)
    assert token not in proc.stdout + proc.stderr
    assert not re.search(r"^fail", out, re.M), out
    for name in ("health", "openapi servers", "no token refused", "mcp tools/list",
                 "actions call", "host check"):
        assert re.search(r"^ok\s+%s\b" % re.escape(name), out, re.M), (name, out)
    checks = json.loads(ok(cli(home, "--json", "verify", "--base-url", srv.url)))
    assert len(checks) == 6 and all(c["status"] == "ok" for c in checks), checks
    # status sees the same server, without the token
    proc = cli(home, "status", "--port", str(srv.port))
    assert "running at" in ok(proc) and token not in proc.stdout + proc.stderr


def test_verify_catches_wrong_servers_url(repo: Path, home: Path,
                                          serve: Callable[..., ServeProcess]) -> None:
    register(home, repo)
    srv = serve("--public-base-url", "https://wrong.example")
    st, _, body = request(srv.url + "/openapi.json")
    assert st == 200 and json.loads(body)["servers"][0]["url"] == "https://wrong.example"
    proc = cli(home, "verify", "--base-url", srv.url)
    assert proc.returncode == 1, proc.stdout
    assert "Traceback" not in proc.stderr
    line = [ln for ln in proc.stdout.splitlines() if "openapi servers" in ln]
    assert len(line) == 1 and line[0].startswith("fail"), proc.stdout
    assert "https://wrong.example" in line[0] and srv.url in line[0]
    # the other checks still pass: only the mismatch is reported
    assert [ln for ln in proc.stdout.splitlines() if ln.startswith("fail")] == line


def test_verify_unreachable_server_fails_cleanly(home: Path) -> None:
    proc = cli(home, "verify", "--base-url", "http://127.0.0.1:%d" % free_port())
    assert proc.returncode == 1
    assert "Traceback" not in proc.stdout + proc.stderr
    assert re.search(r"^fail\s+health", proc.stdout, re.M), proc.stdout
