"""The helper's file, search and fetch ops, through a real bwrap sandbox.

Every op is driven through :class:`HelperClient` into a real sandbox, good
inputs and hostile ones alike (path traversal, NUL bytes, lone surrogates,
huge and pathological patterns, binary files, symlinks out of the
workspace). As root the sandbox runs as the unused uid 64123; otherwise as
the current user.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import socket
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from devsilo.executor import _spec
from devsilo.executor._helper_client import HelperClient, HelperRequestError
from devsilo.executor._sandbox import BwrapSandbox, prepare_workspace_ownership
from devsilo.executor._spec import SandboxSpec, sandbox_env
from devsilo.executor.helper import helper as helper_module
from devsilo.protocol import SandboxError

AS_ROOT = os.geteuid() == 0
SANDBOX_UID = 64123 if AS_ROOT else os.getuid()
SANDBOX_GID = 64123 if AS_ROOT else os.getgid()


def make_bwrap(
    workspace: Path,
    scratch_root: Path,
    *,
    relay_socket: Path | None = None,
    env: dict[str, str] | None = None,
) -> BwrapSandbox:
    """A bwrap sandbox from a SandboxSpec, or from the older keyword constructor."""
    spec = SandboxSpec(
        session_id="helper-ops",
        workspace=workspace,
        sandbox_uid=SANDBOX_UID,
        sandbox_gid=SANDBOX_GID,
        scratch_root=scratch_root,
        env=env or {},
        relay_socket=relay_socket,
    )
    # Any: the keyword constructor below is the backend's older signature.
    factory: Any = BwrapSandbox
    if "spec" in inspect.signature(BwrapSandbox).parameters:
        return factory(spec)  # type: ignore[no-any-return]
    if relay_socket is not None:
        pytest.skip("this bwrap backend does not bind spec.relay_socket yet")
    return factory(  # type: ignore[no-any-return]
        workspace,
        sandbox_uid=SANDBOX_UID,
        sandbox_gid=SANDBOX_GID,
        scratch_root=scratch_root,
        env=sandbox_env(spec),
    )


def put(path: Path, content: str | bytes) -> None:
    """Create a file in the workspace as the sandbox uid would own it."""
    if isinstance(content, str):
        path.write_text(content)
    else:
        path.write_bytes(content)
    if AS_ROOT:
        os.chown(path, SANDBOX_UID, SANDBOX_GID)


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A workspace with a small tree in it, writable by the sandbox uid."""
    ws = tmp_path / "ws"
    (ws / "src" / "deep").mkdir(parents=True)
    (ws / ".hidden").mkdir()
    (ws / "README").write_text("the user's project\nSecond line\n")
    (ws / "src" / "app.py").write_text("import os\n\ndef main():\n    return os.getcwd()\n")
    (ws / "src" / "deep" / "util.py").write_text("def helper():\n    return 'MAIN'\n")
    (ws / "src" / "notes.txt").write_text("main ideas\n")
    (ws / ".hidden" / "secret.py").write_text("main = 1\n")
    (ws / "blob.bin").write_bytes(b"\x7fELF\x00\x01main\x00" * 100)
    if AS_ROOT:
        prepare_workspace_ownership(ws, SANDBOX_UID, SANDBOX_GID)
    return ws


@pytest_asyncio.fixture
async def helper(workspace: Path, tmp_path: Path) -> AsyncIterator[HelperClient]:
    """The helper client of a started sandbox on ``workspace``."""
    sb = make_bwrap(workspace, tmp_path / "scratch")
    await sb.start()
    try:
        yield sb.helper
    finally:
        await sb.close()


async def _code(call: object) -> str:
    """The helper's error code for an awaitable that must fail."""
    assert inspect.isawaitable(call)
    with pytest.raises(HelperRequestError) as info:
        await call
    return info.value.code


def test_helper_constants_match_the_spec() -> None:
    # The helper cannot import the executor's modules; this keeps the two in step.
    assert helper_module.PROXY_PORT == _spec.PROXY_PORT
    assert helper_module.RELAY_SOCKET == _spec.RELAY_SOCKET
    assert helper_module.CA_CERT == _spec.CA_CERT
    assert helper_module.DNS_PORT == _spec.PROXY_PORT + 1


async def test_hello_reports_the_proxy_and_resolver(helper: HelperClient) -> None:
    info = await helper.hello()
    assert info.proxy_port == _spec.PROXY_PORT
    assert helper_module.DNS_PORT in info.dns_ports
    assert info.egress_relay is False


# -- start-up: the core answers at once, the rest is served once it loads -----


@pytest.fixture
def raw_helper_client(tmp_path: Path) -> Iterator[tuple[HelperClient, Path]]:
    """A client of the helper script run directly (no sandbox), on a fresh workspace.

    Nothing is asked before the test's own first requests, so they reach the
    helper while it is still importing what its core does without.
    """
    ws = tmp_path / "raw-ws"
    ws.mkdir()
    (ws / "seed.txt").write_text("the seed\n")
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", helper_module.__file__, "--fd", str(theirs.fileno()),
         "--workspace", str(ws)],
        pass_fds=(theirs.fileno(),),
    )
    theirs.close()
    try:
        yield HelperClient(ours), ws
    finally:
        ours.close()
        try:
            proc.wait(10)
        finally:
            if proc.returncode is None:
                proc.kill()
                proc.wait()


def test_the_core_speaks_json_as_the_json_package_does() -> None:
    # The core parses and writes JSON with _json's C scanner and encoder (the
    # json package costs a start-up its imports); on this Python they must be
    # in use, and agree with json.loads / json.dumps.
    assert helper_module._fast_scan is not None and helper_module._fast_encode is not None
    lines = [
        b'{"id": 1, "op": "exec", "command": "printf \'\\u00e9\'", "env": {"A": "b"}}',
        '{"id":2,"op":"write","content":"\u00e9\U0001f600 \\ud800"}'.encode(),
        b'{"id": 3, "n": -1.5e3, "x": [true, false, null, NaN, Infinity]}  \r',
    ]
    for line in lines:
        assert repr(helper_module._loads(line)) == repr(json.loads(line))
    for bad in (b'{"id": 1,}', b'{"id": 1} x', b"{\xff}", b"[1]", b'{"a": "\\ud800"}\x00'):
        try:
            expected: Any = json.loads(bad)
        except ValueError as exc:
            with pytest.raises(type(exc)) as info:
                helper_module._loads(bad)
            assert str(info.value) == str(exc)
        else:
            assert helper_module._loads(bad) == expected
    answer = {"id": 1, "ok": True, "stdout": "é\n\t\"\x00", "n": [1.5, None, False]}
    assert helper_module._dumps(answer) == (
        json.dumps(answer, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
    )


async def test_requests_sent_during_start_up_are_all_answered(
    raw_helper_client: tuple[HelperClient, Path],
) -> None:
    client, ws = raw_helper_client
    await client.start()
    try:
        # All at once, before any answer: hello and exec are the core's, the
        # others wait for the rest (asyncio) and must all be served, none refused.
        writes = [client.write(f"out/f{i}.txt", f"file {i}\n") for i in range(20)]
        results = await asyncio.wait_for(
            asyncio.gather(
                client.hello(),
                client.read("seed.txt"),
                *writes,
                client.exec("echo from exec"),
                client.glob("*.txt"),
                client.grep("seed"),
                client.list_dir("."),
            ),
            30,
        )
        assert results[0].workspace == str(ws)
        assert results[1].content == b"the seed\n"
        assert results[2:22] == [len(f"file {i}\n") for i in range(20)]
        assert results[22].stdout == "from exec\n" and results[22].exit_code == 0
        assert [Path(m).name for m in results[23].matches] == ["seed.txt"]
        assert [m.text for m in results[24].matches] == ["the seed"]
        assert "out" in [e.name for e in results[25].entries]
        for i in range(20):
            assert (ws / "out" / f"f{i}.txt").read_text() == f"file {i}\n"
        # Requests are served concurrently (file ops on threads): each append lands once.
        appends = [client.write("log.txt", f"{i}\n", append=True) for i in range(30)]
        await asyncio.wait_for(asyncio.gather(*appends), 30)
        assert sorted((ws / "log.txt").read_text().split()) == sorted(str(i) for i in range(30))
        await client.shutdown()
    finally:
        await client.close()


async def test_an_exec_cancelled_at_once_is_found_and_cancelled(
    raw_helper_client: tuple[HelperClient, Path],
) -> None:
    client, _ = raw_helper_client
    await client.start()
    try:
        handle = await client.start_exec("sleep 30", timeout_ms=60_000)
        assert await asyncio.wait_for(handle.cancel(), 10) is True
        result = await asyncio.wait_for(handle.result(), 10)
        assert result.cancelled and not result.timed_out and result.exit_code == 137
        await client.shutdown()
    finally:
        await client.close()


# -- edit -------------------------------------------------------------------


async def test_edit_replaces_a_unique_match_in_place(helper: HelperClient, workspace: Path) -> None:
    script = workspace / "src" / "app.py"
    script.chmod(0o751)
    inode = script.stat().st_ino
    result = await helper.edit("src/app.py", "return os.getcwd()", "return os.getpid()")
    assert (result.replacements, result.first_line) == (1, 4)
    assert script.read_text() == "import os\n\ndef main():\n    return os.getpid()\n"
    assert result.size == script.stat().st_size
    # In place: same inode, same mode.
    assert (script.stat().st_ino, stat.S_IMODE(script.stat().st_mode)) == (inode, 0o751)


async def test_edit_refuses_ambiguous_and_missing_text(
    helper: HelperClient, workspace: Path
) -> None:
    put(workspace / "twice.txt", "x = 1\ny = 2\nx = 1\n")
    with pytest.raises(HelperRequestError) as info:
        await helper.edit("twice.txt", "x = 1", "x = 3")
    assert info.value.code == "multiple_matches"
    assert "2 times" in info.value.message and "lines 1, 3" in info.value.message
    assert await _code(helper.edit("twice.txt", "z = 9", "z = 0")) == "no_match"
    assert (workspace / "twice.txt").read_text() == "x = 1\ny = 2\nx = 1\n"


async def test_edit_replace_all_changes_every_match(helper: HelperClient, workspace: Path) -> None:
    put(workspace / "twice.txt", "x = 1\ny = 2\nx = 1\n")
    result = await helper.edit("twice.txt", "x = 1", "x = 3", replace_all=True)
    assert result.replacements == 2
    assert (workspace / "twice.txt").read_text() == "x = 3\ny = 2\nx = 3\n"


async def test_edit_keeps_the_other_bytes_of_a_binary_file(
    helper: HelperClient, workspace: Path
) -> None:
    data = b"\xff\x00header\x00\xfe VERSION=1 \x80\x81"
    put(workspace / "mixed.bin", data)
    await helper.edit("mixed.bin", "VERSION=1", "VERSION=2")
    assert (workspace / "mixed.bin").read_bytes() == data.replace(b"VERSION=1", b"VERSION=2")


async def test_edit_explains_crlf_mismatches(helper: HelperClient, workspace: Path) -> None:
    put(workspace / "dos.txt", b"one\r\ntwo\r\n")
    with pytest.raises(HelperRequestError) as info:
        await helper.edit("dos.txt", "one\ntwo", "1\n2")
    assert info.value.code == "no_match" and "CRLF" in info.value.message


async def test_edit_hostile_inputs_get_clear_errors(helper: HelperClient) -> None:
    await helper.exec("mkfifo pipe")
    assert await _code(helper.edit("README", "", "x")) == "bad_request"
    assert await _code(helper.edit("README", "same", "same")) == "bad_request"
    assert await _code(helper.edit("READ\0ME", "a", "b")) == "bad_request"
    assert await _code(helper.edit("README", "\ud800", "b")) == "bad_request"
    assert await _code(helper.edit("src", "a", "b")) == "is_directory"
    assert await _code(helper.edit("nope.txt", "a", "b")) == "not_found"
    assert await _code(helper.edit("pipe", "a", "b")) == "not_regular"
    # Traversal leads only to what the sandbox has: no host /etc/shadow here,
    # and the sandbox's own /etc is read-only.
    assert await _code(helper.edit("../../../../../etc/shadow", "a", "b")) == "not_found"
    assert await _code(helper.edit("/etc/passwd", "silo", "root")) == "io_error"
    assert (await helper.hello()).uid == _spec.INNER_UID, "the helper kept serving"


async def test_edit_refuses_files_over_the_limit(helper: HelperClient) -> None:
    await helper.exec(f"head -c {helper_module.EDIT_MAX + 1} /dev/zero > big")
    assert await _code(helper.edit("big", "\0", "x")) == "too_large"


# -- list -------------------------------------------------------------------


async def test_list_describes_entries_without_following_symlinks(
    helper: HelperClient, workspace: Path
) -> None:
    await helper.exec(
        "chmod 640 README && ln -s /etc/passwd etc-link && ln -s ../../../.. up && mkfifo fifo"
    )
    listing = await helper.list_dir(".")
    by_name = {e.name: e for e in listing.entries}
    assert [e.name for e in listing.entries] == sorted(by_name)
    assert listing.path == _spec.WORKSPACE and not listing.truncated
    readme = by_name["README"]
    assert (readme.type, readme.size, readme.mode) == ("file", 31, 0o640)
    assert by_name["src"].type == "dir"
    assert by_name["fifo"].type == "fifo"
    link = by_name["etc-link"]
    # The link itself, not /etc/passwd: its size is its target's length.
    assert (link.type, link.target, link.size) == ("symlink", "/etc/passwd", len("/etc/passwd"))
    assert (by_name["up"].type, by_name["up"].target) == ("symlink", "../../../..")


async def test_list_limit_truncates(helper: HelperClient) -> None:
    await helper.exec("mkdir many && cd many && for i in $(seq 1 30); do : > f$i; done")
    listing = await helper.list_dir("many", limit=10)
    assert len(listing.entries) == 10 and listing.total == 30 and listing.truncated
    assert listing.entries[0].name == "f1"


async def test_list_errors_and_traversal(helper: HelperClient) -> None:
    assert await _code(helper.list_dir("missing")) == "not_found"
    assert await _code(helper.list_dir("README")) == "not_a_directory"
    assert await _code(helper.list_dir("sr\0c")) == "bad_request"
    # Climbing out of the workspace reaches only the sandbox's own root.
    assert await _code(helper.list_dir("../../../../root")) == "not_found"
    root = {e.name for e in (await helper.list_dir("../../../..")).entries}
    assert {"workspace", "usr", "proc"} <= root
    assert not root & {"root", "work"}, root  # the host's own, never the sandbox's


async def test_list_shows_undecodable_names(helper: HelperClient, workspace: Path) -> None:
    (workspace / os.fsdecode(b"caf\xe9")).write_text("x")
    names = [e.name for e in (await helper.list_dir(".")).entries]
    assert "caf\ufffd" in names


# -- glob -------------------------------------------------------------------


async def test_glob_matches_recursively_skipping_hidden_and_symlinked_dirs(
    helper: HelperClient,
) -> None:
    await helper.exec("ln -s / rootlink && ln -s . loop && ln -s src/app.py app-link.py")
    result = await helper.glob("**/*.py")
    ws = _spec.WORKSPACE
    assert result.matches == (
        f"{ws}/app-link.py",
        f"{ws}/src/app.py",
        f"{ws}/src/deep/util.py",
    )
    assert not result.truncated and result.base == ws
    assert (await helper.glob(".hidden/*.py")).matches == (f"{ws}/.hidden/secret.py",)
    assert (await helper.glob("src/*.{py,txt}")).matches == (
        f"{ws}/src/app.py",
        f"{ws}/src/notes.txt",
    )
    assert (await helper.glob("*.py", path="src/deep")).matches == (f"{ws}/src/deep/util.py",)


async def test_glob_limit_truncates(helper: HelperClient) -> None:
    await helper.exec("mkdir many && cd many && for i in $(seq 10 49); do : > f$i.log; done")
    result = await helper.glob("many/*.log", limit=5)
    assert result.truncated and len(result.matches) == 5
    assert result.matches[0].endswith("/many/f10.log")


async def test_glob_hostile_patterns(helper: HelperClient) -> None:
    assert await _code(helper.glob("*" * (helper_module.PATTERN_MAX + 1))) == "bad_request"
    assert await _code(helper.glob("src/\0*.py")) == "bad_request"
    assert await _code(helper.glob("{a,b}" * 7)) == "bad_request"  # 128 patterns
    assert await _code(helper.glob("*", path="README")) == "not_a_directory"
    # A pathological pattern stays quick: fnmatch compiles to a linear regex.
    many_stars = "*a" * 1500 + "*"
    assert (await asyncio.wait_for(helper.glob(many_stars), 10)).matches == ()
    # Traversal sees the sandbox's /etc, never the host's secrets.
    etc = {os.path.basename(p) for p in (await helper.glob("../../../../etc/*")).matches}
    assert "passwd" in etc and "shadow" not in etc
    assert (await helper.glob("/root/*")).matches == ()


# -- grep -------------------------------------------------------------------


async def test_grep_finds_lines_with_numbers(helper: HelperClient) -> None:
    ws = _spec.WORKSPACE
    result = await helper.grep(r"def \w+\(")
    assert [(m.path, m.line, m.text) for m in result.matches] == [
        (f"{ws}/src/app.py", 3, "def main():"),
        (f"{ws}/src/deep/util.py", 1, "def helper():"),
    ]
    assert not result.truncated
    folded = await helper.grep("main", case_insensitive=True, glob="*.{py,txt}")
    assert {(os.path.basename(m.path), m.line) for m in folded.matches} == {
        ("app.py", 3),
        ("util.py", 2),
        ("notes.txt", 1),
        ("secret.py", 1),
    }
    one_file = await helper.grep("^Second", path="README")
    assert [(m.path, m.line) for m in one_file.matches] == [(f"{ws}/README", 2)]


async def test_grep_skips_binary_files(helper: HelperClient) -> None:
    result = await helper.grep("main")
    assert all(not m.path.endswith("blob.bin") for m in result.matches)
    assert result.binary_skipped == 1


async def test_grep_max_results_truncates(helper: HelperClient) -> None:
    await helper.exec("seq 1 100 > numbers")
    result = await helper.grep("^[0-9]+$", path="numbers", max_results=7)
    assert result.truncated and [m.line for m in result.matches] == list(range(1, 8))


async def test_grep_long_lines_are_cut(helper: HelperClient) -> None:
    await helper.exec("printf 'x%.0s' $(seq 1 5000) > long; echo needle >> long")
    result = await helper.grep("x+needle|needle", path="long")
    assert len(result.matches[0].text) == helper_module.GREP_LINE_MAX


async def test_grep_does_not_follow_symlinks_out(helper: HelperClient) -> None:
    await helper.exec("ln -s /etc etc-link && ln -s /etc/passwd passwd-link")
    result = await helper.grep("silo")
    assert not any("link" in m.path for m in result.matches)


async def test_grep_bad_inputs_get_clear_errors(helper: HelperClient) -> None:
    assert await _code(helper.grep("(unclosed")) == "bad_pattern"
    assert await _code(helper.grep("a" * (helper_module.REGEX_MAX + 1))) == "bad_request"
    assert await _code(helper.grep("x", glob="*.p\0y")) == "bad_request"
    assert await _code(helper.grep("x", path="no/such/dir")) == "not_found"
    assert await _code(helper.grep("x", path="\0")) == "bad_request"


async def test_a_catastrophic_regex_times_out_and_the_helper_keeps_serving(
    helper: HelperClient,
) -> None:
    await helper.exec("printf 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa!\\n' > evil")
    loop = asyncio.get_running_loop()
    started = loop.time()
    search = asyncio.create_task(helper.grep("^(a+)+$", path="evil", timeout_ms=1500))
    await asyncio.sleep(0.3)
    # While the worker grinds, the helper answers other requests at once.
    assert (await helper.exec("echo alive")).stdout == "alive\n"
    assert not search.done()
    with pytest.raises(HelperRequestError) as info:
        await search
    assert info.value.code == "timeout"
    assert loop.time() - started < 6
    # The worker is gone ("[-]" keeps this grep from finding itself).
    ps = await helper.exec("grep -l 'grep[-]worker' /proc/[0-9]*/cmdline 2>/dev/null | wc -l")
    assert ps.stdout.strip() == "0"


# -- fetch ------------------------------------------------------------------


async def test_fetch_without_egress_returns_the_blocked_answer(helper: HelperClient) -> None:
    for url in ("http://example.test/x", "https://example.test/x"):
        result = await helper.fetch(url)
        assert result.status == 502, url
        assert result.blocked == helper_module.NO_EGRESS
        assert result.text == f"blocked: {helper_module.NO_EGRESS}\n"
        assert result.redirects == ()


async def test_fetch_refuses_what_it_cannot_send(helper: HelperClient) -> None:
    assert await _code(helper.fetch("ftp://example.test/x")) == "bad_request"
    assert await _code(helper.fetch("file:///etc/passwd")) == "bad_request"
    assert await _code(helper.fetch("http://user:pw@example.test/")) == "bad_request"
    assert await _code(helper.fetch("http:///nohost")) == "bad_request"
    assert await _code(helper.fetch("http://example.test/a b")) == "bad_request"
    assert await _code(helper.fetch("http://example.test:99999/")) == "bad_request"
    bad_header = helper.fetch("http://example.test/", headers={"X-A": "1\r\nEvil: 2"})
    assert await _code(bad_header) == "bad_request"


# -- a hostile helper -------------------------------------------------------


async def test_an_answer_bigger_than_asked_breaks_the_connection() -> None:
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    client = HelperClient(ours)
    await client.start()
    loop = asyncio.get_running_loop()
    try:
        task = asyncio.create_task(client.glob("*", limit=2))
        request = json.loads((await loop.sock_recv(theirs, 65536)).splitlines()[0])
        answer = {"id": request["id"], "ok": True, "base": "/", "matches": ["/a", "/b", "/c"]}
        answer["truncated"] = False
        await loop.sock_sendall(theirs, json.dumps(answer).encode() + b"\n")
        with pytest.raises(SandboxError, match="more than the 2 asked"):
            await asyncio.wait_for(task, 5)
        assert client.closed
    finally:
        with contextlib.suppress(OSError):
            theirs.close()
        await client.close()
