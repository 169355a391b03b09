"""The fake ``cloudflared`` and ``ngrok`` in tests/fakes behave like the real ones."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import pytest

FAKES = Path(__file__).resolve().parent / "fakes"
TIMEOUT_S = 10.0

_CLOUDFLARE_URL = re.compile(r"https://([a-z0-9-]+)\.trycloudflare\.com")


def cloudflare_url(line: str) -> str | None:
    """The first https://<name>.trycloudflare.com on the line, except api."""
    for match in _CLOUDFLARE_URL.finditer(line):
        if match.group(1) != "api":
            return match.group(0)
    return None


def ngrok_url(line: str) -> str | None:
    """The ``url`` of an ngrok JSON log line whose msg is "started tunnel"."""
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if (
        isinstance(event, dict)
        and event.get("msg") == "started tunnel"
        and isinstance(event.get("url"), str)
    ):
        return str(event["url"])
    return None


class Fake:
    """A running fake whose output lines are collected by a reader thread."""

    def __init__(self, proc: subprocess.Popen[str], stream: IO[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def read_until(self, parse: Callable[[str], str | None]) -> str:
        """Read lines until ``parse`` returns a value; fail after TIMEOUT_S."""
        deadline = time.monotonic() + TIMEOUT_S
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                pytest.fail(f"fake exited before the URL; output: {self.lines}")
            self.lines.append(line)
            if (found := parse(line)) is not None:
                return found
        pytest.fail(f"no URL within {TIMEOUT_S}s; output: {self.lines}")

    def drain(self) -> list[str]:
        """All output lines, once the process has closed its stream."""
        while (line := self._queue.get(timeout=TIMEOUT_S)) is not None:
            self.lines.append(line)
        return self.lines


@contextmanager
def run_fake(tool: str, args: list[str], env: dict[str, str]) -> Iterator[Fake]:
    """Start tests/fakes/<tool>; read cloudflared's stderr or ngrok's stdout."""
    on_stderr = tool == "cloudflared"
    proc = subprocess.Popen(
        [str(FAKES / tool), *args],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL if on_stderr else subprocess.PIPE,
        stderr=subprocess.PIPE if on_stderr else subprocess.DEVNULL,
        text=True,
    )
    stream = proc.stderr if on_stderr else proc.stdout
    assert stream is not None
    try:
        yield Fake(proc, stream)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=TIMEOUT_S)
        stream.close()


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def stop(fake: Fake) -> int:
    fake.proc.send_signal(signal.SIGTERM)
    return fake.proc.wait(timeout=TIMEOUT_S)


def test_cloudflared_quick_tunnel_url_comes_after_api_errors(tmp_path: Path) -> None:
    rec = tmp_path / "rec.jsonl"
    args = ["tunnel", "--no-autoupdate", "--url", "http://127.0.0.1:8123"]
    env = {
        "FAKE_TUNNEL_RECORD": str(rec),
        "FAKE_TUNNEL_HOST": "sunny-apple-river-stone",
        "FAKE_TUNNEL_API_ERRORS": "2",
    }
    with run_fake("cloudflared", args, env) as fake:
        assert (
            fake.read_until(cloudflare_url)
            == "https://sunny-apple-river-stone.trycloudflare.com"
        )
        assert sum("https://api.trycloudflare.com" in line for line in fake.lines) == 2
        start = records(rec)[0]
        assert (
            start["event"] == "start"
            and start["argv"] == args
            and start["pid"] == fake.proc.pid
        )
        assert stop(fake) == 0
        assert "Initiating graceful shutdown" in fake.drain()[-1]
    assert [(r["event"], r.get("signal")) for r in records(rec)] == [
        ("start", None),
        ("signal", "SIGTERM"),
    ]


def test_cloudflared_default_host_is_random_words() -> None:
    with run_fake("cloudflared", ["tunnel", "--url", "http://127.0.0.1:1"], {}) as fake:
        url = fake.read_until(cloudflare_url)
        assert re.fullmatch(r"https://[a-z]+(-[a-z]+){3}\.trycloudflare\.com", url)
        assert stop(fake) == 0


def test_cloudflared_named_tunnel_registers_connections(tmp_path: Path) -> None:
    rec = tmp_path / "rec.jsonl"
    args = [
        "tunnel",
        "--no-autoupdate",
        "run",
        "--token",
        "secret-token",
        "--hostname",
        "a.example.com",
    ]
    with run_fake("cloudflared", args, {"FAKE_TUNNEL_RECORD": str(rec)}) as fake:
        fake.read_until(
            lambda line: (
                line if "Registered tunnel connection connIndex=3" in line else None
            )
        )
        assert not any(cloudflare_url(line) for line in fake.lines)
        assert not any("secret-token" in line for line in fake.lines)
        assert records(rec)[0]["argv"] == args
        assert stop(fake) == 0
    assert records(rec)[-1]["signal"] == "SIGTERM"


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ([], None),
        (["--url", "fixed-name.ngrok-free.app"], "https://fixed-name.ngrok-free.app"),
    ],
)
def test_ngrok_started_tunnel_line(
    tmp_path: Path, extra: list[str], expected: str | None
) -> None:
    rec = tmp_path / "rec.jsonl"
    args = ["http", "8123", "--log", "stdout", "--log-format", "json", *extra]
    env = {
        "FAKE_TUNNEL_RECORD": str(rec),
        "FAKE_TUNNEL_HOST": "ab12-203-0-113-7",
        "FAKE_TUNNEL_API_ERRORS": "1",
    }
    with run_fake("ngrok", args, env) as fake:
        url = fake.read_until(ngrok_url)
        assert url == (expected or "https://ab12-203-0-113-7.ngrok-free.app")
        started = json.loads(fake.lines[-1])
        assert (
            started["addr"] == "http://localhost:8123" and started["obj"] == "tunnels"
        )
        assert any(json.loads(line)["lvl"] == "eror" for line in fake.lines)
        assert records(rec)[0]["argv"] == args
        assert stop(fake) == 0
        assert json.loads(fake.drain()[-1])["msg"] == "session closing"
    assert [r["signal"] for r in records(rec) if r["event"] == "signal"] == ["SIGTERM"]


@pytest.mark.parametrize(
    ("tool", "args", "parse"),
    [
        ("cloudflared", ["tunnel", "--url", "http://127.0.0.1:1"], cloudflare_url),
        ("ngrok", ["http", "1", "--log=stdout", "--log-format=json"], ngrok_url),
    ],
)
def test_die_after_exits_with_1(
    tmp_path: Path, tool: str, args: list[str], parse: Callable[[str], str | None]
) -> None:
    rec = tmp_path / "rec.jsonl"
    with run_fake(
        tool, args, {"FAKE_TUNNEL_RECORD": str(rec), "FAKE_TUNNEL_DIE_AFTER": "0.5"}
    ) as fake:
        fake.read_until(parse)
        assert fake.proc.wait(timeout=TIMEOUT_S) == 1
    assert records(rec)[-1]["reason"] == "die_after"


@pytest.mark.parametrize("tool", ["cloudflared", "ngrok"])
def test_delay_and_max_s(tool: str) -> None:
    args = (
        ["tunnel", "--url", "http://127.0.0.1:1"]
        if tool == "cloudflared"
        else ["http", "1", "--log", "stdout", "--log-format", "json"]
    )
    began = time.monotonic()
    with run_fake(
        tool, args, {"FAKE_TUNNEL_DELAY": "0.3", "FAKE_TUNNEL_MAX_S": "0.6"}
    ) as fake:
        fake.read_until(cloudflare_url if tool == "cloudflared" else ngrok_url)
        assert time.monotonic() - began >= 0.3
        assert fake.proc.wait(timeout=TIMEOUT_S) == 0


@pytest.mark.parametrize(
    ("tool", "args", "pattern"),
    [
        (
            "cloudflared",
            ["--version"],
            r"cloudflared version \d{4}\.\d+\.\d+ \(built .+\)",
        ),
        (
            "cloudflared",
            ["version"],
            r"cloudflared version \d{4}\.\d+\.\d+ \(built .+\)",
        ),
        ("ngrok", ["version"], r"ngrok version 3\.\d+\.\d+"),
        ("ngrok", ["--version"], r"ngrok version 3\.\d+\.\d+"),
    ],
)
def test_version(tool: str, args: list[str], pattern: str) -> None:
    out = subprocess.run(
        [str(FAKES / tool), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=True,
    )
    assert re.fullmatch(pattern, out.stdout.strip())
