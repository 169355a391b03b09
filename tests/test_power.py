"""The power tools (SPEC §7 "Power", issue 3): write_file, edit_file, apply_patch and
run_command, over real HTTP through both front doors (MCP and Actions).

Real git repositories, real files (symlinks, hard links, CRLF, BOM, binary), patches made
by real `git diff`, a real child process killed between temp write and rename, real
threads racing edits, and real bash children (timeouts, 50 MB of output, environment).
Every destructive experiment stays inside pytest's tmp directory.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
from pbtest import ROOT, Call, InProcessServer, Mcp, action, both_doors, git, make_app, ok, request

import patchbay

POWER_TOOLS = ("write_file", "edit_file", "apply_patch", "run_command")
HANG_S = 20.0  # any single call slower than this is treated as a hang


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------

def fail(call: Call, tool: str, args: Dict[str, Any]) -> Dict[str, Any]:
    """Call a tool that must fail; return its error object."""
    result, is_error = call(tool, args)
    assert is_error, (tool, args, result)
    assert isinstance(result, dict) and "error" in result, result
    return result


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def snapshot(repo: Path) -> Dict[str, Any]:
    """Everything a patch could change: every path outside .git (directories included),
    with content hash, mode and symlink target, plus `git status --porcelain`."""
    entries: Dict[str, Tuple[str, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(repo):
        dirnames[:] = sorted(d for d in dirnames if not (dirpath == str(repo) and d == ".git"))
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            relp = str(p.relative_to(repo))
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                entries[relp] = ("link", 0, os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                entries[relp] = ("dir", stat.S_IMODE(st.st_mode), "")
            else:
                entries[relp] = ("file", stat.S_IMODE(st.st_mode), sha(p.read_bytes()))
    return {"status": git(repo, "--no-optional-locks", "status", "--porcelain",
                          "--untracked-files=all"),
            "entries": entries}


def tree_of(path: Path) -> Dict[str, str]:
    """Name -> content hash (or link target) of everything below a directory."""
    out: Dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                out[str(p.relative_to(path))] = "-> " + os.readlink(p)
            elif p.is_file():
                out[str(p.relative_to(path))] = sha(p.read_bytes())
            else:
                out[str(p.relative_to(path))] = "dir"
    return out


def leftovers(directory: Path) -> List[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(".patchbay-tmp"))


@pytest.fixture
def power(start_server: Callable[..., InProcessServer]) -> InProcessServer:
    return start_server(profile="power")


@pytest.fixture
def doors(power: InProcessServer) -> List[Tuple[str, Call]]:
    return list(both_doors(power.url))


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory next to the repository, with a file nothing may touch."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "keep.txt").write_text("OUTSIDE ORIGINAL\n")
    return d


# ---------------------------------------------------------------------------------------
# profiles gate the power tools
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("profile", ["readonly", "worker"])
def test_profiles_without_power_neither_list_nor_accept_power_tools(start_server, repo,
                                                                    profile):
    srv = start_server(profile=profile)
    client = Mcp(srv.url)
    client.initialize()
    names = {t["name"] for t in client.rpc("tools/list")["result"]["tools"]}
    assert "read_file" in names  # the profile works, it just lacks the power tools
    assert not names & set(POWER_TOOLS), names
    args = {"write_file": {"path": "pwned.txt", "content": "x"},
            "edit_file": {"path": "README.md", "old_text": "Demo", "new_text": "Pwned"},
            "apply_patch": {"patch": "*** Begin Patch\n*** Add File: pwned.txt\n+x\n"
                                     "*** End Patch\n"},
            "run_command": {"command": "touch pwned.txt"}}
    before = snapshot(repo)
    for tool in POWER_TOOLS:
        status, body = action(srv.url, tool, args[tool])
        assert status == 404, (profile, tool, status, body)
        reply = client.rpc("tools/call", {"name": tool, "arguments": args[tool]})
        assert "result" not in reply and reply["error"]["code"] == patchbay.INVALID_PARAMS, reply
    status, _, spec = request(srv.url + "/openapi.json")
    assert status == 200
    for tool in POWER_TOOLS:
        assert ("/actions/" + tool).encode() not in spec
    assert snapshot(repo) == before
    assert not (repo / "pwned.txt").exists()


@pytest.mark.parametrize("profile", ["power", "full"])
def test_power_and_full_list_and_run_power_tools(start_server, repo, profile):
    srv = start_server(profile=profile)
    client = Mcp(srv.url)
    client.initialize()
    tools = {t["name"]: t for t in client.rpc("tools/list")["result"]["tools"]}
    for tool in POWER_TOOLS:
        assert tool in tools, (profile, tool)
        assert tools[tool]["annotations"]["readOnlyHint"] is False
        assert tools[tool]["annotations"]["destructiveHint"] is True
    status, _, spec = request(srv.url + "/openapi.json")
    assert status == 200
    for tool in POWER_TOOLS:
        assert ("/actions/" + tool).encode() in spec, tool
    for door, call in both_doors(srv.url):
        ok(call, "write_file", {"path": "w-%s.txt" % door, "content": door + "\n"})
        assert (repo / ("w-%s.txt" % door)).read_text() == door + "\n"
        r = ok(call, "run_command", {"command": "echo via-$0", "timeout_s": 10})
        assert r["stdout"] == "via-bash\n" and r["exit_code"] == 0, (door, r)


# ---------------------------------------------------------------------------------------
# write_file: atomic, killed half-way
# ---------------------------------------------------------------------------------------

KILL_CHILD = r"""
import os, signal, sys
import patchbay
root = patchbay.Root("r", sys.argv[1])
guard = patchbay.PathGuard(list(patchbay.DEFAULT_BLOCKED_GLOBS))
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
setattr(os, sys.argv[3], die)   # os.replace: after the temp write; os.fsync: during it
guard.write(root, sys.argv[2], b"NEW CONTENT\n" * 100000)
print("the write finished: the kill never happened")
"""


@pytest.mark.parametrize("stage", ["replace", "fsync"])
def test_write_killed_before_rename_leaves_old_file_intact(start_server, repo, stage):
    target = repo / "src" / "app.py"
    old = target.read_bytes()
    os.chmod(target, 0o640)
    inode = os.stat(target).st_ino
    proc = subprocess.run([sys.executable, "-c", KILL_CHILD, str(repo), "src/app.py", stage],
                          cwd=ROOT, capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr)
    assert target.read_bytes() == old  # not the new content, not a truncated mix
    st = os.stat(target)
    assert st.st_ino == inode and stat.S_IMODE(st.st_mode) == 0o640
    temps = leftovers(target.parent)
    assert len(temps) == 1 and temps[0].startswith(".app.py."), temps
    tmp = target.parent / temps[0]
    assert mode_of(tmp) & ~0o640 == 0  # the orphan is never more open than the file was
    if stage == "replace":  # the temp was complete when the process died before rename
        assert tmp.read_bytes() == b"NEW CONTENT\n" * 100000
    tmp.unlink()
    # A server started afterwards sees the old file and can still write it normally.
    srv = start_server(profile="power")
    for door, call in both_doors(srv.url):
        r = ok(call, "read_file", {"path": "src/app.py"})
        assert r["sha256"] == sha(target.read_bytes())
        content = "written by %s\n" % door
        ok(call, "write_file", {"path": "src/app.py", "content": content,
                                "expected_sha256": r["sha256"]})
        assert target.read_text() == content and mode_of(target) == 0o640
    assert leftovers(target.parent) == []


def test_write_file_creates_replaces_and_reports(doors, repo):
    for door, call in doors:
        name = "notes/%s/new.txt" % door
        r = ok(call, "write_file", {"path": name, "content": "héllo\n"})
        assert r["created"] is True and r["bytes"] == len("héllo\n".encode())
        assert r["sha256"] == sha("héllo\n".encode()) and r["path"] == name
        assert (repo / name).read_bytes() == "héllo\n".encode()
        assert mode_of(repo / name) == patchbay.PathGuard([]).new_file_mode
        r = ok(call, "write_file", {"path": name, "content": "", "expected_sha256": r["sha256"]})
        assert r["created"] is False and (repo / name).read_bytes() == b""
        assert leftovers(repo / "notes" / door) == []


def test_write_file_expected_sha256_conflict_changes_nothing(doors, repo):
    target = repo / "README.md"
    for door, call in doors:
        before = target.read_bytes()
        e = fail(call, "write_file", {"path": "README.md", "content": "lost\n",
                                      "expected_sha256": "0" * 64})
        assert e["error"] == "CONFLICT" and e["sha256"] == sha(before), (door, e)
        assert target.read_bytes() == before
        e = fail(call, "write_file", {"path": "absent-%s.txt" % door, "content": "x",
                                      "expected_sha256": sha(b"x")})
        assert e["error"] == "CONFLICT" and e["sha256"] is None
        assert not (repo / ("absent-%s.txt" % door)).exists()


# ---------------------------------------------------------------------------------------
# concurrent edits
# ---------------------------------------------------------------------------------------

def race(calls: List[Call], tool: str, args: List[Dict[str, Any]]) -> List[Tuple[Any, bool]]:
    """Run one call per thread, released together by a barrier."""
    results: List[Optional[Tuple[Any, bool]]] = [None] * len(calls)
    barrier = threading.Barrier(len(calls), timeout=10)

    def run(i: int) -> None:
        barrier.wait()
        results[i] = calls[i](tool, args[i])

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG_S)
        assert not t.is_alive(), "a racing call hung"
    assert all(r is not None for r in results), results
    return results  # type: ignore[return-value]


def test_concurrent_edits_with_expected_sha256_never_lose_an_update(power, repo):
    target = repo / "counter.txt"
    target.write_text("log:\nSLOT\n")
    # Each thread has its own MCP session; Actions calls are stateless.
    callers = [dict(both_doors(power.url)), dict(both_doors(power.url))]
    winners: List[str] = []
    losers: List[str] = []
    for rnd in range(30):
        current = sha(target.read_bytes())
        calls = [callers[i][("mcp", "actions")[(i + rnd) % 2]] for i in range(2)]
        marks = ["r%02d-t%d" % (rnd, i) for i in range(2)]
        args = [{"path": "counter.txt", "old_text": "SLOT\n", "new_text": m + "\nSLOT\n",
                 "expected_sha256": current} for m in marks]
        results = race(calls, "edit_file", args)
        won = [i for i, (_, is_error) in enumerate(results) if not is_error]
        assert len(won) == 1, (rnd, results)
        w = won[0]
        loser, is_error = results[1 - w]
        assert is_error and loser["error"] == "CONFLICT", (rnd, loser)
        data = target.read_bytes()
        assert results[w][0]["sha256"] == sha(data) == loser["sha256"], rnd
        winners.append(marks[w])
        losers.append(marks[1 - w])
    assert target.read_text() == "log:\n" + "".join(m + "\n" for m in winners) + "SLOT\n"
    assert not any(m in target.read_text() for m in losers)


def test_concurrent_edits_without_hash_are_serialised_not_lost(power, repo):
    target = repo / "counter.txt"
    target.write_text("SLOT\n")
    callers = [dict(both_doors(power.url)) for _ in range(4)]
    expected: List[str] = []
    for rnd in range(10):
        calls = [callers[i][("mcp", "actions")[i % 2]] for i in range(4)]
        marks = ["r%02d-t%d" % (rnd, i) for i in range(4)]
        results = race(calls, "edit_file", [
            {"path": "counter.txt", "old_text": "SLOT\n", "new_text": m + "\nSLOT\n"}
            for m in marks])
        assert all(not e for _, e in results), results
        expected += marks
    lines = target.read_text().splitlines()
    assert sorted(lines) == sorted(expected + ["SLOT"]) and lines[-1] == "SLOT"


def test_concurrent_write_file_with_expected_sha256_exactly_one_wins(power, repo):
    target = repo / "docs" / "guide.md"
    callers = [dict(both_doors(power.url)) for _ in range(3)]
    for rnd in range(10):
        current = sha(target.read_bytes())
        calls = [callers[i][("mcp", "actions")[(i + rnd) % 2]] for i in range(3)]
        contents = ["round %d writer %d\n" % (rnd, i) for i in range(3)]
        results = race(calls, "write_file", [
            {"path": "docs/guide.md", "content": c, "expected_sha256": current}
            for c in contents])
        won = [i for i, (_, e) in enumerate(results) if not e]
        assert len(won) == 1, results
        assert all(results[i][0]["error"] == "CONFLICT" for i in range(3) if i != won[0])
        assert target.read_text() == contents[won[0]]
    assert leftovers(target.parent) == []


# ---------------------------------------------------------------------------------------
# modes, CRLF, BOM, binary
# ---------------------------------------------------------------------------------------

def test_mode_is_kept_by_write_edit_and_patch(doors, repo):
    tool = repo / "tool.sh"
    private = repo / "private.txt"
    for door, call in doors:
        tool.write_text("#!/bin/sh\necho one\n")
        os.chmod(tool, 0o755)
        private.write_text("mine\n")
        os.chmod(private, 0o600)
        ok(call, "write_file", {"path": "tool.sh", "content": "#!/bin/sh\necho two\n"})
        assert mode_of(tool) == 0o755, door
        ok(call, "edit_file", {"path": "tool.sh", "old_text": "two", "new_text": "three"})
        assert mode_of(tool) == 0o755, door
        ok(call, "apply_patch", {"patch": "*** Begin Patch\n*** Update File: tool.sh\n@@\n"
                                          "-echo three\n+echo four\n*** End Patch\n"})
        assert mode_of(tool) == 0o755, door
        ok(call, "apply_patch", {"patch": "--- a/tool.sh\n+++ b/tool.sh\n@@ -1,2 +1,2 @@\n"
                                          " #!/bin/sh\n-echo four\n+echo five\n"})
        assert mode_of(tool) == 0o755 and tool.read_text() == "#!/bin/sh\necho five\n", door
        ok(call, "edit_file", {"path": "private.txt", "old_text": "mine", "new_text": "ours"})
        ok(call, "write_file", {"path": "private.txt", "content": "theirs\n"})
        assert mode_of(private) == 0o600 and private.read_text() == "theirs\n", door


def test_patch_move_keeps_mode(doors, repo):
    """`*** Move to` (and a unified rename) of an executable keeps it executable, like
    `git mv` does."""
    for door, call in doors:
        src = repo / ("run-%s.sh" % door)
        src.write_text("#!/bin/sh\necho hi\n")
        os.chmod(src, 0o755)
        ok(call, "apply_patch", {"patch": "*** Begin Patch\n*** Update File: run-%s.sh\n"
                                          "*** Move to: bin/run-%s.sh\n@@\n-echo hi\n"
                                          "+echo moved\n*** End Patch\n" % (door, door)})
        moved = repo / "bin" / ("run-%s.sh" % door)
        assert not src.exists() and moved.read_text() == "#!/bin/sh\necho moved\n"
        assert mode_of(moved) == 0o755, (door, oct(mode_of(moved)))


def test_crlf_file_edited_with_lf_text_keeps_crlf(doors, repo):
    target = repo / "win.txt"
    for door, call in doors:
        target.write_bytes(b"first\r\nsecond\r\nthird\r\n")
        r = ok(call, "edit_file", {"path": "win.txt", "old_text": "first\nsecond\n",
                                   "new_text": "FIRST\nSECOND\nINSERTED\n"})
        assert r["replacements"] == 1
        assert target.read_bytes() == b"FIRST\r\nSECOND\r\nINSERTED\r\nthird\r\n", door
        # CRLF in old_text works too, and the result has no bare LF anywhere.
        ok(call, "edit_file", {"path": "win.txt", "old_text": "INSERTED\r\nthird",
                               "new_text": "x\ny\r\nz"})
        assert target.read_bytes() == b"FIRST\r\nSECOND\r\nx\r\ny\r\nz\r\n", door
        ok(call, "apply_patch", {"patch": "*** Begin Patch\n*** Update File: win.txt\n@@\n"
                                          " SECOND\n-x\n+ex\n+extra\n*** End Patch\n"})
        data = target.read_bytes()
        assert data == b"FIRST\r\nSECOND\r\nex\r\nextra\r\ny\r\nz\r\n", (door, data)
        assert data.count(b"\n") == data.count(b"\r\n")


def test_utf8_bom_survives_edit_and_patch(doors, repo):
    target = repo / "bom.txt"
    bom = b"\xef\xbb\xbf"
    for door, call in doors:
        target.write_bytes(bom + "hello\nwörld\n".encode())
        digest = ok(call, "read_file", {"path": "bom.txt"})["sha256"]
        assert digest == sha(target.read_bytes())
        ok(call, "edit_file", {"path": "bom.txt", "old_text": "hello", "new_text": "hi",
                               "expected_sha256": digest})
        assert target.read_bytes() == bom + "hi\nwörld\n".encode(), door
        ok(call, "apply_patch", {"patch": "*** Begin Patch\n*** Update File: bom.txt\n@@\n"
                                          " hi\n-wörld\n+earth\n*** End Patch\n"})
        assert target.read_bytes() == bom + b"hi\nearth\n", door
        target.write_bytes(bom + b"a\r\nb\r\n")  # BOM and CRLF together
        ok(call, "edit_file", {"path": "bom.txt", "old_text": "a\nb", "new_text": "A\nB"})
        assert target.read_bytes() == bom + b"A\r\nB\r\n", door


def test_binary_and_non_utf8_files_are_refused_unchanged(power, doors, repo):
    blobs = {"blob.bin": b"\x89PNG\r\n\x00\x00\x00\rIHDR binary\x00tail\n",
             "latin1.txt": "café au lait\n".encode("latin-1")}
    for name, data in blobs.items():
        (repo / name).write_bytes(data)
    for door, call in doors:
        for name, data in blobs.items():
            e = fail(call, "edit_file", {"path": name, "old_text": "tail" if name == "blob.bin"
                                         else "au", "new_text": "x"})
            assert e["error"] == "BINARY_FILE", (door, name, e)
            e = fail(call, "apply_patch", {"patch": "*** Begin Patch\n*** Update File: %s\n@@\n"
                                                    "-tail\n+x\n*** End Patch\n" % name})
            assert e["error"] in ("BINARY_FILE", "PATCH_FAILED"), (door, name, e)
            assert (repo / name).read_bytes() == data
    status, body = action(power.url, "edit_file",
                          {"path": "blob.bin", "old_text": "tail", "new_text": "x"})
    assert status == 415 and body["error"] == "BINARY_FILE"


def test_no_match_ambiguous_and_replace_all(doors, repo):
    target = repo / "multi.txt"
    text = "alpha\nfoo\nbeta\nfoo\ngamma\nfoo bar\n"
    for door, call in doors:
        target.write_text(text)
        e = fail(call, "edit_file", {"path": "multi.txt", "old_text": "absent",
                                     "new_text": "x"})
        assert e["error"] == "NO_MATCH" and "multi.txt" in e["message"], e
        e = fail(call, "edit_file", {"path": "multi.txt", "old_text": "foo",
                                     "new_text": "FOO"})
        assert e["error"] == "AMBIGUOUS", e
        assert e["matches"] == 3 and e["lines"] == [2, 4, 6], e
        assert "3 times" in e["message"] and "2, 4, 6" in e["message"], e
        assert target.read_text() == text
        e = fail(call, "edit_file", {"path": "multi.txt", "old_text": "", "new_text": "x"})
        assert e["error"] == "INVALID_ARG"
        r = ok(call, "edit_file", {"path": "multi.txt", "old_text": "foo", "new_text": "FOO",
                                   "replace_all": True})
        assert r["replacements"] == 3
        assert target.read_text() == text.replace("foo", "FOO"), door
        r = ok(call, "edit_file", {"path": "multi.txt", "old_text": "FOO bar\n",
                                   "new_text": ""})
        assert r["replacements"] == 1 and target.read_text().endswith("gamma\n")
        e = fail(call, "edit_file", {"path": "missing.txt", "old_text": "a", "new_text": "b"})
        assert e["error"] == "NOT_FOUND"


# ---------------------------------------------------------------------------------------
# where writes may go
# ---------------------------------------------------------------------------------------

def test_writes_through_symlinks_out_of_the_root_are_refused(doors, repo, outside):
    os.symlink(outside / "keep.txt", repo / "abs-link.txt")
    os.symlink("../outside/keep.txt", repo / "rel-link.txt")
    os.symlink(outside, repo / "outdir")
    os.symlink(outside / "not-yet.txt", repo / "dangling-out.txt")
    before = tree_of(outside)
    for door, call in doors:
        for path in ("abs-link.txt", "rel-link.txt", "outdir/keep.txt", "outdir/new.txt",
                     "outdir/sub/new.txt", "dangling-out.txt"):
            e = fail(call, "write_file", {"path": path, "content": "PWNED\n"})
            assert e["error"] == "DENIED_PATH", (door, path, e)
        for path in ("abs-link.txt", "rel-link.txt", "outdir/keep.txt"):
            e = fail(call, "edit_file", {"path": path, "old_text": "OUTSIDE",
                                         "new_text": "PWNED"})
            assert e["error"] == "DENIED_PATH", (door, path, e)
    assert tree_of(outside) == before
    assert (outside / "keep.txt").read_text() == "OUTSIDE ORIGINAL\n"
    for link in ("abs-link.txt", "rel-link.txt", "outdir", "dangling-out.txt"):
        assert (repo / link).is_symlink()  # not replaced by a regular file either


def test_writes_through_in_root_symlinks_land_on_the_target(doors, repo, outside):
    """Decided from PathGuard.walk(final=True): an in-root symlink is resolved by splicing
    its target into the path, so writes and edits change the target file and the link
    itself stays a link. A link to a blocked file or into .git is refused."""
    os.symlink("src/app.py", repo / "alias.py")
    os.symlink("src", repo / "srcdir")
    os.symlink(".env", repo / "env-alias")
    os.symlink(".git/config", repo / "git-alias")
    env_before = (repo / ".env").read_bytes()
    gitcfg_before = (repo / ".git" / "config").read_bytes()
    before_outside = tree_of(outside)
    for door, call in doors:
        r = ok(call, "write_file", {"path": "alias.py", "content": "x = '%s'\n" % door})
        assert r["path"] == "src/app.py" and r["created"] is False
        assert (repo / "alias.py").is_symlink() and os.readlink(repo / "alias.py") == "src/app.py"
        assert (repo / "src" / "app.py").read_text() == "x = '%s'\n" % door
        r = ok(call, "edit_file", {"path": "alias.py", "old_text": door, "new_text": "E"})
        assert r["path"] == "src/app.py" and (repo / "src/app.py").read_text() == "x = 'E'\n"
        r = ok(call, "write_file", {"path": "srcdir/new-%s.py" % door, "content": "n\n"})
        assert r["path"] == "src/new-%s.py" % door
        assert (repo / "src" / ("new-%s.py" % door)).read_text() == "n\n"
        assert fail(call, "write_file", {"path": "env-alias", "content": "X=1\n"})["error"] \
            == "BLOCKED_FILE"
        assert fail(call, "write_file", {"path": "git-alias", "content": "[x]\n"})["error"] \
            == "DENIED_PATH"
    assert (repo / ".env").read_bytes() == env_before
    assert (repo / ".git" / "config").read_bytes() == gitcfg_before
    assert (repo / "env-alias").is_symlink() and (repo / "git-alias").is_symlink()
    assert tree_of(outside) == before_outside


def test_patch_delete_of_an_in_root_symlink_never_deletes_its_target(doors, repo):
    """`*** Delete File: alias.py` where alias.py links to src/app.py removes the link (as
    `git apply` does) or refuses; it must not delete src/app.py behind the caller's back."""
    app = (repo / "src" / "app.py").read_bytes()
    for door, call in doors:
        if not os.path.lexists(repo / "alias.py"):
            os.symlink("src/app.py", repo / "alias.py")
        result, is_error = call("apply_patch", {"patch": "*** Begin Patch\n*** Delete File: "
                                                "alias.py\n*** End Patch\n"})
        assert (repo / "src" / "app.py").exists(), (door, result)
        assert (repo / "src" / "app.py").read_bytes() == app
        if not is_error:
            assert not os.path.lexists(repo / "alias.py"), (door, result)


def test_hard_linked_target_is_refused(doors, repo, outside):
    os.link(outside / "keep.txt", repo / "hard.txt")
    for door, call in doors:
        e = fail(call, "write_file", {"path": "hard.txt", "content": "PWNED\n"})
        assert e["error"] == "DENIED_PATH", (door, e)
        e = fail(call, "edit_file", {"path": "hard.txt", "old_text": "OUTSIDE",
                                     "new_text": "PWNED"})
        assert e["error"] == "DENIED_PATH", (door, e)
        e = fail(call, "apply_patch", {"patch": "*** Begin Patch\n*** Update File: hard.txt\n"
                                                "@@\n-OUTSIDE ORIGINAL\n+PWNED\n*** End Patch\n"})
        assert e["error"] == "DENIED_PATH", (door, e)
        e = fail(call, "apply_patch", {"patch": "*** Begin Patch\n*** Delete File: hard.txt\n"
                                                "*** End Patch\n"})
        assert e["error"] == "DENIED_PATH", (door, e)
    assert (outside / "keep.txt").read_text() == "OUTSIDE ORIGINAL\n"
    assert os.stat(repo / "hard.txt").st_ino == os.stat(outside / "keep.txt").st_ino


def test_create_dirs_false_with_missing_parent_is_not_found(doors, repo):
    for door, call in doors:
        e = fail(call, "write_file", {"path": "fresh-%s/deep/f.txt" % door, "content": "x",
                                      "create_dirs": False})
        assert e["error"] == "NOT_FOUND", (door, e)
        assert not (repo / ("fresh-%s" % door)).exists()
        ok(call, "write_file", {"path": "src/flat-%s.txt" % door, "content": "x",
                                "create_dirs": False})
        ok(call, "write_file", {"path": "fresh-%s/deep/f.txt" % door, "content": "x"})
        assert (repo / ("fresh-%s" % door) / "deep" / "f.txt").read_text() == "x"


@pytest.mark.parametrize("path,code", [
    (".git/config", "DENIED_PATH"),
    (".git/hooks/pre-commit", "DENIED_PATH"),
    (".git/new-file", "DENIED_PATH"),
    (".GIT/hooks/post-checkout", "DENIED_PATH"),
    ("src/.git/config", "DENIED_PATH"),
    (".env", "BLOCKED_FILE"),
    (".env.local", "BLOCKED_FILE"),
    ("x.pem", "BLOCKED_FILE"),
    ("config/server.pem", "BLOCKED_FILE"),
    ("keys/id_rsa", "BLOCKED_FILE"),
    (".ssh/authorized_keys", "BLOCKED_FILE"),
])
def test_writes_into_git_and_blocked_files_are_refused(doors, repo, path, code):
    before = snapshot(repo)
    git_before = tree_of(repo / ".git")
    for door, call in doors:
        assert fail(call, "write_file", {"path": path, "content": "PWNED\n"})["error"] == code
        assert fail(call, "edit_file", {"path": path, "old_text": "a", "new_text": "b"}
                    )["error"] == code, (door, path)
        e = fail(call, "apply_patch", {"patch": "*** Begin Patch\n*** Add File: %s\n+PWNED\n"
                                                "*** End Patch\n" % path})
        assert e["error"] == code, (door, path, e)
    assert snapshot(repo) == before
    assert tree_of(repo / ".git") == git_before


def test_patchbay_home_inside_the_root_is_protected(repo):
    srv = InProcessServer(make_app(repo, repo / ".pbhome", "power"))
    try:
        (repo / ".pbhome").mkdir(exist_ok=True)
        (repo / ".pbhome" / "notes.txt").write_text("state\n")
        for door, call in both_doors(srv.url):
            for path in (".pbhome/notes.txt", ".pbhome/channel.json", ".pbhome/new/x"):
                assert fail(call, "write_file", {"path": path, "content": "x"})["error"] \
                    == "DENIED_PATH", (door, path)
            e = fail(call, "apply_patch", {"patch": "*** Begin Patch\n*** Delete File: "
                                                    ".pbhome/notes.txt\n*** End Patch\n"})
            assert e["error"] == "DENIED_PATH"
        assert (repo / ".pbhome" / "notes.txt").read_text() == "state\n"
    finally:
        srv.stop()


# ---------------------------------------------------------------------------------------
# apply_patch: escapes, all-or-nothing, dry run
# ---------------------------------------------------------------------------------------

LEGIT = "*** Update File: README.md\n@@\n-# Demo\n+# CHANGED\n"


def escape_patches(outside: Path, tmp_target: str) -> List[Tuple[str, str]]:
    o = str(outside)
    env = "*** Begin Patch\n" + LEGIT + "%s*** End Patch\n"
    uni = "--- a/README.md\n+++ b/README.md\n@@ -1 +1 @@\n-# Demo\n+# CHANGED\n%s"
    return [
        ("envelope ../ add", env % "*** Add File: ../escape.txt\n+PWNED\n"),
        ("envelope ../ nested", env % "*** Add File: src/../../escape.txt\n+PWNED\n"),
        ("envelope move to ../", env.replace(LEGIT, "") % (
            "*** Update File: README.md\n*** Move to: ../escape.txt\n@@\n-# Demo\n+# X\n")),
        ("envelope absolute add", env % ("*** Add File: %s/escape.txt\n+PWNED\n" % o)),
        ("envelope absolute update", env % ("*** Update File: %s/keep.txt\n@@\n"
                                            "-OUTSIDE ORIGINAL\n+PWNED\n" % o)),
        ("envelope absolute delete", env % ("*** Delete File: %s/keep.txt\n" % o)),
        ("envelope /tmp add", env % ("*** Add File: %s\n+PWNED\n" % tmp_target)),
        ("unified ../", uni % "--- /dev/null\n+++ b/../escape.txt\n@@ -0,0 +1 @@\n+PWNED\n"),
        ("unified +++ /tmp/x", uni % ("--- /dev/null\n+++ %s\n@@ -0,0 +1 @@\n+PWNED\n"
                                      % tmp_target)),
        ("unified b//tmp/x", uni % ("--- /dev/null\n+++ b/%s\n@@ -0,0 +1 @@\n+PWNED\n"
                                    % tmp_target)),
        ("unified rename to /tmp/x", "--- a/README.md\n+++ %s\n@@ -1 +1 @@\n-# Demo\n+# X\n"
         % tmp_target),
        ("unified absolute update", uni % ("--- %s/keep.txt\n+++ %s/keep.txt\n@@ -1 +1 @@\n"
                                           "-OUTSIDE ORIGINAL\n+PWNED\n" % (o, o))),
        ("unified absolute delete", uni % ("--- %s/keep.txt\n+++ /dev/null\n@@ -1 +0,0 @@\n"
                                           "-OUTSIDE ORIGINAL\n" % o)),
        ("symlinked parent add", env % "*** Add File: outlink/new.txt\n+PWNED\n"),
        ("symlinked parent update", env % ("*** Update File: outlink/keep.txt\n@@\n"
                                           "-OUTSIDE ORIGINAL\n+PWNED\n")),
        ("symlinked parent delete", env % "*** Delete File: outlink/keep.txt\n"),
        ("symlinked parent move", env.replace(LEGIT, "") % (
            "*** Update File: README.md\n*** Move to: outlink/README.md\n@@\n-# Demo\n"
            "+# X\n")),
        ("symlinked parent unified", uni % ("--- /dev/null\n+++ b/outlink/new.txt\n"
                                            "@@ -0,0 +1 @@\n+PWNED\n")),
        ("symlinked file update", env % ("*** Update File: outfile.txt\n@@\n"
                                         "-OUTSIDE ORIGINAL\n+PWNED\n")),
        (".git add hook", env % "*** Add File: .git/hooks/pre-commit\n+#!/bin/sh\n+touch x\n"),
        (".git update config", env % "*** Update File: .git/config\n@@\n+[core]\n"),
        (".git move into", env.replace(LEGIT, "") % (
            "*** Update File: README.md\n*** Move to: .git/hooks/post-checkout\n@@\n"
            "-# Demo\n+#!/bin/sh\n")),
        (".git delete", env % "*** Delete File: .git/HEAD\n"),
        (".git unified", uni % ("--- /dev/null\n+++ b/.git/hooks/pre-commit\n@@ -0,0 +1 @@\n"
                                "+#!/bin/sh\n")),
        ("blocked .env", env % "*** Update File: .env\n@@\n-API_KEY=supersecret\n+API_KEY=x\n"),
    ]


def test_patch_escape_attempts_change_nothing(doors, repo, outside):
    tmp_target = "/tmp/patchbay-escape-%s" % uuid.uuid4().hex
    os.symlink(outside, repo / "outlink")
    os.symlink(outside / "keep.txt", repo / "outfile.txt")
    before = snapshot(repo)
    git_before = tree_of(repo / ".git")
    outside_before = tree_of(outside)
    try:
        for door, call in doors:
            for label, patch in escape_patches(outside, tmp_target):
                for dry in (True, False):
                    e = fail(call, "apply_patch", {"patch": patch, "dry_run": dry})
                    assert e["error"] in ("DENIED_PATH", "BLOCKED_FILE"), (door, label, e)
                    assert snapshot(repo) == before, (door, label)
        assert not os.path.lexists(tmp_target)
        assert not (repo / "tmp").exists() and not (repo / "escape.txt").exists()
        assert not (repo.parent / "escape.txt").exists()
        assert tree_of(outside) == outside_before
        assert tree_of(repo / ".git") == git_before
    finally:
        if os.path.lexists(tmp_target):
            os.unlink(tmp_target)


def test_multi_file_patch_whose_last_file_does_not_apply_changes_nothing(doors, repo):
    os.chmod(repo / "src" / "util.py", 0o755)
    before = snapshot(repo)
    patch = ("*** Begin Patch\n"
             "*** Update File: README.md\n@@\n-# Demo\n+# Changed\n"
             "*** Add File: brand/new/file.txt\n+new\n"
             "*** Delete File: docs/guide.md\n"
             "*** Update File: src/util.py\n*** Move to: src/util2.py\n@@\n-import os\n"
             "+import sys\n"
             "*** Update File: AGENTS.md\n@@\n-Run the tests with pytest.\n+ok\n"
             "*** Update File: src/app.py\n@@\n def greet(name):\n-    return 'bye ' + name\n"
             "+    return 'x'\n"
             "*** End Patch\n")
    for door, call in doors:
        for dry in (True, False):
            e = fail(call, "apply_patch", {"patch": patch, "dry_run": dry})
            assert e["error"] == "PATCH_FAILED", (door, e)
            assert "src/app.py" in e["message"] and "hunk 1" in e["message"], e
            assert snapshot(repo) == before, door


def test_multi_file_patch_failing_while_writing_rolls_everything_back(doors, repo):
    """The last file passes planning but fails when written (its parent is a regular
    file): every earlier add, update, delete and move is undone, modes included, and the
    directories the patch created are gone too."""
    (repo / "plain").write_text("I am a file\n")
    os.chmod(repo / "src" / "util.py", 0o755)
    os.chmod(repo / "docs" / "guide.md", 0o600)
    before = snapshot(repo)
    patch = ("*** Begin Patch\n"
             "*** Update File: README.md\n@@\n-# Demo\n+# Changed\n"
             "*** Add File: brand/new/file.txt\n+new\n"
             "*** Delete File: docs/guide.md\n"
             "*** Update File: src/util.py\n*** Move to: src/util2.py\n@@\n-import os\n"
             "+import sys\n"
             "*** Add File: plain/child.txt\n+cannot be written\n"
             "*** End Patch\n")
    for door, call in doors:
        e = fail(call, "apply_patch", {"patch": patch})
        assert e["error"] in ("PATCH_FAILED", "NOT_FOUND", "NOT_A_FILE"), (door, e)
        after = snapshot(repo)
        assert after["status"] == before["status"], door
        files_after = {k: v for k, v in after["entries"].items() if v[0] != "dir"}
        files_before = {k: v for k, v in before["entries"].items() if v[0] != "dir"}
        assert files_after == files_before, door  # contents and modes
        assert leftovers(repo) == [] and leftovers(repo / "src") == []
        assert after == before, (door, sorted(set(after["entries"]) - set(before["entries"])))


def test_dry_run_reports_and_changes_nothing(doors, repo):
    before = snapshot(repo)
    patch = ("*** Begin Patch\n"
             "*** Update File: README.md\n@@\n-# Demo\n+# Changed\n+second line\n"
             "*** Add File: added/one.txt\n+1\n+2\n"
             "*** Delete File: docs/guide.md\n"
             "*** Update File: src/util.py\n*** Move to: lib/util.py\n@@ def here():\n"
             "-    return os.getcwd()\n+    return '.'\n"
             "*** End Patch\n")
    expected = [
        {"path": "README.md", "action": "updated", "hunks": 1, "lines_added": 2,
         "lines_removed": 1},
        {"path": "added/one.txt", "action": "added", "lines_added": 2},
        {"path": "docs/guide.md", "action": "deleted"},
        {"path": "src/util.py", "action": "moved", "to": "lib/util.py", "hunks": 1,
         "lines_added": 1, "lines_removed": 1},
    ]
    for door, call in doors:
        r = ok(call, "apply_patch", {"patch": patch, "dry_run": True})
        assert r["dry_run"] is True and r["applied"] is False
        assert r["files"] == expected, (door, r)
        assert snapshot(repo) == before, door
    door, call = doors[0]
    r = ok(call, "apply_patch", {"patch": patch})
    assert r["applied"] is True and r["files"] == expected
    assert (repo / "README.md").read_text().startswith("# Changed\nsecond line\n")
    assert (repo / "added" / "one.txt").read_text() == "1\n2\n"
    assert not (repo / "docs" / "guide.md").exists() and not (repo / "src" / "util.py").exists()
    assert (repo / "lib" / "util.py").read_text().endswith("    return '.'\n")


def test_failed_hunk_is_named_with_its_reason(doors, repo):
    patch = ("*** Begin Patch\n*** Update File: src/app.py\n@@\n-def greet(name):\n"
             "+def greet(who):\n@@\n-TOKEN_NAME = 'nope'\n+TOKEN_NAME = 'y'\n*** End Patch\n")
    for door, call in doors:
        e = fail(call, "apply_patch", {"patch": patch})
        assert e["error"] == "PATCH_FAILED", e
        assert "src/app.py" in e["message"] and "hunk 2" in e["message"], (door, e)
        assert "TOKEN_NAME = 'nope'" in e["message"]
        e = fail(call, "apply_patch", {"patch": "*** Begin Patch\n*** Add File: README.md\n"
                                                "+dup\n*** End Patch\n"})
        assert e["error"] == "CONFLICT" and "already exists" in e["message"], e
        for junk in ("", "hello", "*** Begin Patch\n*** Add File: x.txt\n+x\n"):
            assert fail(call, "apply_patch", {"patch": junk})["error"] == "INVALID_ARG"
    assert (repo / "src" / "app.py").read_text().startswith("def greet(name):")


# ---------------------------------------------------------------------------------------
# apply_patch: both formats round-trip against `git diff`
# ---------------------------------------------------------------------------------------

LONG = "".join("line %02d\n" % i for i in range(1, 61))
BASE_FILES: Dict[str, bytes] = {
    "long.txt": LONG.encode(),
    "crlf.txt": b"one\r\ntwo\r\nthree\r\nfour\r\n",
    "nonl.txt": b"alpha\nbeta",
    "addnl.txt": b"a\nb",
    "rmnl.txt": b"a\nb\n",
    "gone.txt": b"bye\nnow\n",
    "old_name.py": "".join("value_%d = %d\n" % (i, i) for i in range(20)).encode(),
}


def real_edits(repo: Path) -> Dict[str, Optional[bytes]]:
    """Commit BASE_FILES, make real edits (modify, add, delete, rename + edit, newline
    changes, CRLF) and return the expected content of every touched path."""
    for name, data in BASE_FILES.items():
        (repo / name).write_bytes(data)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "base files")
    long = LONG.replace("line 05\n", "line FIVE\n").replace("line 30\n", "")
    long = long.replace("line 50\n", "line 50\ninserted A\ninserted B\n")
    (repo / "long.txt").write_text(long)  # three hunks: change, delete, insert
    (repo / "crlf.txt").write_bytes(b"one\r\nTWO\r\nthree\r\nfour\r\nfive\r\n")
    (repo / "nonl.txt").write_bytes(b"alpha\nBETA")
    (repo / "addnl.txt").write_bytes(b"a\nb\n")
    (repo / "rmnl.txt").write_bytes(b"a\nB")
    (repo / "gone.txt").unlink()
    (repo / "src" / "new_module.py").write_bytes(b"def fresh():\n    return 1\n")
    (repo / "new_nonl.txt").write_bytes(b"no newline here")
    git(repo, "mv", "old_name.py", "new_name.py")
    renamed = (repo / "new_name.py").read_bytes().replace(b"value_10 = 10\n", b"value_10 = 'ten'\n")
    (repo / "new_name.py").write_bytes(renamed)
    paths = list(BASE_FILES) + ["src/new_module.py", "new_nonl.txt", "new_name.py"]
    return {p: (repo / p).read_bytes() if (repo / p).exists() else None for p in paths}


def git_diff(repo: Path, *args: str) -> str:
    """`git diff` output exactly as git wrote it (pbtest.git's text mode would turn the
    CRLF of a CRLF file's lines into LF)."""
    env = dict(os.environ, GIT_CONFIG_GLOBAL=os.devnull, GIT_CONFIG_NOSYSTEM="1")
    out = subprocess.run(["git", "diff", *args], cwd=repo, env=env, check=True,
                         capture_output=True, timeout=60)
    return out.stdout.decode("utf-8")


def restore(repo: Path) -> None:
    git(repo, "reset", "-q", "--hard", "HEAD")
    git(repo, "clean", "-q", "-f", "-d")  # untracked only; ignored build/ stays


def contents(repo: Path, paths: List[str]) -> Dict[str, Optional[bytes]]:
    return {p: (repo / p).read_bytes() if (repo / p).exists() else None for p in paths}


ENVELOPE = """*** Begin Patch
*** Update File: long.txt
@@
-line 05
+line FIVE
@@ line 29
-line 30
@@
 line 50
+inserted A
+inserted B
*** Update File: crlf.txt
@@
 one
-two
+TWO
 three
 four
+five
*** End of File
*** Update File: nonl.txt
@@
 alpha
-beta
+BETA
*** End of File
*** Delete File: gone.txt
*** Add File: src/new_module.py
+def fresh():
+    return 1
*** Update File: old_name.py
*** Move to: new_name.py
@@ value_9 = 9
-value_10 = 10
+value_10 = 'ten'
*** End Patch
"""


def test_both_patch_formats_round_trip_real_git_diff(doors, repo):
    expected = real_edits(repo)
    git(repo, "add", "-A")
    diff = git_diff(repo, "HEAD")
    assert "rename from old_name.py" in diff and "\\ No newline at end of file" in diff
    assert "\r\n" in diff and "new file mode" in diff and "deleted file mode" in diff
    git(repo, "stash", "-q")
    assert contents(repo, list(BASE_FILES)) == {k: v for k, v in BASE_FILES.items()}
    paths = list(expected)
    original = contents(repo, paths)
    envelope_paths = ["long.txt", "crlf.txt", "nonl.txt", "gone.txt", "src/new_module.py",
                      "old_name.py", "new_name.py"]
    for door, call in doors:
        r = ok(call, "apply_patch", {"patch": diff})
        assert r["applied"] is True and len(r["files"]) == 9, (door, r)
        assert contents(repo, paths) == expected, door
        restore(repo)
        assert contents(repo, paths) == original
        r = ok(call, "apply_patch", {"patch": ENVELOPE})
        assert r["applied"] is True, (door, r)
        got = contents(repo, paths)
        for p in paths:
            assert got[p] == (expected[p] if p in envelope_paths else original[p]), (door, p)
        restore(repo)


def test_git_diff_pure_rename_round_trips(doors, repo):
    """`git mv` with no edit gives a diff with no ---/+++ lines (similarity 100%); it must
    be applied, or refused — never silently skipped while reporting success."""
    git(repo, "mv", "AGENTS.md", "AGENTS-renamed.md")
    (repo / "docs" / "guide.md").write_text("Guide\n=====\n\nChanged.\n")
    git(repo, "add", "-A")
    diff = git_diff(repo, "HEAD")
    assert "rename from AGENTS.md" in diff
    restore(repo)
    for door, call in doors:
        result, is_error = call("apply_patch", {"patch": diff})
        if is_error:  # refusing the unsupported part is acceptable, if nothing changed
            assert git(repo, "status", "--porcelain") == "", (door, result)
            continue
        assert (repo / "AGENTS-renamed.md").exists() and not (repo / "AGENTS.md").exists(), \
            (door, result)
        assert (repo / "docs" / "guide.md").read_text().endswith("Changed.\n")
        restore(repo)


def test_git_diff_of_mixed_line_endings_round_trips(doors, repo):
    """A file with both CRLF and LF lines: lines the diff does not change keep their
    own ending."""
    (repo / "mixed.txt").write_bytes(b"l1\r\nl2\nl3\r\nl4\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "mixed")
    (repo / "mixed.txt").write_bytes(b"l1\r\nL2\nl3\r\nl4\n")
    diff = git_diff(repo)
    assert "\r\n" in diff
    restore(repo)
    for door, call in doors:
        ok(call, "apply_patch", {"patch": diff})
        assert (repo / "mixed.txt").read_bytes() == b"l1\r\nL2\nl3\r\nl4\n", door
        restore(repo)


# ---------------------------------------------------------------------------------------
# run_command
# ---------------------------------------------------------------------------------------

def processes_with(marker: str) -> List[int]:
    """Live processes whose command line contains marker (zombies have an empty one)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open("/proc/%s/cmdline" % entry, "rb") as f:
                cmd = f.read().replace(b"\0", b" ")
        except OSError:
            continue
        if marker.encode() in cmd:
            pids.append(int(entry))
    return pids


def test_timeout_kills_the_whole_process_group(doors):
    for door, call in doors:
        marker = "30.%06d" % secrets.randbelow(10 ** 6)
        started = time.monotonic()
        r = ok(call, "run_command", {"command": "sleep %s & sleep %s; echo never"
                                     % (marker, marker), "timeout_s": 1})
        elapsed = time.monotonic() - started
        assert elapsed < 2.5, (door, elapsed)
        assert r["timed_out"] is True and r["exit_code"] != 0, r
        assert "never" not in r["stdout"] and 900 <= r["duration_ms"] < 2500, r
        deadline = time.monotonic() + 1.0
        while processes_with("sleep " + marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert processes_with("sleep " + marker) == [], door


def test_fifty_megabytes_of_output_are_capped(doors):
    cap = patchbay.DEFAULT_LIMITS["output_bytes"]
    for door, call in doors:
        started = time.monotonic()
        r = ok(call, "run_command", {
            "command": "head -c 5000000 /dev/zero | tr '\\0' e >&2; "
                       "head -c 52428800 /dev/zero | tr '\\0' o; echo; echo END",
            "timeout_s": 60})
        assert time.monotonic() - started < HANG_S
        assert r["exit_code"] == 0 and r["timed_out"] is False, door
        assert r["stdout_truncated"] is True and r["stderr_truncated"] is True
        assert len(r["stdout"]) <= cap and len(r["stderr"]) <= cap // 2, door
        assert r["stdout"].startswith("ooo") and r["stderr"].startswith("eee")
        assert "bytes omitted" in r["stdout"] and "bytes omitted" in r["stderr"]


def test_truncated_output_keeps_its_last_lines(doors):
    """Head and tail are kept: the end of a long output (a test summary, say) survives."""
    cap = patchbay.DEFAULT_LIMITS["output_bytes"]
    for door, call in doors:
        r = ok(call, "run_command", {"command": "seq 1 200000; echo SUMMARY-LINE"})
        assert r["stdout_truncated"] is True and len(r["stdout"]) <= cap
        assert r["stdout"].startswith("1\n2\n3\n"), door
        assert r["stdout"].endswith("199999\n200000\nSUMMARY-LINE\n"), (door, r["stdout"][-80:])


TOKEN = "tok-" + "Zq8" * 10


def test_token_and_tunnel_secrets_never_reach_the_child(start_server, monkeypatch):
    monkeypatch.setenv(patchbay.ENV_TOKEN, TOKEN)
    monkeypatch.setenv("CLOUDFLARED_TOKEN", "cf-secret-value-123456")
    monkeypatch.setenv("NGROK_AUTHTOKEN", "ngrok-secret-value-123456")
    monkeypatch.setenv("PB_TEST_UNLISTED", "visible-only-when-inherited")
    for profile in ("power", "full"):
        srv = start_server(profile=profile, token=TOKEN)
        for door, call in both_doors(srv.url, TOKEN):
            # Names, and values reversed (so redaction cannot hide a leak).
            r = ok(call, "run_command", {"command": "env | cut -d= -f1; env | rev; "
                                         "tr '\\0' '\\n' < /proc/self/environ | rev"})
            out = r["stdout"]
            names = set(out.splitlines())
            for secret_name in (patchbay.ENV_TOKEN, "CLOUDFLARED_TOKEN", "NGROK_AUTHTOKEN"):
                assert secret_name not in names, (profile, door, secret_name)
            for value in (TOKEN, "cf-secret-value-123456", "ngrok-secret-value-123456"):
                assert value[::-1] not in out and value not in out, (profile, door)
            assert "PATH" in names and "TERM" in names
            assert ("PB_TEST_UNLISTED" in names) == (profile == "full"), (profile, door)


def test_secrets_in_output_are_redacted(start_server):
    srv = start_server(profile="power", token=TOKEN)
    shaped = ["ghp_" + "A1b2C3d4E5" * 4, "AKIA" + "ABCDEFGHIJ234567",
              "xoxb-1234567890-abcdefghijkl",
              "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3"]
    pem = ["-----BEGIN RSA PRIVATE KEY-----", "MIIEowIBAAKCAQEA", "-----END RSA PRIVATE KEY-----"]
    for door, call in both_doors(srv.url, TOKEN):
        cmd = "printf '%%s\\n' %s; printf '%%s\\n' %s; echo %s >&2" % (
            " ".join([TOKEN] + shaped), " ".join("'%s'" % x for x in pem), shaped[0])
        r = ok(call, "run_command", {"command": cmd})
        for s in [TOKEN, *shaped, pem[1]]:
            assert s not in r["stdout"] and s not in r["stderr"], (door, s, r)
        assert r["stdout"].count("[REDACTED]") >= 5 and "[REDACTED]" in r["stderr"], r
        plain = ok(call, "run_command", {"command": "echo 'def token(): return 42'"})
        assert plain["stdout"] == "def token(): return 42\n"  # ordinary code is not mangled


def test_non_utf8_output_is_replaced_not_raised(doors):
    for door, call in doors:
        r = ok(call, "run_command", {"command": "printf 'ok \\377\\376 end\\n'; "
                                     "printf 'err \\351\\n' >&2"})
        assert r["stdout"] == "ok \ufffd\ufffd end\n", (door, r)
        assert r["stderr"] == "err \ufffd\n" and r["exit_code"] == 0


def test_stdout_stderr_exit_code_and_no_stdin(doors):
    for door, call in doors:
        r = ok(call, "run_command", {"command": "echo out; echo err >&2; read x || "
                                     "echo no-stdin; exit 3"})
        assert r["stdout"] == "out\nno-stdin\n" and r["stderr"] == "err\n", (door, r)
        assert r["exit_code"] == 3 and r["timed_out"] is False
        assert isinstance(r["duration_ms"], int) and r["duration_ms"] >= 0
        r = ok(call, "run_command", {"command": "ps -o pgid= -p $$; ps -o pgid= -p $PPID"})
        own, parent = r["stdout"].split()
        assert own != parent, "the child has its own process group"


def test_cwd_works_and_cannot_escape(doors, repo, outside):
    os.symlink(outside, repo / "outlink")
    os.symlink("src", repo / "srclink")
    real = os.path.realpath(repo)
    for door, call in doors:
        r = ok(call, "run_command", {"command": "pwd"})
        assert r["stdout"] == real + "\n" and r["cwd"] == ".", (door, r)
        r = ok(call, "run_command", {"command": "pwd; ls", "cwd": "src"})
        assert r["stdout"].splitlines()[0] == real + "/src" and "app.py" in r["stdout"]
        assert r["cwd"] == "src"
        r = ok(call, "run_command", {"command": "pwd -P", "cwd": "srclink"})
        assert r["stdout"] == real + "/src\n" and r["cwd"] == "src"
        r = ok(call, "run_command", {"command": "pwd", "cwd": real + "/docs"})
        assert r["stdout"] == real + "/docs\n"
        for cwd, codes in (("..", ("DENIED_PATH",)), ("src/../..", ("DENIED_PATH",)),
                           ("/", ("DENIED_PATH",)), ("/tmp", ("DENIED_PATH",)),
                           (str(outside), ("DENIED_PATH",)), ("outlink", ("DENIED_PATH",)),
                           (".git", ("DENIED_PATH",)), (".git/hooks", ("DENIED_PATH",)),
                           ("missing", ("NOT_FOUND",)), ("README.md", ("NOT_A_FILE",))):
            e = fail(call, "run_command", {"command": "touch escaped-%s" % door, "cwd": cwd})
            assert e["error"] in codes, (door, cwd, e)
    assert not any(p.name.startswith("escaped-") for p in outside.rglob("*"))
    assert not any(p.name.startswith("escaped-") for p in repo.rglob("*"))


def test_actions_door_caps_the_timeout(start_server):
    assert patchbay.DEFAULT_LIMITS["actions_timeout_s"] == 40
    srv = start_server(profile="power")
    for door, call in both_doors(srv.url):
        r = ok(call, "run_command", {"command": "echo fine", "timeout_s": 3600})
        assert r["stdout"] == "fine\n" and r["timed_out"] is False, door
        e = fail(call, "run_command", {"command": "echo no", "timeout_s": 3601})
        assert e["error"] == "INVALID_ARG"
        e = fail(call, "run_command", {"command": "echo no", "timeout_s": 0})
        assert e["error"] == "INVALID_ARG"
    # Same code path with a 1 s cap: Actions is cut at the cap, MCP gets what it asked.
    srv = start_server(profile="power", limits={"actions_timeout_s": 1})
    doors_ = dict(both_doors(srv.url))
    started = time.monotonic()
    r = ok(doors_["actions"], "run_command", {"command": "sleep 2.5; echo late",
                                              "timeout_s": 3600})
    assert r["timed_out"] is True and "late" not in r["stdout"], r
    assert time.monotonic() - started < 2.4
    r = ok(doors_["mcp"], "run_command", {"command": "sleep 1.5; echo late",
                                          "timeout_s": 3600})
    assert r["timed_out"] is False and r["stdout"] == "late\n", r


def test_run_command_argument_validation(doors):
    for door, call in doors:
        assert fail(call, "run_command", {})["error"] == "INVALID_ARG", door
        assert fail(call, "run_command", {"command": 5})["error"] == "INVALID_ARG"
        assert fail(call, "run_command", {"command": "x" * 20001})["error"] == "INVALID_ARG"
        assert fail(call, "run_command", {"command": "true", "shell": "zsh"}
                    )["error"] == "INVALID_ARG"

