"""The path guard (patchbay.py §5), directly and through both front doors.

Every attack from reference/security.md "Paths" is built with real files (symlinks, hard
links, FIFOs, renamed roots) and tried on PathGuard/Root, then through MCP and Actions
via read_file, fetch, list_files and search. Search attacks run on every backend (rg,
git grep, the Python scan), because each backend walks the tree its own way.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple

import pytest
from pbtest import RG, Call, InProcessServer, action, both_doors, err, ok

import patchbay
from patchbay import PatchbayError

SECRET = "OUTSIDE_SECRET_7f3a"           # content of the file outside the root
BLOCKED_SECRET = "BLOCKED_VARIANT_91c2"  # content of the blocked-name variants
HANG_S = 10.0                            # a call that takes this long is a hang

# ---------------------------------------------------------------------------------------
# helpers and fixtures
# ---------------------------------------------------------------------------------------

def code_of(fn: Callable[..., Any], *args: Any) -> str:
    """Run a guard call that must fail; return its machine code."""
    try:
        fn(*args)
    except PatchbayError as exc:
        return exc.code
    pytest.fail("%s%r did not raise" % (getattr(fn, "__name__", fn), args))


def listed(call: Call, **args: Any) -> List[str]:
    args.setdefault("depth", 5)
    args.setdefault("include_hidden", True)
    return [e["path"] for e in ok(call, "list_files", args)["entries"]]


def no_leak(result: Any, *needles: str) -> None:
    text = json.dumps(result, ensure_ascii=False)
    for needle in needles:
        assert needle not in text, "leaked %r: %s" % (needle, text[:500])


def within(seconds: float, fn: Callable[[], Any], unblock: Callable[[], None]) -> Any:
    """Run fn in a thread; fail (after calling unblock) if it takes longer than seconds."""
    box: Dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the test thread
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    started = time.monotonic()
    t.start()
    t.join(seconds)
    if t.is_alive():
        unblock()
        t.join(5)
        pytest.fail("call hung for more than %.0f s" % seconds)
    if "error" in box:
        raise box["error"]
    box["elapsed"] = time.monotonic() - started
    return box["value"]


def unblock_fifo(path: Path) -> Callable[[], None]:
    def go() -> None:
        try:  # a blocked reader sees EOF once a writer opens and closes the FIFO
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    return go


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory next to the repository holding a secret the guard must never reveal."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "secret.txt").write_text(SECRET + "\n")
    return d


@pytest.fixture
def guard(home: Path) -> patchbay.PathGuard:
    return patchbay.PathGuard(list(patchbay.DEFAULT_BLOCKED_GLOBS), protected=(str(home),))


@pytest.fixture
def root(repo: Path) -> Iterator[patchbay.Root]:
    r = patchbay.Root("repo", str(repo))
    yield r
    r.close()


@pytest.fixture(params=["rg", "git", "python"])
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "rg" and not os.access(RG, os.X_OK):
        pytest.skip("rg from the Codex npm package is not installed (run sh tests/run)")
    return str(request.param)


@pytest.fixture
def search_server(repo: Path, start_server: Callable[..., InProcessServer],
                  backend: str) -> Callable[..., List[Tuple[str, Call]]]:
    """Start a server whose search uses `backend`; returns its two doors.

    Call it after building the attack tree. For the Python scan the repository's .git
    is removed first (that backend only runs outside git repositories).
    """
    def start(**overrides: Any) -> List[Tuple[str, Call]]:
        if backend == "python":
            shutil.rmtree(repo / ".git")
        srv = start_server(**overrides)
        srv.app.bench.rg = str(RG) if backend == "rg" else None
        found = list(both_doors(srv.url))
        for _door, call in found:  # prove the backend is the one under test
            assert ok(call, "search", {"query": "hello"})["backend"] == backend
        return found
    return start


# ---------------------------------------------------------------------------------------
# PathGuard and Root, directly
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["..", "../x", "a/../../x", "src/../README.md", "./..",
                                  "src/..", "../repo-evil/secret.txt"])
def test_guard_rejects_dotdot_components(guard, root, path):
    assert code_of(guard.read, root, path, 1 << 20) == "DENIED_PATH"
    assert code_of(guard.split, root, path, True) == "DENIED_PATH"


def test_guard_absolute_path_inside_root_is_accepted(guard, root, repo):
    data, parts = guard.read(root, os.path.join(root.real, "src", "app.py"), 1 << 20)
    assert data == (repo / "src" / "app.py").read_bytes()
    assert parts == ["src", "app.py"]
    assert guard.split(root, root.real + "//src/./app.py") == ["src", "app.py"]
    assert guard.split(root, root.real, allow_root=True) == []
    assert code_of(guard.read, root, root.real, 1 << 20) == "INVALID_ARG"  # the root itself


@pytest.mark.parametrize("path", ["/etc/passwd", "/", "/tmp", "/proc/self/environ"])
def test_guard_absolute_path_outside_root_is_denied(guard, root, path):
    assert code_of(guard.read, root, path, 1 << 20) == "DENIED_PATH"


def test_guard_sibling_prefix_root_is_denied(guard, root, repo):
    evil = repo.parent / (repo.name + "-evil")
    evil.mkdir()
    (evil / "secret.txt").write_text(SECRET)
    target = os.path.join(root.real + "-evil", "secret.txt")
    assert os.path.exists(target)
    assert code_of(guard.read, root, target, 1 << 20) == "DENIED_PATH"
    assert code_of(guard.split, root, root.real + "-evil", True) == "DENIED_PATH"


def test_guard_tilde_is_a_literal_name(guard, root, repo):
    assert code_of(guard.read, root, "~/README.md", 1 << 20) == "NOT_FOUND"
    assert code_of(guard.read, root, "~", 1 << 20) == "NOT_FOUND"
    (repo / "~").mkdir()
    (repo / "~" / "note.txt").write_text("tilde dir inside the repo\n")
    data, parts = guard.read(root, "~/note.txt", 1 << 20)
    assert data == b"tilde dir inside the repo\n" and parts == ["~", "note.txt"]
    assert code_of(guard.read, root, "$HOME/x", 1 << 20) == "NOT_FOUND"


@pytest.mark.parametrize("path", ["README.md\x00.txt", "\x00", None, 5, b"README.md",
                                  ["README.md"], "\ud800"])
def test_guard_rejects_nul_non_strings_and_bad_unicode(guard, root, path):
    assert code_of(guard.read, root, path, 1 << 20) == "INVALID_ARG"


def test_guard_rejects_over_long_paths(guard, root):
    assert code_of(guard.read, root, "a/" * 2100 + "x", 1 << 20) == "INVALID_ARG"  # > 4096 B
    assert code_of(guard.read, root, "a" * 256, 1 << 20) == "INVALID_ARG"  # component > 255
    assert code_of(guard.read, root, "\u00e9" * 128, 1 << 20) == "INVALID_ARG"  # 256 bytes
    assert code_of(guard.read, root, "a" * 255, 1 << 20) == "NOT_FOUND"  # at the limit: walked


def test_guard_symlinked_file_and_dir_outside_are_denied(guard, root, repo, outside):
    os.symlink(outside / "secret.txt", repo / "linkfile")
    os.symlink(outside, repo / "linkdir")
    os.symlink("../outside/secret.txt", repo / "rel_escape.txt")
    os.symlink("../../outside/secret.txt", repo / "docs" / "esc.txt")
    for p in ("linkfile", "linkdir/secret.txt", "rel_escape.txt", "docs/esc.txt"):
        assert code_of(guard.read, root, p, 1 << 20) == "DENIED_PATH", p
    assert code_of(guard.open_dir, root, "linkdir") == "DENIED_PATH"


def test_guard_in_root_symlinks_resolve_to_their_target(guard, root, repo):
    os.symlink("README.md", repo / "alias.md")
    os.symlink(os.path.join(root.real, "README.md"), repo / "abs_alias.md")
    os.symlink("../README.md", repo / "docs" / "up.md")  # `..` that stays inside
    os.symlink("../docs", repo / "src" / "docs_link")     # directory symlink inside
    readme = (repo / "README.md").read_bytes()
    for p in ("alias.md", "abs_alias.md", "docs/up.md"):
        data, parts = guard.read(root, p, 1 << 20)
        assert data == readme and parts == ["README.md"], p
    data, parts = guard.read(root, "src/docs_link/guide.md", 1 << 20)
    assert data == (repo / "docs" / "guide.md").read_bytes()
    assert parts == ["docs", "guide.md"]
    fd, parts = guard.open_dir(root, "src/docs_link")
    try:
        assert sorted(os.listdir(fd)) == ["guide.md", "up.md"] and parts == ["docs"]
    finally:
        os.close(fd)


def test_guard_dangling_and_chained_symlinks(guard, root, repo, outside):
    os.symlink("nowhere.txt", repo / "dangling")
    os.symlink("/nonexistent-patchbay-target/x", repo / "dangling_out")
    os.symlink("chain2", repo / "chain1")
    os.symlink("chain3", repo / "chain2")
    os.symlink("src/util.py", repo / "chain3")
    os.symlink("chain_out2", repo / "chain_out1")
    os.symlink(outside / "secret.txt", repo / "chain_out2")
    assert code_of(guard.read, root, "dangling", 1 << 20) == "NOT_FOUND"
    assert code_of(guard.read, root, "dangling_out", 1 << 20) == "DENIED_PATH"
    data, parts = guard.read(root, "chain1", 1 << 20)
    assert data == (repo / "src" / "util.py").read_bytes() and parts == ["src", "util.py"]
    assert code_of(guard.read, root, "chain_out1", 1 << 20) == "DENIED_PATH"


def test_guard_symlink_loops_are_denied_without_hanging(guard, root, repo):
    os.symlink("loop2", repo / "loop1")
    os.symlink("loop1", repo / "loop2")
    os.symlink("selfloop", repo / "selfloop")
    os.symlink("grow/x", repo / "grow")  # every hop makes the path longer
    for p in ("loop1", "selfloop", "loop1/x", "grow", "grow/y"):
        started = time.monotonic()
        assert code_of(guard.read, root, p, 1 << 20) == "DENIED_PATH", p
        assert time.monotonic() - started < 2, p


def test_guard_fifo_is_refused_quickly(guard, root, repo):
    fifo = repo / "pipe"
    os.mkfifo(fifo)
    code = within(HANG_S, lambda: code_of(guard.read, root, "pipe", 1 << 20),
                  unblock_fifo(fifo))
    assert code == "NOT_A_FILE"


def test_guard_hard_link_to_outside_file_is_refused(guard, root, repo, outside):
    os.link(outside / "secret.txt", repo / "hard.txt")
    assert (repo / "hard.txt").read_text().startswith(SECRET)  # the trap is real
    try:
        guard.read(root, "hard.txt", 1 << 20)
    except PatchbayError as exc:
        assert exc.code == "DENIED_PATH"
        assert SECRET not in exc.message
    else:
        pytest.fail("a hard-linked file was read")


def test_guard_directory_is_not_a_file(guard, root):
    assert code_of(guard.read, root, "src", 1 << 20) == "NOT_A_FILE"
    assert code_of(guard.read, root, "src/", 1 << 20) == "NOT_A_FILE"
    assert code_of(guard.open_dir, root, "README.md") == "NOT_A_FILE"


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_guard_refusals_leak_no_file_descriptors(guard, root, repo, outside):
    os.mkfifo(repo / "pipe")
    os.link(outside / "secret.txt", repo / "hard.txt")
    (repo / "big.txt").write_text("x" * 100)
    before = open_fds()
    for _ in range(20):
        for p in ("src", "pipe", "hard.txt", "big.txt", "missing.txt", ".env"):
            try:
                guard.read(root, p, 10)
            except Exception:  # the codes are checked elsewhere; here only fds count
                pass
    assert open_fds() == before


def make_blocked_variants(repo: Path) -> List[str]:
    (repo / "Config").mkdir()
    names = [".ENV", "Config/Server.PEM", ".Env.local", ".e\u200bnv", "keys/id_RSA",
             "Deploy.Key"]
    for name in names:
        p = repo / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(BLOCKED_SECRET + "\n")
    assert (repo / ".e\u200bnv").is_file() and (repo / ".e\u200bnv") != (repo / ".env")
    return names + [".env", "config/server.pem"]


def test_fold_removes_case_and_invisible_code_points():
    assert patchbay.fold(".ENV") == ".env"
    assert patchbay.fold(".E\u200bN\u200dV") == ".env"
    assert patchbay.fold("Server.PEM") == "server.pem"
    assert patchbay.fold("e\u0301") == patchbay.fold("\u00e9")  # NFC


def test_guard_blocks_secret_names_in_any_case_or_spelling(guard, root, repo):
    for name in make_blocked_variants(repo):
        assert code_of(guard.read, root, name, 1 << 20) == "BLOCKED_FILE", name
        assert not guard.visible(root, name.split("/")), name


def test_guard_symlink_to_blocked_or_git_file_is_refused(guard, root, repo):
    os.symlink(".env", repo / "innocent.txt")
    os.symlink(".git/config", repo / "gitcfg.txt")
    os.symlink(".git", repo / "gitdir")
    assert code_of(guard.read, root, "innocent.txt", 1 << 20) == "BLOCKED_FILE"
    assert code_of(guard.read, root, "gitcfg.txt", 1 << 20) == "DENIED_PATH"
    assert code_of(guard.read, root, "gitdir/config", 1 << 20) == "DENIED_PATH"


@pytest.mark.parametrize("path", [".git/config", ".git/HEAD", ".GIT/config", ".git",
                                  "./.git/config", "src/.git/x"])
def test_guard_never_exposes_git(guard, root, path):
    assert code_of(guard.read, root, path, 1 << 20) == "DENIED_PATH"


def test_guard_protects_patchbay_home_inside_root(repo):
    home = repo / "pbhome"
    (home / "runtime").mkdir(parents=True)
    (home / "runtime" / "audit.jsonl").write_text("{}\n")
    g = patchbay.PathGuard(list(patchbay.DEFAULT_BLOCKED_GLOBS), protected=(str(home),))
    r = patchbay.Root("repo", str(repo))
    try:
        assert code_of(g.read, r, "pbhome/runtime/audit.jsonl", 1 << 20) == "DENIED_PATH"
        assert code_of(g.read, r, "PBHome/runtime/audit.jsonl", 1 << 20) == "DENIED_PATH"
    finally:
        r.close()


def test_root_stays_pinned_when_renamed_and_replaced(guard, root, repo, tmp_path):
    original = (repo / "README.md").read_bytes()
    moved = tmp_path / "repo-moved"
    repo.rename(moved)
    repo.mkdir()
    (repo / "README.md").write_text("IMPOSTOR\n")
    data, _ = guard.read(root, "README.md", 1 << 20)
    assert data == original
    data, _ = guard.read(root, os.path.join(root.real, "README.md"), 1 << 20)
    assert data == original
    assert root.current_path() == str(moved)
    assert code_of(guard.read, root, "impostor-only.txt", 1 << 20) == "NOT_FOUND"


# ---------------------------------------------------------------------------------------
# The same attacks through both front doors
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["..", "../x", "a/../../x", "src/../../repo-evil/secret.txt"])
def test_doors_reject_dotdot(doors, path):
    for door, call in doors:
        assert err(call, "read_file", {"path": path}) == "DENIED_PATH", door
        assert err(call, "fetch", {"id": path}) == "DENIED_PATH", door
        assert err(call, "list_files", {"path": path}) == "DENIED_PATH", door
        assert err(call, "search", {"query": "x", "path": path}) == "DENIED_PATH", door


def test_actions_door_maps_denied_path_to_403(server):
    status, body = action(server.url, "read_file", {"path": "../etc/passwd"})
    assert status == 403 and body["error"] == "DENIED_PATH"


def test_doors_absolute_paths_inside_work_outside_are_denied(doors, repo):
    real = os.path.realpath(repo)
    inside = os.path.join(real, "src", "app.py")
    for door, call in doors:
        assert ok(call, "read_file", {"path": inside})["text"].startswith("def greet"), door
        assert ok(call, "fetch", {"id": inside})["text"].startswith("def greet"), door
        assert "src/app.py" in listed(call, path=os.path.join(real, "src"))
        assert "src/app.py" in listed(call, path=real)
        hits = ok(call, "search", {"query": "greet", "path": real})["results"]
        assert [h["path"] for h in hits] == ["src/app.py"], door
        for outside_path in ("/etc/passwd", "/", "/tmp"):
            assert err(call, "read_file", {"path": outside_path}) == "DENIED_PATH"
            assert err(call, "fetch", {"id": outside_path}) == "DENIED_PATH"
            assert err(call, "list_files", {"path": outside_path}) == "DENIED_PATH"
            assert err(call, "search", {"query": "root", "path": outside_path}) == "DENIED_PATH"


def test_doors_deny_sibling_prefix_root(doors, repo):
    evil = repo.parent / (repo.name + "-evil")
    evil.mkdir()
    (evil / "secret.txt").write_text(SECRET + "\n")
    real = os.path.realpath(repo)
    target = real + "-evil/secret.txt"
    for door, call in doors:
        for tool, args in (("read_file", {"path": target}), ("fetch", {"id": target}),
                           ("list_files", {"path": real + "-evil"}),
                           ("search", {"query": SECRET, "path": real + "-evil"})):
            result, is_error = call(tool, args)
            assert is_error and result["error"] == "DENIED_PATH", (door, tool, result)
            no_leak(result, SECRET)


def test_doors_treat_tilde_literally(doors, repo):
    for door, call in doors:
        assert err(call, "read_file", {"path": "~/.bashrc"}) == "NOT_FOUND", door
        assert err(call, "list_files", {"path": "~"}) == "NOT_FOUND", door
    (repo / "~").mkdir()
    (repo / "~" / "note.txt").write_text("literal tilde\n")
    for door, call in doors:
        assert ok(call, "read_file", {"path": "~/note.txt"})["text"] == "literal tilde\n", door
        assert listed(call, path="~") == ["~/note.txt"], door


def test_doors_reject_nul_and_over_long_paths(doors):
    for door, call in doors:
        for tool, key in (("read_file", "path"), ("fetch", "id"), ("list_files", "path")):
            assert err(call, tool, {key: "README.md\x00.txt"}) == "INVALID_ARG", (door, tool)
            assert err(call, tool, {key: "a/" * 2100}) == "INVALID_ARG", (door, tool)
            assert err(call, tool, {key: "b" * 256}) == "INVALID_ARG", (door, tool)
        assert err(call, "search", {"query": "x", "path": "src\x00"}) == "INVALID_ARG", door


def test_doors_deny_symlinks_out_of_the_root(start_server, repo, outside):
    os.symlink(outside / "secret.txt", repo / "linkfile")
    os.symlink(outside, repo / "linkdir")
    os.symlink("../outside/secret.txt", repo / "rel_escape.txt")
    os.symlink("../../outside/secret.txt", repo / "docs" / "esc.txt")
    for door, call in both_doors(start_server().url):
        for p in ("linkfile", "linkdir/secret.txt", "rel_escape.txt", "docs/esc.txt",
                  os.path.join(os.path.realpath(repo), "linkdir", "secret.txt")):
            for tool, args in (("read_file", {"path": p}), ("fetch", {"id": p + ":1"})):
                result, is_error = call(tool, args)
                assert is_error and result["error"] == "DENIED_PATH", (door, tool, p, result)
                no_leak(result, SECRET)
        assert err(call, "list_files", {"path": "linkdir"}) == "DENIED_PATH", door
        entries = {e["path"]: e for e in ok(call, "list_files",
                                            {"depth": 5, "include_hidden": True})["entries"]}
        assert entries["linkdir"]["type"] == "symlink"
        assert entries["linkfile"]["type"] == "symlink"
        assert not [p for p in entries if p.startswith("linkdir/")], door
        no_leak(entries, "secret.txt")


def test_search_does_not_follow_symlinks_out_of_the_root(search_server, repo, outside):
    os.symlink(outside / "secret.txt", repo / "linkfile")
    os.symlink(outside, repo / "linkdir")
    os.symlink("../../outside/secret.txt", repo / "docs" / "esc.txt")
    for door, call in search_server():
        result = ok(call, "search", {"query": SECRET})
        no_leak(result, SECRET)
        assert result["results"] == [], door
        for p in ("linkdir", "linkfile", "docs/esc.txt", "docs"):
            result, _ = call("search", {"query": SECRET, "path": p})
            no_leak(result, SECRET)  # refused or empty, never the outside file


def test_search_through_in_root_symlink_to_blocked_file_leaks_nothing(search_server, repo):
    os.symlink(".env", repo / "innocent.txt")
    os.symlink("config", repo / "cfg")
    for door, call in search_server():
        # None: the search succeeds and finds nothing; a code: it is refused with that code.
        for args, code in (({"query": "supersecret"}, None),
                           ({"query": "supersecret", "path": "innocent.txt"}, "BLOCKED_FILE"),
                           ({"query": "PRIVATE KEY", "path": "cfg"}, None),
                           ({"query": "PRIVATE KEY"}, None)):
            result, is_error = call("search", args)
            no_leak(result, "supersecret", "PRIVATE KEY-----")
            if code:
                assert is_error and result["error"] == code, (door, args, result)
            else:
                assert not is_error and result["results"] == [], (door, args, result)
        assert ok(call, "search", {"query": "greet"})["results"], door  # search does work


def test_doors_follow_symlinks_that_stay_inside(start_server, repo):
    os.symlink("README.md", repo / "alias.md")
    os.symlink(os.path.join(os.path.realpath(repo), "README.md"), repo / "abs_alias.md")
    os.symlink("../README.md", repo / "docs" / "up.md")
    os.symlink("../docs", repo / "src" / "docs_link")
    readme = (repo / "README.md").read_text()
    guide = (repo / "docs" / "guide.md").read_text()
    for door, call in both_doors(start_server().url):
        for p in ("alias.md", "abs_alias.md", "docs/up.md"):
            r = ok(call, "read_file", {"path": p})
            assert r["text"] == readme, (door, p)
            assert r["path"] == "README.md", (door, p)
            assert ok(call, "fetch", {"id": p})["text"] == readme, (door, p)
        assert ok(call, "read_file", {"path": "src/docs_link/guide.md"})["text"] == guide
        assert listed(call, path="src/docs_link") == ["docs/guide.md", "docs/up.md"], door


def test_doors_dangling_chained_and_looping_symlinks(start_server, repo, outside):
    os.symlink("nowhere.txt", repo / "dangling")
    os.symlink("/nonexistent-patchbay-target/x", repo / "dangling_out")
    os.symlink("chain2", repo / "chain1")
    os.symlink("chain3", repo / "chain2")
    os.symlink("src/util.py", repo / "chain3")
    os.symlink("chain_out2", repo / "chain_out1")
    os.symlink(outside / "secret.txt", repo / "chain_out2")
    os.symlink("loop2", repo / "loop1")
    os.symlink("loop1", repo / "loop2")
    os.symlink("grow/x", repo / "grow")
    util = (repo / "src" / "util.py").read_text()
    for door, call in both_doors(start_server().url):
        assert err(call, "read_file", {"path": "dangling"}) == "NOT_FOUND", door
        assert err(call, "read_file", {"path": "dangling_out"}) == "DENIED_PATH", door
        assert ok(call, "read_file", {"path": "chain1"})["text"] == util, door
        assert ok(call, "fetch", {"id": "chain1:2"})["text"] == util, door
        result, is_error = call("read_file", {"path": "chain_out1"})
        assert is_error and result["error"] == "DENIED_PATH", door
        no_leak(result, SECRET)
        for p in ("loop1", "loop2/x", "grow"):
            started = time.monotonic()
            assert err(call, "read_file", {"path": p}) == "DENIED_PATH", (door, p)
            assert err(call, "list_files", {"path": p}) == "DENIED_PATH", (door, p)
            assert time.monotonic() - started < 5, (door, p)
        paths = listed(call)  # the loops are listed as symlinks, not walked
        assert "loop1" in paths and not [p for p in paths if p.startswith(("loop1/", "grow/"))]


def test_search_with_symlink_loops_and_dangling_links_finishes(search_server, repo):
    os.symlink("loop2", repo / "loop1")
    os.symlink("loop1", repo / "loop2")
    os.symlink("grow/x", repo / "grow")
    os.symlink("nowhere.txt", repo / "dangling")
    for door, call in search_server():
        started = time.monotonic()
        hits = ok(call, "search", {"query": "greet"})["results"]
        assert [h["path"] for h in hits] == ["src/app.py"], door
        for p in ("loop1", "grow", "dangling"):
            result, _ = call("search", {"query": "greet", "path": p})
            assert result.get("results", []) == [], (door, p, result)
        assert time.monotonic() - started < 5, door


def test_doors_refuse_fifo_quickly(start_server, repo):
    fifo = repo / "pipe"
    os.mkfifo(fifo)
    (repo / "sub").mkdir()
    os.mkfifo(repo / "sub" / "p2")
    for door, call in both_doors(start_server().url):
        for tool, args in (("read_file", {"path": "pipe"}), ("fetch", {"id": "pipe:1"}),
                           ("read_file", {"path": "sub/p2"})):
            result, is_error = within(HANG_S, lambda t=tool, a=args: call(t, a),
                                      unblock_fifo(fifo))
            assert is_error and result["error"] == "NOT_A_FILE", (door, tool, result)
        entries = within(HANG_S, lambda c=call: ok(c, "list_files", {}), unblock_fifo(fifo))
        kinds = {e["path"]: e["type"] for e in entries["entries"]}
        assert kinds["pipe"] == "other" and kinds["sub/p2"] == "other", door


def test_search_over_fifos_answers_quickly(search_server, repo):
    """A FIFO in the tree or named as the search path must not stall the search."""
    fifo = repo / "pipe"
    os.mkfifo(fifo)
    (repo / "sub").mkdir()
    os.mkfifo(repo / "sub" / "p2")
    for door, call in search_server(limits={"search_timeout_s": 4}):
        for args in ({"query": "greet"}, {"query": "x", "path": "sub"},
                     {"query": "x", "path": "pipe"}):
            started = time.monotonic()
            within(HANG_S, lambda a=args, c=call: c("search", a), unblock_fifo(fifo))
            assert time.monotonic() - started < 2, (door, args)


def test_doors_refuse_hard_link_to_outside_file(start_server, repo, outside):
    os.link(outside / "secret.txt", repo / "hard.txt")
    for door, call in both_doors(start_server().url):
        for tool, args in (("read_file", {"path": "hard.txt"}), ("fetch", {"id": "hard.txt:1"})):
            result, is_error = call(tool, args)
            assert is_error and result["error"] == "DENIED_PATH", (door, tool, result)
            no_leak(result, SECRET)


def test_search_never_shows_content_of_hard_linked_file(search_server, repo, outside):
    os.link(outside / "secret.txt", repo / "hard.txt")
    for door, call in search_server():
        result = ok(call, "search", {"query": SECRET})  # succeeds, and shows nothing of it
        assert result["results"] == [], door
        no_leak(result, SECRET)
        result, is_error = call("search", {"query": SECRET, "path": "hard.txt"})
        assert is_error and result["error"] == "DENIED_PATH", (door, result)
        no_leak(result, SECRET)
        assert ok(call, "search", {"query": "greet"})["results"], door  # search does work


def test_doors_directory_is_not_a_file(doors):
    for door, call in doors:
        for p in ("src", "src/", "docs"):
            assert err(call, "read_file", {"path": p}) == "NOT_A_FILE", (door, p)
            assert err(call, "fetch", {"id": p}) == "NOT_A_FILE", (door, p)
        assert err(call, "read_file", {"path": "."}) == "INVALID_ARG", door
        assert err(call, "list_files", {"path": "README.md"}) == "NOT_A_FILE", door


def test_doors_block_secret_names_in_any_case_or_spelling(start_server, repo):
    names = make_blocked_variants(repo)
    for door, call in both_doors(start_server().url):
        for name in names:
            for tool, args in (("read_file", {"path": name}), ("fetch", {"id": name + ":1"}),
                               ("search", {"query": "x", "path": name})):
                result, is_error = call(tool, args)
                assert is_error and result["error"] == "BLOCKED_FILE", (door, tool, name, result)
                no_leak(result, BLOCKED_SECRET, "supersecret")
        paths = listed(call)
        folded = {patchbay.fold(p) for p in paths}
        for name in names:
            assert name not in paths and patchbay.fold(name) not in folded, (door, name)
        assert "Config" in paths and "config" in paths  # the directories themselves show
        assert "AGENTS.md" in paths


def test_search_never_returns_blocked_files(search_server, repo):
    make_blocked_variants(repo)
    (repo / "visible.txt").write_text(BLOCKED_SECRET + " in an ordinary file\n")
    for door, call in search_server():
        hits = ok(call, "search", {"query": BLOCKED_SECRET})["results"]
        assert [h["path"] for h in hits] == ["visible.txt"], (door, hits)
        for q in ("supersecret", "PRIVATE KEY"):
            result = ok(call, "search", {"query": q, "max_results": 1000})
            assert result["results"] == [], (door, q, result)
        result = ok(call, "search", {"query": BLOCKED_SECRET, "path": "Config"})
        assert result["results"] == [], (door, result)


def test_doors_never_expose_git(start_server):
    for door, call in both_doors(start_server().url):
        for p in (".git/config", ".git/HEAD", ".GIT/config", "./.git/config"):
            assert err(call, "read_file", {"path": p}) == "DENIED_PATH", (door, p)
            assert err(call, "fetch", {"id": p}) == "DENIED_PATH", (door, p)
        assert err(call, "list_files", {"path": ".git"}) == "DENIED_PATH", door
        assert err(call, "search", {"query": "core", "path": ".git"}) == "DENIED_PATH", door
        paths = listed(call, depth=10)
        assert not [p for p in paths if ".git" in p.split("/")], (door, paths)


def test_search_never_returns_git_internals(search_server, repo):
    for door, call in search_server():
        hits = ok(call, "search", {"query": "repositoryformatversion"})["results"]
        assert hits == [], door
        hits = ok(call, "search", {"query": "initial", "max_results": 1000})["results"]
        assert not [h for h in hits if ".git" in h["path"].split("/")], door


def test_root_renamed_and_replaced_while_serving(search_server, repo, tmp_path):
    original_readme = (repo / "README.md").read_text()
    doors_ = search_server()
    moved = tmp_path / "repo-moved"
    repo.rename(moved)
    repo.mkdir()
    (repo / "README.md").write_text("IMPOSTOR README\n")
    (repo / "impostor.txt").write_text("IMPOSTOR greet\n")
    (repo / "src").mkdir()
    (repo / "src" / "app.py").write_text("IMPOSTOR = 1\n")
    absolute = os.path.join(str(repo), "README.md")
    for door, call in doors_:
        assert ok(call, "read_file", {"path": "README.md"})["text"] == original_readme, door
        assert ok(call, "read_file", {"path": absolute})["text"] == original_readme, door
        assert ok(call, "fetch", {"id": "src/app.py:1"})["text"].startswith("def greet")
        paths = listed(call)
        assert "impostor.txt" not in paths and "src/util.py" in paths, door
        hits = ok(call, "search", {"query": "greet"})["results"]
        assert [h["path"] for h in hits] == ["src/app.py"], (door, hits)
        assert ok(call, "search", {"query": "IMPOSTOR"})["results"] == [], door
