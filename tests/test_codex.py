"""Codex workers and jobs, end to end: the real Codex CLI from npm, driven by the fake
Responses server in fake_model.py, through PatchBay's tools on both front doors."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

import pytest
from fake_model import (FakeModel, apply_patch, find_codex_bin, hang, input_texts, message,
                        shell, codex_home)
from pbtest import InProcessServer, Mcp, ServeProcess, action, git, make_app

CODEX = find_codex_bin()
pytestmark = pytest.mark.skipif(CODEX is None, reason="the Codex CLI is not installed "
                                "(sh tests/run installs it)")

EDIT = ("*** Begin Patch\n*** Update File: README.md\n@@\n-# Demo\n+# Demo, edited by Codex\n"
        "*** End Patch\n")


@pytest.fixture
def codex_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeModel]:
    """A fake model and a CODEX_HOME pointing at it, in this process's environment."""
    with FakeModel([]) as fake, codex_home(fake.url) as env:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        yield fake


def codex_profile(**limits: int) -> Dict[str, Any]:
    return {"codex": {"bin": CODEX, "model": "gpt-5.5", "env": ["FAKE_API_KEY"]},
            "limits": limits}


@pytest.fixture
def start(repo: Path, home: Path) -> Iterator[Any]:
    servers = []

    def go(profile: str = "power", **overrides: Any) -> InProcessServer:
        srv = InProcessServer(make_app(repo, home, profile, **overrides))
        servers.append(srv)
        return srv

    yield go
    for srv in servers:
        srv.stop()


def wait_state(client: Mcp, name: str, states: Tuple[str, ...], limit: float = 30) -> Dict:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        status, err = client.call("codex_status", {"name": name, "wait_s": 5})
        assert not err, status
        if status["state"] in states:
            return status
    raise AssertionError("%s never reached %s: %s" % (name, states, status))


def no_secrets(report: Any, *secrets: str) -> None:
    text = json.dumps(report)
    for s in secrets:
        assert s not in text
    assert "/tmp/" not in text and "/work/" not in text


def test_worker_edits_diffs_integrates_and_resumes(codex_env: FakeModel, start: Any,
                                                   repo: Path, home: Path) -> None:
    codex_env.add(apply_patch(EDIT), message("edited the title"))
    srv = start(**codex_profile())
    client = Mcp(srv.url)
    client.initialize()
    started, err = client.call("codex_worker_start", {"name": "fix-title",
                                                      "brief": "Edit the README title"})
    assert not err, started
    assert started["name"] == "fix-title" and started["state"] in ("queued", "running")
    done = wait_state(client, "fix-title", ("idle", "failed"))
    assert done["state"] == "idle", done
    assert done["last_message"] == "edited the title"
    assert done["changed_files"] == ["README.md"]
    assert (repo / "README.md").read_text().startswith("# Demo\n")  # base untouched so far

    diff, err = client.call("codex_diff", {"name": "fix-title"})
    assert not err and "+# Demo, edited by Codex" in diff["diff"]
    assert diff["files"] == [{"status": "M", "path": "README.md"}]
    log = git(repo, "log", "--format=%s", "patchbay/fix-title")
    assert log.splitlines()[0] == "turn 1: Edit the README title"

    # The Actions door sees the same worker (same workspace, same runner).
    status, body = action(srv.url, "codex_integrate", {"name": "fix-title"})
    assert status == 200, body
    assert body["integrated"] and body["files"] == ["README.md"]
    assert (repo / "README.md").read_text().startswith("# Demo, edited by Codex")
    assert git(repo, "status", "--porcelain") == " M README.md\n"  # uncommitted, no commit
    assert git(repo, "log", "--format=%s").splitlines() == ["initial"]

    thread_headers = {r["headers"].get("thread-id") for r in codex_env.responses_requests()}
    codex_env.add(message("second turn done"))
    again, err = client.call("codex_worker_message", {"worker": "fix-title",
                                                      "message": "Now say done"})
    assert not err, again
    done = wait_state(client, "fix-title", ("idle", "failed"))
    assert done["state"] == "idle" and done["turns"] == 2, done
    last = codex_env.responses_requests()[-1]
    assert last["headers"].get("thread-id") in thread_headers  # the same thread, resumed
    assert "Edit the README title" in input_texts(last["body"])
    assert "Now say done" in input_texts(last["body"])
    meta = json.loads(last["headers"]["x-codex-turn-metadata"])
    no_secrets([started, done, diff, body, again], meta["thread_id"], str(home))
    # Every directory PatchBay made under its home is private, the worktree's own root
    # included; only the checkout inside it keeps the repository's modes.
    for dirpath, _, _ in os.walk(home):
        inner = Path(dirpath).relative_to(home).parts
        if inner[:1] == ("worktrees",) and len(inner) > 3:
            continue
        assert stat.S_IMODE(os.stat(dirpath).st_mode) == 0o700, dirpath


def test_committing_worker_integrates_and_dirty_base_is_refused(codex_env: FakeModel,
                                                               start: Any, repo: Path) -> None:
    codex_env.add(shell("echo new > added.txt && printf 'x\\n' >> src/util.py"),
                  message("made two changes"))
    srv = start(**codex_profile())
    client = Mcp(srv.url)
    client.initialize()
    client.call("codex_apply_job", {"prompt": "add a file"})
    done = wait_state(client, "apply-1", ("done", "failed"))
    assert done["state"] == "done", done
    (repo / "src" / "util.py").write_text("locally edited\n")
    refused, err = client.call("codex_integrate", {"name": "apply-1"})
    assert err and refused["error"] == "CONFLICT" and refused["files"] == ["src/util.py"]
    assert "src/util.py" in refused["message"]
    assert not (repo / "added.txt").exists()
    git(repo, "checkout", "--", "src/util.py")
    ok, err = client.call("codex_integrate", {"name": "apply-1", "dry_run": True})
    assert not err and ok["dry_run"] and not (repo / "added.txt").exists()
    ok, err = client.call("codex_integrate", {"name": "apply-1"})
    assert not err, ok
    assert sorted(ok["files"]) == ["added.txt", "src/util.py"]
    assert (repo / "added.txt").read_text() == "new\n"


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_stop_kills_the_whole_group_and_discard_cleans_up(codex_env: FakeModel, start: Any,
                                                         repo: Path) -> None:
    codex_env.add(shell("sleep 37.5; echo late > late.txt"))
    srv = start(**codex_profile())
    client = Mcp(srv.url)
    client.initialize()
    client.call("codex_worker_start", {"name": "sleeper", "brief": "sleep"})
    wait_state(client, "sleeper", ("running",))
    run = srv.app.runner.runs[(srv.app.runner.key(srv.app.workspaces.get(None)), "sleeper")]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and run.commands == 0 and not _sleep_running():
        time.sleep(0.1)
    assert _sleep_running(), "the scripted shell command never started"
    pgid = run.pgid
    assert pgid
    stopped, err = client.call("codex_stop", {"name": "sleeper"})
    assert not err and stopped["state"] == "cancelled", stopped
    assert not group_alive(pgid)
    assert not _sleep_running()
    gone, err = client.call("codex_stop", {"name": "sleeper", "discard": True})
    assert not err and gone["discarded"]
    assert "patchbay/sleeper" not in git(repo, "branch", "--list")
    status, err = client.call("codex_status", {})
    assert status == {"runs": []}


def _sleep_running() -> bool:
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open("/proc/%s/cmdline" % pid, "rb") as f:
                    if b"sleep\x0037.5" in f.read():
                        return True
            except OSError:
                pass
    return False


def test_turn_timeout_fails_cleanly(codex_env: FakeModel, start: Any) -> None:
    codex_env.add(hang())
    srv = start(**codex_profile(turn_timeout_s=2))
    client = Mcp(srv.url)
    client.initialize()
    client.call("codex_plan_job", {"prompt": "think"})
    done = wait_state(client, "plan-1", ("done", "failed"))
    assert done["state"] == "failed" and "timed out" in done["error"]


class SignallingCondition(threading.Condition):
    """The runner's real condition, which also says when someone starts waiting on it."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = threading.Event()

    def wait(self, timeout: Optional[float] = None) -> bool:
        self.waiting.set()
        return super().wait(timeout)


def test_wait_wakes_early_and_parallel_limit_queues(codex_env: FakeModel, start: Any) -> None:
    codex_env.add(hang(), hang())
    srv = start(**codex_profile(max_parallel_turns=1, turn_timeout_s=60))
    cond = srv.app.runner.cond = SignallingCondition()  # before any job holds it
    client = Mcp(srv.url)
    client.initialize()
    client.call("codex_plan_job", {"prompt": "first"})
    wait_state(client, "plan-1", ("running",))
    client.call("codex_plan_job", {"prompt": "second"})
    status, _ = client.call("codex_status", {"name": "plan-2"})
    assert status["state"] == "queued"  # one slot, taken by plan-1
    waited: Dict[str, Any] = {}

    def waiter() -> None:
        t0 = time.monotonic()
        other = Mcp(srv.url)
        other.initialize()
        waited["status"], _ = other.call("codex_status", {"name": "plan-2", "wait_s": 20})
        waited["seconds"] = time.monotonic() - t0

    thread = threading.Thread(target=waiter)
    cond.waiting.clear()
    thread.start()
    assert cond.waiting.wait(20), "codex_status never started waiting"
    client.call("codex_stop", {"name": "plan-1"})
    thread.join(30)
    assert waited["seconds"] < 10  # woken by the change, not by the 20 s limit
    assert waited["status"]["state"] == "running"
    assert wait_state(client, "plan-2", ("running",))["state"] == "running"
    client.call("codex_stop", {"name": "plan-2"})


def test_flag_like_prompt_stays_a_prompt(codex_env: FakeModel, start: Any) -> None:
    codex_env.add(message("ok"))
    srv = start(**codex_profile())
    client = Mcp(srv.url)
    client.initialize()
    prompt = "--help -c model_provider=x --dangerously-bypass-approvals-and-sandbox"
    client.call("codex_plan_job", {"prompt": prompt})
    done = wait_state(client, "plan-1", ("done", "failed"))
    assert done["state"] == "done", done
    assert prompt in input_texts(codex_env.responses_requests()[-1]["body"])


def test_restart_marks_interrupted_and_message_resumes(codex_env: FakeModel, repo: Path,
                                                       home: Path, tmp_path: Path) -> None:
    codex_env.add(message("first"), hang())
    profile = tmp_path / "codex.json"
    profile.write_text(json.dumps(dict(codex_profile(), extends="power")))
    env = {k: os.environ[k] for k in ("CODEX_HOME", "FAKE_API_KEY", "HOME", "PATH")}
    proc = ServeProcess(home, [repo], ("--profile", str(profile)), env)
    try:
        client = Mcp(proc.url)
        client.initialize()
        client.call("codex_worker_start", {"name": "w", "brief": "hello"})
        wait_state(client, "w", ("idle",))
        client.call("codex_worker_message", {"worker": "w", "message": "hang now"})
        wait_state(client, "w", ("running",))
    finally:
        assert proc.stop() == 0
    state = json.loads(next(home.glob("runtime/jobs/*/w/state.json")).read_text())
    assert state["state"] == "interrupted"
    assert not _codex_children_of(state)
    codex_env.add(message("resumed fine"))
    proc = ServeProcess(home, [repo], ("--profile", str(profile)), env)
    try:
        client = Mcp(proc.url)
        client.initialize()
        status, _ = client.call("codex_status", {"name": "w"})
        assert status["state"] == "interrupted"
        client.call("codex_worker_message", {"worker": "w", "message": "carry on"})
        done = wait_state(client, "w", ("idle", "failed"))
        assert done["state"] == "idle" and done["last_message"] == "resumed fine", done
        last = codex_env.responses_requests()[-1]
        assert "hello" in input_texts(last["body"])  # the same thread, resumed
    finally:
        assert proc.stop() == 0


def _codex_children_of(state: Dict[str, Any]) -> bool:
    pgid = state.get("pgid")
    return bool(pgid) and group_alive(int(pgid))


def test_transcript_is_bounded_and_own_session_only(codex_env: FakeModel, start: Any) -> None:
    codex_env.add(message("alpha reply"), message("beta reply"))
    srv = start(**codex_profile())
    client = Mcp(srv.url)
    client.initialize()
    client.call("codex_worker_start", {"name": "a", "brief": "alpha prompt"})
    wait_state(client, "a", ("idle",))
    client.call("codex_worker_start", {"name": "b", "brief": "beta prompt"})
    wait_state(client, "b", ("idle",))
    got, err = client.call("codex_transcript", {"name": "a", "max_messages": 5})
    assert not err, got
    texts = [m["text"] for m in got["messages"]]
    assert "alpha prompt" in texts and "alpha reply" in texts
    assert not any("beta" in t for t in texts)
    one, _ = client.call("codex_transcript", {"name": "a", "max_messages": 1})
    assert len(one["messages"]) == 1

    # Lines that are valid JSON but not objects (or objects of the wrong shapes) are
    # skipped, not a crash.
    rollout = sorted(Path(os.environ["CODEX_HOME"]).glob("sessions/*/*/*/rollout-*.jsonl"))
    found = [p for p in rollout if any("alpha prompt" in ln for ln in p.read_text().split("\n"))]
    assert len(found) == 1, rollout
    with open(found[0], "a") as f:
        for odd in ([1, 2], "text", 42, None, True, {"type": "response_item", "payload": [1]},
                    {"type": "response_item", "payload": {"type": "message", "role": "user",
                                                          "content": 7}},
                    {"type": "response_item", "payload": {"type": "message", "role": "user",
                                                          "content": ["x", {"text": 3}]}}):
            f.write(json.dumps(odd) + "\n")
    again, err = client.call("codex_transcript", {"name": "a", "max_messages": 5})
    assert not err, again
    assert again["messages"] == got["messages"]


def test_fsmonitor_and_filters_never_run(codex_env: FakeModel, start: Any, repo: Path,
                                         tmp_path: Path) -> None:
    marker = tmp_path / "fsmonitor-ran"
    hook = tmp_path / "fsmon.sh"
    hook.write_text("#!/bin/sh\ntouch %s\n" % marker)
    hook.chmod(0o755)
    git(repo, "config", "core.fsmonitor", str(hook))
    codex_env.add(message("nothing"))
    srv = start(**codex_profile())
    client = Mcp(srv.url)
    client.initialize()
    client.call("codex_apply_job", {"prompt": "noop"})
    assert wait_state(client, "apply-1", ("done", "failed"))["state"] == "done"
    client.call("codex_diff", {"name": "apply-1"})
    client.call("codex_integrate", {"name": "apply-1"})
    assert not marker.exists()
    git(repo, "config", "filter.evil.clean", "touch %s" % marker)
    refused, err = client.call("codex_apply_job", {"prompt": "again"})
    assert err and refused["error"] == "UNSUPPORTED_REPO"
    assert "filter.evil.clean" in refused["message"]
    assert not marker.exists()


def test_readonly_profile_only_plans(start: Any) -> None:
    srv = start("readonly")
    client = Mcp(srv.url)
    client.initialize()
    names = {t["name"] for t in client.rpc("tools/list")["result"]["tools"]}
    assert {"codex_plan_job", "codex_status", "codex_stop"} <= names
    assert not names & {"codex_apply_job", "codex_worker_start", "codex_integrate",
                        "codex_transcript"}




def test_jobs_cli_lists_shows_logs_and_cancels(codex_env: FakeModel, start: Any,
                                               home: Path) -> None:
    import subprocess
    import sys

    from pbtest import SCRIPT

    codex_env.add(message("listed"), hang())
    srv = start(**codex_profile())
    client = Mcp(srv.url)
    client.initialize()
    client.call("codex_worker_start", {"name": "cli-one", "brief": "hello"})
    wait_state(client, "cli-one", ("idle",))

    def jobs(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(SCRIPT), "--home", str(home), "jobs", *args],
                              capture_output=True, text=True, timeout=30)

    listed = jobs("list")
    assert listed.returncode == 0 and "cli-one" in listed.stdout and "idle" in listed.stdout
    shown = jobs("show", "cli-one")
    assert json.loads(shown.stdout)["last_message"] == "listed"
    logs = jobs("logs", "cli-one")
    assert "thread.started" in logs.stdout and "agent_message" in logs.stdout
    client.call("codex_worker_message", {"worker": "cli-one", "message": "hang"})
    wait_state(client, "cli-one", ("running",))
    run = next(iter(srv.app.runner.runs.values()))
    pgid = run.pgid
    cancelled = jobs("cancel", "cli-one")
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
    deadline = time.monotonic() + 10  # the runner reaps the killed group (zombies count)
    while pgid and group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pgid and not group_alive(pgid)
    status, _ = client.call("codex_status", {"name": "cli-one", "wait_s": 2})
    assert status["state"] == "cancelled", status
    missing = jobs("show", "nope")
    assert missing.returncode == 1 and "patchbay: error:" in missing.stderr
    assert "Traceback" not in missing.stderr
