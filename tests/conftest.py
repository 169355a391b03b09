"""Fixtures: a real git repository, a private PatchBay home, and servers to talk to."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, List, Tuple

import pytest
from pbtest import (PATCHBAY_ENV, Call, InProcessServer, ServeProcess, both_doors, make_app,
                    make_repo)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No PatchBay setting leaks in from the developer's shell (children copy os.environ)."""
    for key in PATCHBAY_ENV:
        monkeypatch.delenv(key, raising=False)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_repo(tmp_path / "repo")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def start_server(repo: Path, home: Path) -> Iterator[Callable[..., InProcessServer]]:
    """Factory: start_server(profile="worker", token=None, **config overrides)."""
    started: List[InProcessServer] = []

    def start(profile: str = "worker", token: str | None = None,
              **overrides: object) -> InProcessServer:
        srv = InProcessServer(make_app(repo, home, profile, token, **overrides))
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture
def server(start_server: Callable[..., InProcessServer]) -> InProcessServer:
    return start_server()


@pytest.fixture
def doors(server: InProcessServer) -> List[Tuple[str, Call]]:
    """The two front doors of `server`: [("mcp", call), ("actions", call)]."""
    return list(both_doors(server.url))


@pytest.fixture
def serve_process(repo: Path, home: Path) -> Iterator[Callable[..., ServeProcess]]:
    """Factory: serve_process(*extra_args, env=None, roots=None) -> a running child."""
    started: List[ServeProcess] = []

    def start(*extra: str, env: dict | None = None, roots: list | None = None) -> ServeProcess:
        proc = ServeProcess(home, roots or [repo], extra, env)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
