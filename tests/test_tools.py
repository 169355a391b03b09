"""The context tools (SPEC §7) over real HTTP, through both front doors.

workspace, switch_workspace, list_files, read_file, search (on rg, git grep and the
Python scan), fetch and changes, plus argument validation, repository-controlled programs
(clean filters, fsmonitor) and the audit log. Real repositories, real git, real servers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple

import patchbay
import pytest
from pbtest import (RG, Call, InProcessServer, Mcp, action, both_doors, err, git, make_app,
                    make_repo, need_rg, ok, request)

BACKENDS = ("rg", "git", "python")


def paths_of(result: Dict[str, Any]) -> List[str]:
    return [e["path"] for e in result["entries"]]


def hits_of(result: Dict[str, Any]) -> List[Tuple[str, int, str]]:
    return sorted((h["path"], h["line"], h["snippet"]) for h in result["results"])


# ---------------------------------------------------------------------------------------
# read_file
# ---------------------------------------------------------------------------------------

def numbered(n: int, width: int = 7) -> str:
    return "".join("line %0*d\n" % (width - 5, i) for i in range(1, n + 1))


def json_chars(text: str) -> int:
    """Characters text takes inside a JSON string (what text_chars limits)."""
    return len(json.dumps(text, ensure_ascii=False)) - 2


def test_read_file_pages_by_line(start_server, repo):
    text = numbered(10)  # "line 01\n" ... "line 10\n"
    (repo / "lines.txt").write_text(text)
    digest = hashlib.sha256(text.encode()).hexdigest()
    lines = text.splitlines(keepends=True)
    for door, call in both_doors(start_server().url):
        r = ok(call, "read_file", {"path": "lines.txt", "start_line": 3, "max_lines": 4})
        assert r["text"] == "".join(lines[2:6]), door
        assert (r["start_line"], r["end_line"], r["next_start_line"]) == (3, 6, 7)
        assert r["total_lines"] == 10 and r["sha256"] == digest and r["truncated"] is False
        r = ok(call, "read_file", {"path": "lines.txt", "start_line": 7, "max_lines": 4})
        assert r["text"] == "".join(lines[6:]) and r["end_line"] == 10
        assert r["next_start_line"] is None and r["sha256"] == digest
        r = ok(call, "read_file", {"path": "lines.txt"})
        assert r["text"] == text and r["next_start_line"] is None and r["end_line"] == 10
        # walking next_start_line reassembles the file exactly
        got, start = "", 1
        for _ in range(20):
            r = ok(call, "read_file", {"path": "lines.txt", "start_line": start, "max_lines": 3})
            got += r["text"]
            assert r["sha256"] == digest
            if r["next_start_line"] is None:
                break
            start = r["next_start_line"]
        assert got == text, door


def test_read_file_start_line_past_end_is_invalid(start_server, repo):
    (repo / "lines.txt").write_text(numbered(10))
    (repo / "empty.txt").write_text("")
    for door, call in both_doors(start_server().url):
        assert err(call, "read_file", {"path": "lines.txt", "start_line": 11}) == "INVALID_ARG"
        assert err(call, "read_file", {"path": "lines.txt", "start_line": 500}) == "INVALID_ARG"
        r = ok(call, "read_file", {"path": "lines.txt", "start_line": 10})
        assert r["text"] == "line 10\n" and r["next_start_line"] is None, door
        r = ok(call, "read_file", {"path": "empty.txt"})
        assert r["text"] == "" and r["total_lines"] == 0 and r["next_start_line"] is None
        assert err(call, "read_file", {"path": "empty.txt", "start_line": 2}) == "INVALID_ARG"


def test_read_file_truncates_at_text_chars(start_server, repo):
    text = "".join("%02d %s\n" % (i, "x" * 26) for i in range(1, 11))  # 30 chars a line
    (repo / "wide.txt").write_text(text)
    (repo / "one_line.txt").write_text("y" * 250 + "\n")
    digest = hashlib.sha256(text.encode()).hexdigest()
    for door, call in both_doors(start_server(limits={"text_chars": 100}).url):
        r = ok(call, "read_file", {"path": "wide.txt"})
        assert r["truncated"] is True, door
        assert 1 <= r["end_line"] < 10 and json_chars(r["text"]) <= 100
        assert r["text"] == "".join(text.splitlines(keepends=True)[: r["end_line"]])
        assert (r["next_start_line"], r["total_lines"]) == (r["end_line"] + 1, 10)
        assert r["sha256"] == digest  # of the whole file, not the page
        got, start = "", 1
        for _ in range(20):
            r = ok(call, "read_file", {"path": "wide.txt", "start_line": start})
            got += r["text"]
            if r["next_start_line"] is None:
                break
            start = r["next_start_line"]
        assert got == text, door
        r = ok(call, "read_file", {"path": "one_line.txt"})
        assert r["truncated"] is True and r["text"] == "y" * len(r["text"]), door
        assert 50 <= len(r["text"]) <= 100
        f = ok(call, "fetch", {"id": "wide.txt"})
        assert f["metadata"]["truncated"] is True, door
        assert text.startswith(f["text"]) and 50 <= json_chars(f["text"]) <= 100
        assert f["metadata"]["sha256"] == digest


def test_fetch_truncated_reports_whole_file_line_count(start_server, repo):
    text = "".join("%02d %s\n" % (i, "x" * 26) for i in range(1, 11))
    (repo / "wide.txt").write_text(text)
    for door, call in both_doors(start_server(limits={"text_chars": 100}).url):
        f = ok(call, "fetch", {"id": "wide.txt"})
        assert f["metadata"]["truncated"] is True
        assert f["metadata"]["total_lines"] == 10, (door, f["metadata"])


def test_binary_file_is_refused(start_server, repo):
    (repo / "blob.bin").write_bytes(b"PK\x03\x04\x00\x00binary\x00data\n")
    srv = start_server()
    for door, call in both_doors(srv.url):
        assert err(call, "read_file", {"path": "blob.bin"}) == "BINARY_FILE", door
        assert err(call, "fetch", {"id": "blob.bin"}) == "BINARY_FILE", door
    status, body = action(srv.url, "read_file", {"path": "blob.bin"})
    assert status == 415 and body["error"] == "BINARY_FILE"


def test_read_file_missing_file_is_not_found(doors):
    for door, call in doors:
        assert err(call, "read_file", {"path": "nope.txt"}) == "NOT_FOUND", door
        assert err(call, "read_file", {"path": "nodir/nope.txt"}) == "NOT_FOUND", door


# ---------------------------------------------------------------------------------------
# list_files
# ---------------------------------------------------------------------------------------

def test_list_files_honours_gitignore_and_hides_dotfiles(start_server, repo):
    (repo / "src" / "trace.log").write_text("ignored by *.log\n")
    for door, call in both_doors(start_server().url):
        r = ok(call, "list_files", {})
        paths = paths_of(r)
        assert r["truncated"] is False and r["path"] == "."
        for want in ("README.md", "AGENTS.md", "src", "src/app.py", "src/util.py", "docs",
                     "docs/guide.md"):
            assert want in paths, (door, want, paths)
        for absent in ("build", "build/out.txt", "debug.log", "src/trace.log", ".gitignore",
                       ".env", "config/server.pem", ".git"):
            assert absent not in paths, (door, absent)
        entries = {e["path"]: e for e in r["entries"]}
        assert entries["src"]["type"] == "dir" and entries["README.md"]["type"] == "file"
        assert entries["README.md"]["size"] == (repo / "README.md").stat().st_size
        assert paths == sorted(paths)


def test_list_files_depth_hidden_and_max_entries(start_server, repo):
    (repo / "a" / "b" / "c").mkdir(parents=True)
    (repo / "a" / "b" / "c" / "deep.txt").write_text("deep\n")
    for door, call in both_doors(start_server().url):
        top = paths_of(ok(call, "list_files", {"depth": 1}))
        assert "src" in top and "a" in top, door
        assert not [p for p in top if "/" in p], (door, top)
        two = paths_of(ok(call, "list_files", {"depth": 2}))
        assert "a/b" in two and "a/b/c" not in two
        four = paths_of(ok(call, "list_files", {"depth": 4}))
        assert "a/b/c/deep.txt" in four
        sub = paths_of(ok(call, "list_files", {"path": "a/b", "depth": 1}))
        assert sub == ["a/b/c"], door
        hidden = paths_of(ok(call, "list_files", {"include_hidden": True}))
        assert ".gitignore" in hidden and ".env" not in hidden and ".git" not in hidden
        assert "build" not in hidden
        full = ok(call, "list_files", {"depth": 4})
        assert full["truncated"] is False
        cut = ok(call, "list_files", {"depth": 4, "max_entries": 3})
        assert cut["truncated"] is True and len(cut["entries"]) == 3, door
        assert set(paths_of(cut)) <= set(paths_of(full))
        exact = ok(call, "list_files", {"depth": 4, "max_entries": len(full["entries"])})
        assert exact["truncated"] is False and paths_of(exact) == paths_of(full), door


# ---------------------------------------------------------------------------------------
# search: one test body, three backends
# ---------------------------------------------------------------------------------------

EXTRA = {
    "notes/todo.txt": "Hello World\nversion 42\n--pre=/bin/rm is what a peer ran\n"
                      "-e is an option too\n",
    "notes/more.md": "hello again\nhello twice\nhello thrice\n",
}


def add_extra(repo: Path) -> None:
    for rel, text in EXTRA.items():
        p = repo / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def tree_snapshot(root: Path) -> Dict[str, bytes]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != ".git"]
        for f in filenames:
            p = Path(dirpath) / f
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


@pytest.fixture(params=BACKENDS)
def backend_doors(request: pytest.FixtureRequest, repo: Path,
                  start_server: Callable[..., InProcessServer]) -> Iterator[
                      Tuple[str, List[Tuple[str, Call]]]]:
    """(backend, doors) for a server searching the extended demo tree with `backend`."""
    backend = str(request.param)
    if backend == "rg":
        need_rg()
    add_extra(repo)
    if backend == "python":
        shutil.rmtree(repo / ".git")  # the Python scan is the fallback outside git
    srv = start_server()
    srv.app.bench.rg = str(RG) if backend == "rg" else None
    yield backend, list(both_doors(srv.url))


def test_search_literal_regex_case_glob_and_limits(backend_doors):
    backend, doors_ = backend_doors
    for door, call in doors_:
        r = ok(call, "search", {"query": "hello"})
        assert r["backend"] == backend, door
        assert hits_of(r) == [("notes/more.md", 1, "hello again"),
                              ("notes/more.md", 2, "hello twice"),
                              ("notes/more.md", 3, "hello thrice"),
                              ("notes/todo.txt", 1, "Hello World"),
                              ("src/app.py", 2, "return 'hello ' + name")], door
        assert r["truncated"] is False
        hit = r["results"][0]
        assert hit["id"] == hit["title"] == "%s:%d" % (hit["path"], hit["line"])
        assert hit["url"].startswith("patchbay://")
        # literal by default: regex metacharacters are plain text
        assert ok(call, "search", {"query": "greet(name)"})["results"][0]["path"] == "src/app.py"
        assert ok(call, "search", {"query": "h.llo"})["results"] == []
        r = ok(call, "search", {"query": r"def \w+\(", "regex": True})
        assert sorted((h["path"], h["line"]) for h in r["results"]) == [
            ("src/app.py", 1), ("src/util.py", 4)], door
        r = ok(call, "search", {"query": "Hello", "case_sensitive": True})
        assert hits_of(r) == [("notes/todo.txt", 1, "Hello World")], door
        r = ok(call, "search", {"query": "HELLO", "case_sensitive": True})
        assert r["results"] == []
        r = ok(call, "search", {"query": "HELLO"})
        assert len(r["results"]) == 5
        r = ok(call, "search", {"query": "hello", "glob": "*.md"})
        assert {h["path"] for h in r["results"]} == {"notes/more.md"}, door
        r = ok(call, "search", {"query": "return", "glob": "*.py"})
        assert {h["path"] for h in r["results"]} == {"src/app.py", "src/util.py"}
        r = ok(call, "search", {"query": "hello", "path": "src"})
        assert hits_of(r) == [("src/app.py", 2, "return 'hello ' + name")], door
        r = ok(call, "search", {"query": "hello", "path": "notes/more.md"})
        assert len(r["results"]) == 3
        r = ok(call, "search", {"query": "hello", "max_results": 2})
        assert r["truncated"] is True and len(r["results"]) == 2, door
        r = ok(call, "search", {"query": "hello", "max_results": 5})
        assert r["truncated"] is False and len(r["results"]) == 5, door


@pytest.mark.parametrize("query,expected", [
    ("--help", [("docs/guide.md", 4)]),
    ("--pre=/bin/rm", [("notes/todo.txt", 3)]),
    ("-e", [("notes/todo.txt", 4)]),
    ("--files", []),
    ("--version", []),
])
def test_search_query_starting_with_dash_is_text(backend_doors, repo, query, expected):
    backend, doors_ = backend_doors
    before = tree_snapshot(repo)
    for door, call in doors_:
        for regex in (False, True):
            r = ok(call, "search", {"query": query, "regex": regex})
            assert r["backend"] == backend
            assert sorted((h["path"], h["line"]) for h in r["results"]) == expected, (
                door, regex, r)
            for h in r["results"]:
                assert query in h["snippet"]
    assert tree_snapshot(repo) == before  # nothing was deleted or rewritten


def test_search_ids_are_accepted_by_fetch(backend_doors, repo):
    _backend, doors_ = backend_doors
    for door, call in doors_:
        results = ok(call, "search", {"query": "o", "max_results": 50})["results"]
        assert len(results) >= 5, door
        for hit in results:
            f = ok(call, "fetch", {"id": hit["id"]})
            assert f["id"] == hit["id"] and f["title"] == hit["path"]
            assert f["metadata"]["path"] == hit["path"] and f["metadata"]["line"] == hit["line"]
            assert f["text"] == (repo / hit["path"]).read_text(), (door, hit)
            line = f["text"].splitlines()[hit["line"] - 1]
            assert line.strip()[:300] == hit["snippet"]
            assert f["url"] == hit["url"]


def test_search_invalid_regex_is_an_error(backend_doors):
    backend, doors_ = backend_doors
    for door, call in doors_:
        assert err(call, "search", {"query": "a(", "regex": True}) == "INVALID_ARG", (
            backend, door)


def test_backtracking_regex_ends_at_the_deadline_and_the_server_keeps_answering(
        serve_process, repo, tmp_path):
    """`(a+)+$` on a long line of a's ending in "!" backtracks for ever in Python's `re`.
    The Python scan (no rg, no git repository) must run it where it can be killed: the
    server answers /health meanwhile and the search ends with TIMEOUT at its deadline."""
    shutil.rmtree(repo / ".git")
    (repo / "trap.txt").write_text("a" * 5000 + "!\n")
    profile = tmp_path / "slow.json"
    profile.write_text(json.dumps({"extends": "worker", "limits": {"search_timeout_s": 2}}))
    bindir = tmp_path / "bin"  # a PATH without rg
    bindir.mkdir()
    os.symlink(shutil.which("git") or "/usr/bin/git", bindir / "git")
    srv = serve_process("--profile", str(profile), env={"PATH": str(bindir)})
    answers: Dict[str, Any] = {}

    def search() -> None:
        answers["search"] = action(srv.url, "search", {"query": "(a+)+$", "regex": True})

    worker = threading.Thread(target=search)
    started = time.monotonic()
    worker.start()
    healthy = 0
    while worker.is_alive() and time.monotonic() - started < 30:
        status, _, _ = request(srv.url + "/health", timeout=5)  # raises if the server froze
        assert status == 200
        healthy += 1
        time.sleep(0.1)
    worker.join(30)
    assert not worker.is_alive(), "the search outlived its deadline"
    status, body = answers["search"]
    assert status == 504 and body["error"] == "TIMEOUT", body
    assert "search_timeout_s" in body["message"]
    assert healthy >= 5  # /health answered all through the two seconds
    # The matcher child is gone, and the next search works.
    assert "(a+)+" not in subprocess.run(["ps", "-eo", "args"], capture_output=True,
                                         text=True).stdout
    status, body = action(srv.url, "search", {"query": "Demo", "case_sensitive": True})
    assert status == 200 and body["backend"] == "python", body
    assert [h["path"] for h in body["results"]] == ["README.md"]


@pytest.mark.parametrize("argv", [["sleep", "30"], ["sh", "-c", "echo one; exec sleep 30"]])
def test_search_child_is_killed_at_the_deadline(tmp_path, argv):
    """rg and git grep run through the same streaming runner: at the deadline the child's
    whole group dies and the search says TIMEOUT instead of returning a partial answer."""
    started = time.monotonic()
    with pytest.raises(patchbay.PatchbayError) as caught:
        list(patchbay.stream_records(argv, str(tmp_path), {"PATH": os.environ["PATH"]}, 0.5,
                                     threading.Event(), (2,)))
    assert caught.value.code == "TIMEOUT"
    assert time.monotonic() - started < 10


CROSS_QUERIES: List[Dict[str, Any]] = [
    {"query": "hello"},
    {"query": "Hello", "case_sensitive": True},
    {"query": r"def \w+\(", "regex": True},
    {"query": "[0-9]+", "regex": True},
    {"query": "return", "glob": "*.py"},
    {"query": "o", "path": "src"},
    {"query": "--help"},
    {"query": "--pre=/bin/rm"},
    {"query": "-e"},
    {"query": "e", "max_results": 1000},
]


@pytest.fixture
def three_backends(tmp_path: Path) -> Iterator[Dict[str, Call]]:
    """One call per backend over the same files: rg and git grep on a repository, the
    Python scan on a copy of the same tree without .git."""
    need_rg()
    repo = make_repo(tmp_path / "same")
    add_extra(repo)
    plain = tmp_path / "plain" / "same"  # the files git shows: no .git, nothing ignored
    shutil.copytree(repo, plain, ignore=shutil.ignore_patterns(".git", "build", "*.log"))
    servers = []
    calls: Dict[str, Call] = {}
    for backend, where in (("rg", repo), ("git", repo), ("python", plain)):
        srv = InProcessServer(make_app(where, tmp_path / ("home-" + backend)))
        srv.app.bench.rg = str(RG) if backend == "rg" else None
        servers.append(srv)
        calls[backend] = next(iter(both_doors(srv.url)))[1]
    try:
        yield calls
    finally:
        for srv in servers:
            srv.stop()


def test_search_backends_agree(three_backends):
    for args in CROSS_QUERIES:
        seen = {}
        for backend, call in three_backends.items():
            r = ok(call, "search", args)
            assert r["backend"] == backend
            seen[backend] = (hits_of(r), r["truncated"])
        assert seen["rg"][0], args  # the query does match something
        assert seen["rg"] == seen["git"] == seen["python"], (args, seen)


@pytest.mark.parametrize("args", [{"query": r"\d+", "regex": True},
                                  {"query": r"\bhello\b", "regex": True},
                                  {"query": r"hel+o\s", "regex": True}])
def test_search_backends_agree_on_regex_escapes(three_backends, args):
    seen = {b: hits_of(ok(call, "search", args)) for b, call in three_backends.items()}
    assert seen["python"], args
    assert seen["rg"] == seen["git"] == seen["python"], (args, seen)


def test_search_backends_agree_on_hidden_files(tmp_path):
    """A tracked dot-directory (.github) is the same tree for every backend."""
    need_rg()
    repo = make_repo(tmp_path / "hid")
    (repo / ".github").mkdir()
    (repo / ".github" / "ci.yml").write_text("run: pytest\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "ci")
    plain = tmp_path / "plain" / "hid"
    shutil.copytree(repo, plain, ignore=shutil.ignore_patterns(".git"))
    seen = {}
    for backend, where in (("rg", repo), ("git", repo), ("python", plain)):
        srv = InProcessServer(make_app(where, tmp_path / ("home-" + backend)))
        try:
            srv.app.bench.rg = str(RG) if backend == "rg" else None
            call = next(iter(both_doors(srv.url)))[1]
            seen[backend] = hits_of(ok(call, "search", {"query": "pytest"}))
        finally:
            srv.stop()
    assert seen["rg"] == seen["git"] == seen["python"], seen


# ---------------------------------------------------------------------------------------
# changes
# ---------------------------------------------------------------------------------------

def test_changes_shows_diff_and_untracked_and_hides_blocked(start_server, repo):
    with open(repo / "src" / "app.py", "a") as f:
        f.write("# changed by the test\n")
    (repo / "notes.txt").write_text("untracked\n")
    (repo / ".env").write_text("API_KEY=rotated_secret_value\n")
    (repo / "config" / "server.pem").write_text("-----BEGIN PRIVATE KEY-----\nnew\n")
    for door, call in both_doors(start_server().url):
        r = ok(call, "changes", {})
        files = {f["path"]: f for f in r["files"]}
        assert set(files) == {"src/app.py", "notes.txt"}, (door, files)
        assert files["src/app.py"]["worktree"] == "M"
        assert files["notes.txt"]["index"] == "?"
        assert "+# changed by the test" in r["diff"] and "src/app.py" in r["diff"]
        for secret in (".env", "rotated_secret", "supersecret", "server.pem", "PRIVATE KEY"):
            assert secret not in json.dumps(r), (door, secret)
        assert r["hidden_blocked"] == 2
        assert r["branch"] == "main" and r["staged"] is False and r["truncated"] is False
        assert err(call, "changes", {"path": ".env"}) == "BLOCKED_FILE"
        assert err(call, "changes", {"path": "../x"}) == "DENIED_PATH"


def test_changes_honours_path_and_staged(start_server, repo):
    with open(repo / "src" / "app.py", "a") as f:
        f.write("# staged change\n")
    git(repo, "add", "src/app.py")
    with open(repo / "docs" / "guide.md", "a") as f:
        f.write("unstaged change\n")
    for door, call in both_doors(start_server().url):
        r = ok(call, "changes", {})
        assert "+unstaged change" in r["diff"] and "# staged change" not in r["diff"], door
        r = ok(call, "changes", {"staged": True})
        assert "+# staged change" in r["diff"] and "unstaged change" not in r["diff"], door
        assert r["staged"] is True
        r = ok(call, "changes", {"path": "src", "staged": True})
        assert [f["path"] for f in r["files"]] == ["src/app.py"]
        assert "+# staged change" in r["diff"]
        r = ok(call, "changes", {"path": "src"})
        assert [f["path"] for f in r["files"]] == ["src/app.py"] and r["diff"] == ""
        r = ok(call, "changes", {"path": "docs"})
        assert [f["path"] for f in r["files"]] == ["docs/guide.md"]
        assert "+unstaged change" in r["diff"], door
        r = ok(call, "changes", {"path": "docs/guide.md"})
        assert "+unstaged change" in r["diff"]
        r = ok(call, "changes", {"max_bytes": 20})
        assert r["truncated"] is True and len(r["diff"]) == 20, door


# ---------------------------------------------------------------------------------------
# workspace and switch_workspace
# ---------------------------------------------------------------------------------------

def test_workspace_reports_git_state_and_agents_md(start_server, repo):
    with open(repo / "src" / "util.py", "a") as f:
        f.write("# staged\n")
    git(repo, "add", "src/util.py")
    with open(repo / "src" / "app.py", "a") as f:
        f.write("# unstaged\n")
    (repo / "new.txt").write_text("untracked\n")
    head = git(repo, "rev-parse", "HEAD").strip()
    for door, call in both_doors(start_server().url):
        r = ok(call, "workspace", {})
        assert r["workspace"] == "repo" and r["workspaces"] == ["repo"], door
        g = r["git"]
        assert g["branch"] == "main" and head.startswith(g["head"]) and len(g["head"]) >= 7
        assert (g["staged"], g["unstaged"], g["untracked"], g["conflicts"]) == (1, 1, 1, 0)
        assert r["agents_md"].startswith("Run the tests with pytest."), door
        assert r["agents_md_truncated"] is False
        assert {"read_file", "search", "changes"} <= set(r["tools"])
        assert str(repo) not in json.dumps(r)  # no absolute paths in reports


def test_workspace_agents_md_is_capped(start_server, repo):
    (repo / "AGENTS.md").write_text("Start here.\n" + "z" * 20000)
    for door, call in both_doors(start_server().url):
        r = ok(call, "workspace", {})
        assert r["agents_md"].startswith("Start here.") and r["agents_md_truncated"] is True
        assert 100 < len(r["agents_md"]) <= 5000, door


@pytest.fixture
def two_roots(tmp_path: Path, home: Path) -> Iterator[Tuple[InProcessServer, Path, Path]]:
    alpha = make_repo(tmp_path / "alpha")
    beta = make_repo(tmp_path / "beta")
    (alpha / "which.txt").write_text("alpha\n")
    (beta / "which.txt").write_text("beta\n")
    srv = InProcessServer(make_app(alpha, home, roots=[str(alpha), str(beta)]))
    try:
        yield srv, alpha, beta
    finally:
        srv.stop()


def which(call: Call) -> str:
    return ok(call, "read_file", {"path": "which.txt"})["text"].strip()


def test_switch_workspace_is_per_mcp_session(two_roots, home):
    srv, _alpha, _beta = two_roots
    first, second = Mcp(srv.url), Mcp(srv.url)
    first.initialize()
    second.initialize()
    assert ok(first.call, "workspace", {})["workspaces"] == ["alpha", "beta"]
    assert which(first.call) == "alpha" and which(second.call) == "alpha"
    r = ok(first.call, "switch_workspace", {"name": "beta"})
    assert r["workspace"] == "beta"
    assert which(first.call) == "beta"
    assert ok(first.call, "workspace", {})["workspace"] == "beta"
    assert which(second.call) == "alpha"  # another session keeps the default
    third = Mcp(srv.url)
    third.initialize()
    assert which(third.call) == "alpha"
    status, body = action(srv.url, "read_file", {"path": "which.txt"})
    assert status == 200 and body["text"] == "alpha\n"  # MCP choice is not the channel's
    assert "active_workspace" not in json.loads((home / "config.json").read_text()
                                                if (home / "config.json").exists() else "{}")
    assert err(first.call, "switch_workspace", {"name": "gamma"}) == "NOT_FOUND"
    assert which(first.call) == "beta"


def test_switch_workspace_over_actions_is_stored_in_channel(two_roots, home):
    srv, _alpha, _beta = two_roots
    mcp = Mcp(srv.url)
    mcp.initialize()

    def via_actions(name: str, args: Dict[str, Any]) -> Tuple[Any, bool]:
        status, body = action(srv.url, name, args)
        return body, status != 200

    assert which(via_actions) == "alpha"
    r = ok(via_actions, "switch_workspace", {"name": "beta"})
    assert r["workspace"] == "beta"
    config = home / "config.json"
    assert json.loads(config.read_text())["active_workspace"] == "beta"
    assert config.stat().st_mode & 0o077 == 0
    assert which(via_actions) == "beta"
    assert which(mcp.call) == "alpha"  # MCP sessions do not follow the channel
    assert err(via_actions, "switch_workspace", {"name": "../alpha"}) == "NOT_FOUND"
    assert json.loads(config.read_text())["active_workspace"] == "beta"
    ok(via_actions, "switch_workspace", {"name": "alpha"})
    assert which(via_actions) == "alpha"


# ---------------------------------------------------------------------------------------
# odd file names: listed in the quoted form of docs/paths.md, read back from it
# ---------------------------------------------------------------------------------------

# name on disk (bytes) -> how tools show it
ODD_NAMES = {
    b"bad\xffname.txt": '"bad\\377name.txt"',
    b"new\nline.txt": '"new\\nline.txt"',
    b"tab\there.txt": '"tab\\there.txt"',
    b'say "hi".txt': 'say "hi".txt',
    b'"lead.txt': '"\\"lead.txt"',
    b"-rf.txt": "-rf.txt",
    b"--help": "--help",
    b"back\\slash.txt": "back\\slash.txt",
    "caf\u00e9.txt".encode(): "caf\u00e9.txt",
    b"d\xfe/in\x01ner.txt": '"d\\376/in\\001ner.txt"',
}


def write_odd_names(repo: Path) -> None:
    for name in ODD_NAMES:
        path = os.path.join(os.fsencode(repo), name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"needle in " + name + b"\n")


def test_odd_file_names_are_listed_and_read_back(start_server, repo):
    write_odd_names(repo)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "odd names")
    for name in ODD_NAMES:  # every file changed, one of them left untracked
        with open(os.path.join(os.fsencode(repo), name), "ab") as f:
            f.write(b"changed\n")
    (repo / os.fsdecode(b"untracked\xff\n.txt")).write_text("new\n")
    srv = start_server()
    shown = set(ODD_NAMES.values())
    for door, call in both_doors(srv.url):
        listed = set(paths_of(ok(call, "list_files", {"depth": 3})))
        assert shown <= listed, (door, shown - listed)
        assert '"untracked\\377\\n.txt"' in listed, door
        assert ok(call, "list_files", {"path": '"d\\376"'})["entries"] == [
            {"path": '"d\\376/in\\001ner.txt"', "type": "file", "size": len(
                b"needle in d\xfe/in\x01ner.txt\nchanged\n")}], door
        for name, form in ODD_NAMES.items():
            r = ok(call, "read_file", {"path": form})
            assert r["path"] == form, door
            assert r["text"].encode() == b"needle in " + name.replace(
                b"\xff", "\ufffd".encode()).replace(b"\xfe", "\ufffd".encode()) + b"\nchanged\n"
        changes = ok(call, "changes", {})
        files = {f["path"]: f for f in changes["files"]}
        assert shown | {'"untracked\\377\\n.txt"'} <= set(files), (door, files)
        assert files['"bad\\377name.txt"']["worktree"] == "M"
        assert "changed" in changes["diff"]
        assert ok(call, "changes", {"path": '"d\\376"'})["files"][0]["path"] == (
            '"d\\376/in\\001ner.txt"')
        ws = ok(call, "workspace", {})
        assert ws["git"]["unstaged"] == len(ODD_NAMES) and ws["git"]["untracked"] == 1, door
        # A quoted form that is not well-formed is a clear error, not a guess.
        for bad in ('"a\\q"', '"a"b"', '"\\400"', '"nul\\000"'):
            assert err(call, "read_file", {"path": bad}) == "INVALID_ARG", (door, bad)
        # The quoted form is still only a spelling: `..` and blocked names stay refused.
        assert err(call, "read_file", {"path": '"..\\057README.md"'}) == "DENIED_PATH"
        assert err(call, "read_file", {"path": '"\\056env"'}) == "BLOCKED_FILE"
        assert err(call, "read_file", {"path": '"\\056git/config"'}) == "DENIED_PATH"


def test_odd_file_names_in_search_results_are_fetched_back(backend_doors, repo):
    backend, doors_ = backend_doors
    write_odd_names(repo)
    for door, call in doors_:
        r = ok(call, "search", {"query": "needle in", "max_results": 50})
        assert r["backend"] == backend
        hits = {h["path"]: h for h in r["results"]}
        assert set(hits) == set(ODD_NAMES.values()), (backend, door, hits)
        for form, hit in hits.items():
            assert hit["id"] == form + ":1"
            f = ok(call, "fetch", {"id": hit["id"]})
            assert f["metadata"]["path"] == form and f["text"].startswith("needle in")


# ---------------------------------------------------------------------------------------
# repository-controlled programs
# ---------------------------------------------------------------------------------------

def test_clean_filter_makes_changes_unsupported(start_server, repo, tmp_path):
    marker = tmp_path / "filter-ran"
    git(repo, "config", "filter.x.clean", "sh -c 'touch %s; cat'" % marker)
    (repo / ".gitattributes").write_text("* filter=x\n")
    with open(repo / "src" / "app.py", "a") as f:
        f.write("# dirty\n")
    srv = start_server()
    srv.app.bench.rg = None
    for door, call in both_doors(srv.url):
        result, is_error = call("changes", {})
        assert is_error and result["error"] == "UNSUPPORTED_REPO", (door, result)
        assert "filter.x.clean" in result["message"], door
        r = ok(call, "workspace", {})
        assert r["git"] is None and "filter.x.clean" in r["git_note"], door
        ok(call, "list_files", {})
        ok(call, "search", {"query": "greet"})
    status, body = action(srv.url, "changes", {})
    assert status == 422 and body["error"] == "UNSUPPORTED_REPO"
    assert not marker.exists()
    subprocess.run(["git", "add", "-A"], cwd=repo, capture_output=True,
                   env=dict(os.environ, GIT_CONFIG_GLOBAL=os.devnull, GIT_CONFIG_NOSYSTEM="1"))
    assert marker.exists()  # the trap was real: plain git runs the filter


def test_fsmonitor_is_never_run(start_server, repo, tmp_path):
    marker = tmp_path / "fsmonitor-ran"
    hook = tmp_path / "fsmonitor.sh"
    hook.write_text("#!/bin/sh\necho \"$@\" >> %s\n" % marker)
    hook.chmod(0o755)
    git(repo, "config", "core.fsmonitor", str(hook))
    with open(repo / "src" / "app.py", "a") as f:
        f.write("# dirty\n")
    (repo / "untracked.txt").write_text("new\n")
    srv = start_server()
    srv.app.bench.rg = None  # search through git grep
    for door, call in both_doors(srv.url):
        assert ok(call, "workspace", {})["git"]["unstaged"] == 1, door
        r = ok(call, "changes", {})
        assert {f["path"] for f in r["files"]} == {"src/app.py", "untracked.txt"}
        assert "build" not in paths_of(ok(call, "list_files", {}))
        r = ok(call, "search", {"query": "greet"})
        assert r["backend"] == "git" and r["results"], door
        ok(call, "read_file", {"path": "src/app.py"})
    assert not marker.exists(), marker.read_text()
    subprocess.run(["git", "status"], cwd=repo, capture_output=True,
                   env=dict(os.environ, GIT_CONFIG_GLOBAL=os.devnull, GIT_CONFIG_NOSYSTEM="1"))
    assert marker.exists()  # the trap was real: plain git status runs it


# ---------------------------------------------------------------------------------------
# argument validation
# ---------------------------------------------------------------------------------------

BAD_ARGS: List[Tuple[str, Dict[str, Any]]] = [
    ("read_file", {"path": "README.md", "bogus": 1}),
    ("read_file", {}),
    ("read_file", {"path": 5}),
    ("read_file", {"path": None}),
    ("read_file", {"path": "README.md", "max_lines": "10"}),
    ("read_file", {"path": "README.md", "max_lines": 0}),
    ("read_file", {"path": "README.md", "max_lines": 20001}),
    ("read_file", {"path": "README.md", "start_line": 0}),
    ("read_file", {"path": "README.md", "start_line": -3}),
    ("read_file", {"path": "README.md", "start_line": 1.5}),
    ("read_file", {"path": "README.md", "start_line": True}),
    ("list_files", {"depth": 0}),
    ("list_files", {"depth": 11}),
    ("list_files", {"include_hidden": "yes"}),
    ("list_files", {"include_hidden": 1}),
    ("list_files", {"max_entries": 5001}),
    ("list_files", {"path": ["src"]}),
    ("search", {}),
    ("search", {"query": 5}),
    ("search", {"query": "x", "regex": "true"}),
    ("search", {"query": "x", "max_results": 0}),
    ("search", {"query": "x", "max_results": 1001}),
    ("search", {"query": "x" * 1001}),
    ("search", {"query": "x", "glob": 3}),
    ("search", {"query": "x", "flags": "--pre=/bin/rm"}),
    ("fetch", {}),
    ("fetch", {"id": {"path": "README.md"}}),
    ("changes", {"max_bytes": 0}),
    ("changes", {"staged": "no"}),
    ("changes", {"path": 1}),
    ("switch_workspace", {}),
    ("switch_workspace", {"name": 1}),
    ("workspace", {"verbose": True}),
]


def test_argument_validation_on_both_doors(server):
    for door, call in both_doors(server.url):
        for tool, args in BAD_ARGS:
            result, is_error = call(tool, args)
            assert is_error and result["error"] == "INVALID_ARG", (door, tool, args, result)
            assert result["message"], (door, tool, args)
    for tool, args in BAD_ARGS:
        status, body = action(server.url, tool, args)
        assert status == 400 and body["error"] == "INVALID_ARG", (tool, args, status, body)


def test_arguments_must_be_an_object(server):
    for body in ([], ["README.md"], "README.md", 5):
        status, reply = action(server.url, "read_file", body)
        assert status == 400 and reply["error"] == "INVALID_ARG", (body, status, reply)
    client = Mcp(server.url)
    client.initialize()
    for args in ([], ["README.md"], "README.md", 5):
        reply = client.rpc("tools/call", {"name": "read_file", "arguments": args})
        result = reply.get("result")
        if result is not None:  # a tool error, or a JSON-RPC invalid-params error
            assert result["isError"] and result["structuredContent"]["error"] == "INVALID_ARG"
        else:
            assert reply["error"]["code"] == -32602, reply


def test_integral_floats_are_accepted(doors):
    for door, call in doors:
        r = ok(call, "read_file", {"path": "README.md", "start_line": 2.0, "max_lines": 1.0})
        assert r["start_line"] == 2 and r["end_line"] == 2, door


# ---------------------------------------------------------------------------------------
# audit log
# ---------------------------------------------------------------------------------------

def test_every_call_writes_one_audit_line_without_contents(start_server, repo, home):
    marker = "AUDIT_CANARY_CONTENT_5d1"
    (repo / "canary.txt").write_text("first line\n%s\n" % marker)
    srv = start_server()
    audit = home / "runtime" / "audit.jsonl"
    calls: List[Tuple[str, str, str]] = []  # (door, tool, outcome)
    for door, call in both_doors(srv.url):
        plan = [("read_file", {"path": "canary.txt"}, "ok"),
                ("fetch", {"id": "canary.txt:2"}, "ok"),
                ("search", {"query": "CANARY"}, "ok"),
                ("list_files", {}, "ok"),
                ("workspace", {}, "ok"),
                ("changes", {}, "ok"),
                ("read_file", {"path": ".env"}, "BLOCKED_FILE"),
                ("read_file", {"path": "../x"}, "DENIED_PATH"),
                ("read_file", {"path": "canary.txt", "nope": 1}, "INVALID_ARG")]
        for tool, args, outcome in plan:
            before = len(audit.read_text().splitlines()) if audit.exists() else 0
            call(tool, args)
            after = audit.read_text().splitlines()
            assert len(after) == before + 1, (door, tool)
            calls.append((door, tool, outcome))
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(e["door"], e["tool"], e["outcome"]) for e in lines] == calls
    for e in lines:
        assert {"ts", "door", "tool", "args", "outcome", "ms"} <= set(e)
        assert isinstance(e["ms"], (int, float)) and e["ms"] >= 0
    assert lines[0]["args"] == {"path": "canary.txt"}
    text = audit.read_text()
    for content in (marker, "first line", "A demo repository", "supersecret",
                    "return 'hello '"):
        assert content not in text, content
    assert audit.stat().st_mode & 0o077 == 0
