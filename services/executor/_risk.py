"""Which host paths no workspace or read allow-list may overlap (the risk list)."""

from __future__ import annotations

import os
from pathlib import Path

from devsilo.protocol import GrantError

# Host paths that hold credentials, keys or the system itself. Service state
# directories are added at run time (they hold keys, journals and tokens).
RISKY_HOME_ENTRIES = (
    ".ssh", ".gnupg", ".aws", ".azure", ".kube", ".docker", ".config", ".netrc",
    ".git-credentials", ".npmrc", ".pypirc", ".cargo/credentials", ".devsilo",
)
SYSTEM_PATHS = ("/", "/etc", "/usr", "/bin", "/sbin", "/lib", "/lib64", "/boot", "/dev",
                "/proc", "/sys", "/run", "/var", "/root", "/home")


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def check_workspace(path: str, state_dirs: list[Path], *, kind: str = "workspace") -> Path:
    """Resolve a workspace (or read allow-list) path; refuse it when it overlaps anything risky.

    Refused: relative paths, missing or non-directories, ``/`` and system
    directories themselves, a home directory itself, any path inside or around
    a state directory or a credential directory.
    """
    if not os.path.isabs(path):
        raise GrantError(f"{kind} {path!r} must be an absolute path")
    resolved = Path(path).resolve()
    if not (resolved.is_dir() if kind == "workspace" else resolved.exists()):
        raise GrantError(f"{kind} {resolved} does not exist" + (" or is not a directory" if kind == "workspace" else ""))
    if str(resolved) in SYSTEM_PATHS:
        raise GrantError(f"{kind} {resolved} is a system directory; use a project directory")
    home = Path(os.path.expanduser("~")).resolve()
    homes = {home, *(p for p in Path("/home").glob("*") if p.is_dir())}
    if resolved in homes:
        raise GrantError(f"{kind} {resolved} is a home directory; use a project directory inside it")
    risky = [s.resolve() for s in state_dirs] + [h / e for h in homes for e in RISKY_HOME_ENTRIES]
    for r in risky:
        if _overlaps(resolved, r):
            raise GrantError(f"{kind} {resolved} overlaps {r}, which is on the risk list")
    return resolved
