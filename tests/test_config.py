"""Config and profiles: precedence, YAML with and without PyYAML, strict keys, packaging."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from pbtest import ROOT, SCRIPT

import patchbay


def test_builtin_profiles_expose_their_groups(tmp_path: Path) -> None:
    home = str(tmp_path / "home")
    for name, groups in patchbay.PROFILE_GROUPS.items():
        cfg = patchbay.Config.resolve(home, name, environ={})
        assert cfg.groups == groups and cfg.profile_name == name
    assert patchbay.Config.resolve(home, None, environ={}).profile_name == "worker"


def test_precedence_builtin_file_env_flags(tmp_path: Path) -> None:
    profile = tmp_path / "p.json"
    profile.write_text(json.dumps({"extends": "power", "port": 1111, "roots": ["/from/file"],
                                   "limits": {"max_sessions": 5}}))
    home = str(tmp_path / "home")
    cfg = patchbay.Config.resolve(home, str(profile), environ={})
    assert (cfg.extends, cfg.port, cfg.roots, cfg.limits["max_sessions"]) == (
        "power", 1111, ["/from/file"], 5)
    assert cfg.limits["body_bytes"] == patchbay.DEFAULT_LIMITS["body_bytes"]  # merged, kept
    cfg = patchbay.Config.resolve(home, str(profile), environ={"PATCHBAY_ROOT": "/from/env"})
    assert cfg.roots == ["/from/env"]
    cfg = patchbay.Config.resolve(home, str(profile), {"port": 2222, "roots": ["/flag"]},
                                  environ={"PATCHBAY_ROOT": "/from/env"})
    assert (cfg.port, cfg.roots) == (2222, ["/flag"])
    cfg = patchbay.Config.resolve(home, None, environ={"PATCHBAY_PROFILE": str(profile)})
    assert cfg.extends == "power"


def test_yaml_profile_loads(tmp_path: Path) -> None:
    profile = tmp_path / "p.yaml"
    profile.write_text("extends: readonly\nport: 3333\nblocked_globs: ['*.secret']\n")
    cfg = patchbay.Config.resolve(str(tmp_path / "home"), str(profile), environ={})
    assert (cfg.extends, cfg.port, cfg.blocked_globs) == ("readonly", 3333, ["*.secret"])


def test_yaml_without_pyyaml_says_how_to_fix(tmp_path: Path) -> None:
    profile = tmp_path / "p.yaml"
    profile.write_text("extends: readonly\n")
    code = ("import sys; sys.modules['yaml'] = None; sys.path.insert(0, %r); import patchbay; "
            "sys.exit(patchbay.main(['--home', %r, 'serve', '--root', %r, '--profile', %r]))"
            % (str(ROOT), str(tmp_path / "home"), str(tmp_path), str(profile)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 2
    assert "PyYAML" in out.stderr and ".json" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(("content", "words"), [
    ({"prot": 1}, ["unknown profile key", "prot", "accepted keys"]),
    ({"limits": {"body_byte": 1}}, ["unknown limit", "body_byte"]),
    ({"limits": {"body_bytes": -1}}, ["limits.body_bytes", "from 1 to 1073741824", "-1"]),
    ({"limits": {"search_timeout_s": 0}}, ["limits.search_timeout_s", "from 1 to 86400"]),
    ({"limits": {"max_sessions": 10 ** 30}}, ["limits.max_sessions", "from 1 to"]),
    ({"limits": {"turn_timeout_s": float("inf")}}, ["limits.turn_timeout_s", "inf"]),
    ({"limits": {"max_parallel_turns": float("nan")}}, ["limits.max_parallel_turns", "nan"]),
    ({"limits": {"output_bytes": 1.5}}, ["limits.output_bytes", "1.5"]),
    ({"limits": {"audit_bytes": True}}, ["limits.audit_bytes", "True"]),
    ({"limits": {"body_bytes": "4096"}}, ["limits.body_bytes", "'4096'"]),
    ({"port": -1}, ["port must be an integer from 0 to 65535", "-1"]),
    ({"port": 70000}, ["port", "from 0 to 65535"]),
    ({"port": "8765"}, ["port", "'8765'"]),
    ({"ttl_minutes": 0}, ["ttl_minutes", "from 1 to 527040"]),
    ({"ttl_minutes": -5}, ["ttl_minutes", "-5"]),
    ({"codex": {"sandbox": "none"}}, ["codex.sandbox", "workspace-write"]),
    ({"tools": "read_file"}, ["list of strings"]),
    ({"extends": "nope"}, ["unknown profile", "nope"]),
    ({"child_env": "all"}, ["allowlist or inherit"]),
])
def test_bad_profiles_are_one_line_errors(tmp_path: Path, content: dict, words: list) -> None:
    profile = tmp_path / "bad.json"
    profile.write_text(json.dumps(content))
    out = subprocess.run([sys.executable, str(SCRIPT), "--home", str(tmp_path / "home"),
                          "serve", "--root", str(tmp_path), "--profile", str(profile)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("patchbay: error:") and len(out.stderr.splitlines()) == 1
    for word in words:
        assert word in out.stderr


@pytest.mark.parametrize(("argv", "flag", "allowed"), [
    (["serve", "--port", "-1"], "--port", "from 0 to 65535"),
    (["serve", "--port", "65536"], "--port", "from 0 to 65535"),
    (["serve", "--port", "nan"], "--port", "from 0 to 65535"),
    (["serve", "--port", "1e3"], "--port", "from 0 to 65535"),
    (["serve", "--ttl-minutes", "0"], "--ttl-minutes", "from 1 to 527040"),
    (["serve", "--ttl-minutes", "-10"], "--ttl-minutes", "from 1 to 527040"),
    (["serve", "--ttl-minutes", "inf"], "--ttl-minutes", "from 1 to 527040"),
    (["serve", "--ttl-minutes", "9" * 40], "--ttl-minutes", "from 1 to 527040"),
    (["channel", "register", "--workspace", ".", "--ttl-minutes", "1e9"], "--ttl-minutes",
     "from 1 to 527040"),
    (["channel", "renew", "--ttl-minutes", "99999999999"], "--ttl-minutes", "from 1 to"),
    (["access", "grant", "--ttl-minutes", "-1"], "--ttl-minutes", "from 1 to 527040"),
    (["status", "--port", "0"], "--port", "from 1 to 65535"),
    (["verify", "--port", "NaN"], "--port", "from 1 to 65535"),
    (["tunnel", "--port", "-80"], "--port", "from 1 to 65535"),
    (["doctor", "--port", "99999"], "--port", "from 1 to 65535"),
    (["jobs", "logs", "w", "--lines", "-5"], "--lines", "from 1 to 100000"),
])
def test_bad_numbers_on_the_command_line_are_one_line_errors(
        tmp_path: Path, argv: list, flag: str, allowed: str) -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), "--home", str(tmp_path / "home")]
                         + argv, capture_output=True, text=True, timeout=30, input="")
    assert out.returncode == 2, out.stderr
    assert len(out.stderr.splitlines()) == 1 and "Traceback" not in out.stderr, out.stderr
    assert flag in out.stderr and allowed in out.stderr
    assert not (tmp_path / "home" / "config.json").exists()  # nothing was done


def test_unknown_tool_in_profile_is_refused(tmp_path: Path) -> None:
    profile = tmp_path / "t.json"
    profile.write_text(json.dumps({"tools": ["read_file", "rm_everything"]}))
    out = subprocess.run([sys.executable, str(SCRIPT), "--home", str(tmp_path / "home"),
                          "stdio", "--root", str(tmp_path), "--profile", str(profile)],
                         capture_output=True, text=True, timeout=30, input="")
    assert out.returncode == 2 and "rm_everything" in out.stderr and "read_file" in out.stderr


def test_tools_key_narrows_the_list(tmp_path: Path) -> None:
    from pbtest import make_app, make_repo
    app = make_app(make_repo(tmp_path / "repo"), tmp_path / "home", "power",
                   tools=["read_file", "search"])
    assert list(app.dispatcher.tools) == ["read_file", "search"]


def test_pep723_dependencies_match_pyproject() -> None:
    text = SCRIPT.read_text()
    block = re.search(r"^# /// script\n(.*?)^# ///$", text, re.S | re.M)
    assert block, "patchbay.py lost its PEP 723 block"
    meta = tomllib.loads("\n".join(line[2:] for line in block.group(1).splitlines()))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # A script has no extras: its block installs the core dependencies plus the optional
    # ones (PyYAML, for .yaml profiles); an install from the clone takes them as extras.
    extras = sorted(d for deps in project.get("optional-dependencies", {}).values()
                    for d in deps)
    assert sorted(meta["dependencies"]) == sorted(project["dependencies"] + extras)
    assert "PyYAML>=6" not in project["dependencies"], "PyYAML is optional, an extra"
    assert meta["requires-python"] == project["requires-python"]
    assert project["scripts"]["patchbay"] == "patchbay:main"


def test_the_file_parses_on_old_pythons_up_to_the_guard() -> None:
    text = SCRIPT.read_text()
    assert "\nmatch " not in text and not re.search(r"^\s+case .*:$", text, re.M)
    head = text[: text.index("if sys.version_info < (3, 10)")]
    assert "from __future__ import annotations" in head
