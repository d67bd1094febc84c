"""The operator's limits on the grants the gateway signs: pure rules, then through a real stack."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from devsilo.gateway._limits import LimitError, Limits, check_request
from devsilo.protocol import ConfigError, GrantError
from devsilo.testing import Stack

LIMITS = {
    "default": {"sandboxes": ["bwrap", "mock"], "allow_domains": ["*.example.org", "pypi.org"],
                "allow_read": ["/usr/share"], "credentials": [], "quota_usd": 5.0, "quota_tokens": 100_000},
    "users": {"alice": {"allow_domains": ["*"], "credentials": ["github"], "quota_usd": 50.0,
                        "max_sandboxes": 2, "llm": ["mock", "anthropic"]}},
}


def check(user: str = "bob", **kw: object) -> dict[str, object]:
    args: dict[str, object] = {"sandbox": "bwrap", "llm": "mock", "allow_domains": (), "allow_read": (),
                               "credentials": (), "quota_tokens": None, "quota_usd": None, "running": 0}
    args.update(kw)
    return check_request(Limits.from_options({"limits": LIMITS}).for_user(user), user=user, **args)  # type: ignore[arg-type]


def test_a_request_within_the_limits_gets_normalised_domains_and_the_quota_ceilings() -> None:
    got = check(allow_domains=("API.Example.org.", "*.docs.example.org", "pypi.org"),
                allow_read=("/usr/share/doc",))
    assert got["allow_domains"] == ("api.example.org", "pypi.org", "*.docs.example.org")
    assert got["quota_usd"] == 5.0 and got["quota_tokens"] == 100_000


@pytest.mark.parametrize(("kw", "words"), [
    ({"sandbox": "docker"}, "may not use the docker sandbox"),
    ({"allow_domains": ("evil.com",)}, "may not allow evil.com"),
    ({"allow_domains": ("*.org",)}, "may not allow *.org"),
    ({"allow_domains": ("files.pypi.org",)}, "may not allow files.pypi.org"),
    ({"allow_domains": ("*.pypi.org",)}, "may not allow *.pypi.org"),
    ({"allow_read": ("/usr/share/../../etc",)}, "may not allow reading /usr/share/../../etc"),
    ({"allow_read": ("/usr/shared",)}, "may not allow reading /usr/shared"),
    ({"allow_read": ("usr/share",)}, "may not allow reading usr/share"),
    ({"credentials": ("github",)}, "may not use the credential github"),
])
def test_a_request_beyond_a_limit_is_refused_naming_it(kw: dict[str, object], words: str) -> None:
    with pytest.raises(LimitError, match=words.replace("*", r"\*").replace(".", r"\.")):
        check(**kw)


def test_a_users_own_entry_overrides_the_default_field_by_field() -> None:
    got = check("alice", allow_domains=("anything.net",), credentials=("github",), quota_usd=80.0,
                quota_tokens=10)
    assert got["allow_domains"] == ("anything.net",)
    assert got["quota_usd"] == 50.0, "asked more than the ceiling: the ceiling"
    assert got["quota_tokens"] == 10, "asked less than the ceiling: what was asked"
    with pytest.raises(LimitError, match="may not use the docker sandbox"):
        check("alice", sandbox="docker")  # sandboxes come from the default
    with pytest.raises(LimitError, match="may not use the openai model backend"):
        check("alice", llm="openai")
    with pytest.raises(LimitError, match="may hold 2 sandboxes at once and holds 2"):
        check("alice", running=2)
    assert check("alice", running=1)


def test_no_limits_means_no_limit_at_this_layer_but_names_must_still_be_names() -> None:
    got = check_request(Limits.from_options({}).for_user("x"), user="x", sandbox="docker", llm="openai",
                        allow_domains=("a.b",), allow_read=("/",), credentials=("c",),
                        quota_tokens=None, quota_usd=None, running=99)
    assert got["quota_usd"] is None and got["allow_domains"] == ("a.b",)
    with pytest.raises(GrantError, match="allow_domains: not a host name"):
        check_request(Limits().default, user="x", sandbox="bwrap", llm=None, allow_domains=("a..b",),
                      allow_read=(), credentials=(), quota_tokens=None, quota_usd=None, running=0)


@pytest.mark.parametrize(("bad", "words"), [
    ({"default": {"sandboxes": ["kvm"]}}, "gateway option 'limits' is not valid"),
    ({"default": {"allow_domains": ["*.*.com"]}}, "limits for default: allow_domains"),
    ({"users": {"eve": {"allow_read": ["relative"]}}}, "limits for eve: allow_read entries must be absolute"),
    ({"default": {"quota_usd": -1}}, "gateway option 'limits' is not valid"),
    ({"nobody": {}}, "gateway option 'limits' is not valid"),
])
def test_bad_limits_are_a_config_error(bad: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError, match=words.replace("*", r"\*")):
        Limits.from_options({"limits": bad})


# -- through a real stack: the gateway refuses, and the sandbox gets only what was granted ------------


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("limited")
    stack = Stack(root / "state", services={"gateway": {"options": {"limits": LIMITS}}})
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


def silo(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "devsilo.cli", "--state-dir", str(stack.state_dir), *args],
                          capture_output=True, text=True, timeout=120)


def test_the_gateway_refuses_a_session_or_shell_beyond_the_limits(limited: Stack, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    r = silo(limited, "run", "--headless", "--workspace", str(ws), "--prompt", "x", "--script", "/dev/null",
             "--allow-domain", "evil.com")
    assert r.returncode != 0 and "may not allow evil.com" in r.stdout + r.stderr
    r = silo(limited, "run", "--headless", "--workspace", str(ws), "--prompt", "x", "--script", "/dev/null",
             "--sandbox", "gvisor")
    assert r.returncode != 0 and "may not use the gvisor sandbox" in r.stdout + r.stderr
    assert silo(limited, "workspace", "lock", str(ws)).returncode == 0
    try:
        r = silo(limited, "shell", "--workspace", str(ws), "--allow-domain", "evil.com", "--", "true")
        assert r.returncode != 0 and "may not allow evil.com" in r.stdout + r.stderr
    finally:
        assert silo(limited, "workspace", "unlock", str(ws), "--accept").returncode == 0


def test_an_accepted_session_runs_with_the_normalised_grant(limited: Stack, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    script = tmp_path / "s.json"
    script.write_text(json.dumps({"responses": [{"tool_calls": [{"name": "Exit", "input": {}}]}]}))
    r = silo(limited, "run", "--headless", "--workspace", str(ws), "--prompt", "x", "--script", str(script),
             "--allow-domain", "API.Example.org.", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    access = next(e["data"] for e in events if e["kind"] == "access_report")
    assert access["allowed_domains"] == ["api.example.org"]
