"""The risk list: no workspace or read allow-list path may expose the host's secrets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from devsilo.executor._risk import check_workspace
from devsilo.protocol import GrantError


def test_a_project_directory_is_accepted(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    assert check_workspace(str(ws), [tmp_path / "state"]) == ws.resolve()


@pytest.mark.parametrize("path", ["/", "/etc", "/usr", "/proc", "/root", "/home"])
def test_system_directories_are_refused(path: str) -> None:
    with pytest.raises(GrantError, match="system directory|home directory"):
        check_workspace(path, [])


def test_the_home_directory_itself_is_refused() -> None:
    with pytest.raises(GrantError):
        check_workspace(os.path.expanduser("~"), [])


def test_relative_paths_are_refused() -> None:
    with pytest.raises(GrantError, match="absolute"):
        check_workspace("work/project", [])


@pytest.mark.parametrize("inside", ["", "keys", "../"])
def test_anything_overlapping_a_state_directory_is_refused(tmp_path: Path, inside: str) -> None:
    state = tmp_path / "proj" / "state"
    (state / "keys").mkdir(parents=True)
    target = (state / inside).resolve()
    with pytest.raises(GrantError, match="risk list"):
        check_workspace(str(target), [state])


def test_a_symlink_to_the_state_directory_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    link = tmp_path / "innocent"
    link.symlink_to(state)
    with pytest.raises(GrantError, match="risk list"):
        check_workspace(str(link), [state])


def test_credential_directories_are_refused_for_the_read_allow_list(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    ssh = tmp_path / "home" / ".ssh"
    ssh.mkdir(parents=True)
    with pytest.raises(GrantError, match="risk list"):
        check_workspace(str(ssh), [], kind="read allow-list path")


def test_a_missing_allow_list_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(GrantError, match="does not exist"):
        check_workspace(str(tmp_path / "nope"), [], kind="read allow-list path")
