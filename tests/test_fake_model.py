"""The fake Responses server drives the real Codex CLI end to end, offline."""

from __future__ import annotations

import json
import subprocess
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
from fake_model import (
    CodexRun,
    FakeModel,
    Step,
    apply_patch,
    default_step,
    exec_args,
    failed,
    find_codex_bin,
    hang,
    http_error,
    input_texts,
    message,
    run_codex,
    shell,
    stall,
    write_codex_home,
    CODEX_HOME_BASE,
)

RUN_TIMEOUT = 30.0  # generous wall clock; a healthy turn takes under 1 s


@pytest.fixture(scope="session")
def codex_bin() -> str:
    found = find_codex_bin()
    if found is None:
        pytest.skip("codex not installed (npm install --prefix .cache/npm ...)")
    return found


def _git(repo: Path, *args: str) -> None:
    # -c identity: HOME is isolated in tests, so no global git config exists.
    subprocess.run(
        [
            "git",
            "-c",
            "user.name=test",
            "-c",
            "user.email=test@example.invalid",
            "-C",
            str(repo),
            *args,
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git repo with one committed file; codex trusts git repos."""
    path = tmp_path / "repo"
    path.mkdir()
    _git(path, "init", "-q")
    (path / "hello.txt").write_text("hello\n")
    _git(path, "add", "hello.txt")
    _git(path, "commit", "-q", "-m", "init")
    return path


@pytest.fixture
def codex_dir() -> Iterator[Path]:
    """A CODEX_HOME outside /tmp (see fake_model.CODEX_HOME_BASE), removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="pb-codex-home-", dir=CODEX_HOME_BASE) as d:
        yield Path(d)


def _run(
    codex_bin: str,
    fake: FakeModel,
    home: Path,
    args: list[str],
    prompt: str,
    *,
    timeout: float = RUN_TIMEOUT,
    idle_timeout_ms: int = 20000,
) -> CodexRun:
    env = write_codex_home(home, fake.url, idle_timeout_ms)
    return run_codex(codex_bin, args, prompt, env, timeout=timeout)


def _describe(run: CodexRun) -> str:
    """Failure context: exit code plus both streams."""
    return f"rc={run.returncode}\nstdout:\n{run.stdout}\nstderr:\n{run.stderr}"


def _user_prompt(request: dict[str, Any]) -> str:
    """The last user text of a model request: the prompt of that turn."""
    return input_texts(request["body"])[-1]


# -- (a) shell ---------------------------------------------------------------


def test_shell_step_writes_file(codex_bin: str, repo: Path, codex_dir: Path) -> None:
    script = [
        shell("printf 'from shell\\n' > out.txt && cat out.txt"),
        message("wrote out.txt"),
    ]
    with FakeModel(script) as fake:
        run = _run(codex_bin, fake, codex_dir, exec_args(repo), "write a file")
        requests = fake.responses_requests()
    assert run.returncode == 0, _describe(run)
    assert (repo / "out.txt").read_text() == "from shell\n"
    assert run.thread_id()
    commands = run.items("command_execution")
    assert len(commands) == 1
    assert commands[0]["exit_code"] == 0
    assert commands[0]["aggregated_output"] == "from shell\n"
    assert [m["text"] for m in run.items("agent_message")] == ["wrote out.txt"]
    assert len(run.of_type("turn.completed")) == 1
    assert not run.of_type("turn.failed")
    # Two samplings: the call, then the answer to its output.
    assert len(requests) == 2
    assert requests[1]["body"]["input"][-1]["type"] == "function_call_output"
    assert requests[0]["headers"]["authorization"] == "Bearer fake-key-for-tests"


# -- (b) apply_patch -----------------------------------------------------------


def test_apply_patch_step_edits_file(
    codex_bin: str, repo: Path, codex_dir: Path
) -> None:
    patch = (
        "*** Begin Patch\n*** Update File: hello.txt\n@@\n-hello\n"
        "+hello, patched\n*** End Patch\n"
    )
    with FakeModel([apply_patch(patch), message("patched")]) as fake:
        run = _run(codex_bin, fake, codex_dir, exec_args(repo), "patch it")
        requests = fake.responses_requests()
    assert run.returncode == 0, _describe(run)
    assert (repo / "hello.txt").read_text() == "hello, patched\n"
    changes = run.items("file_change")
    assert len(changes) == 1 and changes[0]["status"] == "completed"
    assert changes[0]["changes"] == [
        {"path": str(repo / "hello.txt"), "kind": "update"}
    ]
    tool_output = requests[1]["body"]["input"][-1]
    assert tool_output["type"] == "custom_tool_call_output"
    assert "Success" in json.dumps(tool_output)


# -- (c) resume ----------------------------------------------------------------


def test_resume_continues_thread(codex_bin: str, repo: Path, codex_dir: Path) -> None:
    with FakeModel([shell("echo one > first.txt"), message("first done")]) as fake:
        first = _run(codex_bin, fake, codex_dir, exec_args(repo), "first prompt")
        assert first.returncode == 0, _describe(first)
        thread_id = first.thread_id()
        assert thread_id
        n_first = len(fake.responses_requests())
        # -C/-s must precede `resume`: it restores neither (codex.md, 4).
        fake.add(shell("echo two > second.txt"), message("second done"))
        args = exec_args(repo, "resume", thread_id)
        second = _run(codex_bin, fake, codex_dir, args, "second prompt")
        resumed = fake.responses_requests()[n_first:]
    assert second.returncode == 0, _describe(second)
    assert second.thread_id() == thread_id
    assert (repo / "second.txt").read_text() == "two\n"
    assert [m["text"] for m in second.items("agent_message")] == ["second done"]
    body = resumed[0]["body"]
    assert _user_prompt(resumed[0]) == "second prompt"
    assert "first prompt" in input_texts(body)
    assert "first done" in input_texts(body, role="assistant")
    calls = [i for i in body["input"] if i.get("type") == "function_call"]
    assert [json.loads(c["arguments"])["cmd"] for c in calls] == [
        "echo one > first.txt"
    ]
    meta = json.loads(resumed[0]["headers"]["x-codex-turn-metadata"])
    assert meta["history_initialization"] == "cold_resume"
    assert meta["thread_id"] == thread_id


# -- (d) failures ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (http_error(400, "scripted bad request"), "scripted bad request"),
        (http_error(500), ""),
        (failed("scripted failure"), "scripted failure"),
        (stall(), "idle timeout"),
    ],
    ids=["http400", "http500", "response_failed", "stall"],
)
def test_error_step_fails_turn(
    codex_bin: str, repo: Path, codex_dir: Path, step: Step, expected: str
) -> None:
    with FakeModel([step]) as fake:
        # A short idle timeout makes the stall case fail fast.
        run = _run(
            codex_bin,
            fake,
            codex_dir,
            exec_args(repo),
            "fail please",
            idle_timeout_ms=500,
        )
        requests = fake.responses_requests()
    assert run.returncode == 1, _describe(run)
    assert not run.timed_out
    turn_failed = run.of_type("turn.failed")
    assert len(turn_failed) == 1, _describe(run)
    assert expected in turn_failed[0]["error"]["message"]
    assert not run.of_type("turn.completed")
    # Retries are off, so exactly one request reached the fake.
    assert len(requests) == 1


# -- (e) prompt on stdin stays a prompt ------------------------------------------


def test_flag_like_prompt_on_stdin_is_text(
    codex_bin: str, repo: Path, codex_dir: Path
) -> None:
    prompt = "--help -c model_provider=x\n--version -s danger-full-access"
    with FakeModel() as fake:
        run = _run(codex_bin, fake, codex_dir, exec_args(repo), prompt)
        requests = fake.responses_requests()
    assert run.returncode == 0, _describe(run)
    assert len(requests) == 1  # the provider was not switched away
    assert _user_prompt(requests[0]) == prompt
    meta = json.loads(requests[0]["headers"]["x-codex-turn-metadata"])
    assert meta["sandbox_mode"] == "workspace-write"
    assert [m["text"] for m in run.items("agent_message")] == ["done"]
    assert "Usage:" not in run.stdout + run.stderr


# -- hang: the wall clock kills codex and close() frees the handler ------------


def test_hang_is_killed_and_released(
    codex_bin: str, repo: Path, codex_dir: Path
) -> None:
    fake = FakeModel([hang()]).start()
    try:
        run = _run(codex_bin, fake, codex_dir, exec_args(repo), "hang", timeout=1.5)
        assert run.timed_out and run.returncode != 0
        assert [r["step"] for r in fake.responses_requests()] == ["hang"]
        assert fake.alive_handlers() == 1  # still held, not answered
    finally:
        fake.close()
    assert fake.alive_handlers() == 0


# -- the fake on its own ---------------------------------------------------------


def test_hang_released_by_close_without_codex() -> None:
    fake = FakeModel([hang()]).start()
    errors: list[BaseException] = []

    def client() -> None:
        req = urllib.request.Request(fake.url + "/responses", data=b"{}", method="POST")
        try:
            urllib.request.urlopen(req, timeout=10).read()
        except OSError as exc:  # the held request ends with no response
            errors.append(exc)

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    for _ in range(200):  # bounded wait for the request to be recorded
        if fake.requests:
            break
        thread.join(0.01)
    assert fake.alive_handlers() == 1
    fake.close()
    thread.join(10)
    assert not thread.is_alive()
    assert fake.alive_handlers() == 0
    assert errors, "a hung request must not get a normal response"


def test_default_policy_and_unknown_path() -> None:
    tool_out = {"input": [{"type": "custom_tool_call_output", "output": "x"}]}
    assert default_step(tool_out).kind == "message"
    assert default_step({"input": []}) == message("done")
    with FakeModel() as fake:
        req = urllib.request.Request(fake.url + "/models")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=10)
        assert info.value.code == 404
        assert fake.requests[0]["path"] == "/v1/models"
        assert fake.responses_requests() == []


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "localhost"])
def test_refuses_non_loopback(host: str) -> None:
    with pytest.raises(ValueError):
        FakeModel(host=host)
