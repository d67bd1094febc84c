"""The auto-exec surfaces (REQUIREMENTS §3), as data, in this one place.

An auto-exec surface is a file some tool runs or obeys without the user
asking: a git hook, a direnv ``.envrc``, npm scripts, an editor's tasks, a
CI workflow. The unlock report flags every changed path that is one, first,
because an agent that edits one can run code on the user's machine the next
time the user opens, builds or commits the project.

Patterns are slash-separated, matched with :func:`fnmatch.fnmatchcase` one
path component at a time, at any depth. A pattern ending in ``/**`` matches
anything below the directory it names; any other pattern matches the last
components of the path.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import NamedTuple


class Surface(NamedTuple):
    """One auto-exec surface: a pattern and why it is dangerous."""

    pattern: str
    reason: str


_SHELL_RC = "a shell runs it when it starts"

AUTO_EXEC_SURFACES: tuple[Surface, ...] = (
    Surface(".git/hooks/**", "git runs hooks on commit, checkout, merge and push"),
    Surface(".git/config", "git config can set hooksPath, fsmonitor, pagers, filters and aliases"),
    Surface(".gitattributes", "gitattributes select filter and diff drivers that run commands"),
    Surface(".gitmodules", "submodule URLs and update commands are fetched and run by git"),
    Surface(".envrc", "direnv runs it when you enter the directory"),
    Surface(".direnv/**", "direnv loads it when you enter the directory"),
    Surface(".vscode/**", "VS Code runs its tasks, launch configs and settings-selected tools"),
    Surface(".idea/**", "JetBrains IDEs run its run configurations and tool settings"),
    Surface("*.code-workspace", "VS Code applies its settings and tasks when the workspace opens"),
    Surface(".devcontainer/**", "dev container tooling builds and runs its commands"),
    Surface("package.json", "npm and yarn run its scripts, including install lifecycle scripts"),
    Surface(".npmrc", "npm obeys it (registries, scripts, node options)"),
    Surface(".yarnrc*", "yarn obeys it (yarnPath runs an arbitrary script)"),
    Surface(".husky/**", "husky installs and runs these as git hooks"),
    Surface(".pre-commit-config.yaml", "pre-commit runs the hooks it names on commit"),
    Surface("Makefile", "make runs its recipes"),
    Surface("*.mk", "make includes it and runs its recipes"),
    Surface("setup.py", "pip and setuptools run it on install and build"),
    Surface("setup.cfg", "setuptools obeys it on install and build"),
    Surface("pyproject.toml", "pip runs the build backend and hooks it names"),
    Surface("conftest.py", "pytest imports and runs it"),
    Surface("*.pth", "Python runs its import lines at interpreter start"),
    Surface("tox.ini", "tox runs its commands"),
    Surface("noxfile.py", "nox runs it"),
    Surface("build.rs", "cargo runs it on every build"),
    Surface(".cargo/config*", "cargo obeys it (runners, rustc wrappers, aliases)"),
    Surface(".github/workflows/**", "GitHub Actions runs its workflows on push"),
    Surface(".gitlab-ci.yml", "GitLab CI runs its jobs on push"),
    Surface("Dockerfile", "docker build runs its RUN steps"),
    Surface("docker-compose*", "docker compose builds and runs the services it names"),
    Surface(".bashrc", _SHELL_RC),
    Surface(".bash_profile", _SHELL_RC),
    Surface(".bash_login", _SHELL_RC),
    Surface(".bash_logout", "bash runs it when a login shell exits"),
    Surface(".profile", _SHELL_RC),
    Surface(".zshrc", _SHELL_RC),
    Surface(".zshenv", _SHELL_RC),
    Surface(".zprofile", _SHELL_RC),
    Surface(".zlogin", _SHELL_RC),
    Surface(".zlogout", "zsh runs it when a login shell exits"),
    Surface(".kshrc", _SHELL_RC),
    Surface(".cshrc", _SHELL_RC),
    Surface(".tcshrc", _SHELL_RC),
    Surface("config.fish", _SHELL_RC),
)
"""Every auto-exec surface. Add new ones here and nowhere else."""

NOT_AUTO_EXEC: tuple[str, ...] = (".editorconfig",)
"""Names that look like tool config but only set formatting; listed so the choice is visible."""


def _matches(parts: list[str], pattern: str) -> bool:
    pat = pattern.split("/")
    if pat[-1] == "**":
        # Anything strictly below the named directory, wherever that directory is.
        prefix = pat[:-1]
        for i in range(len(parts) - len(prefix)):
            if all(fnmatchcase(parts[i + j], p) for j, p in enumerate(prefix)):
                return True
        return False
    if len(parts) < len(pat):
        return False
    return all(fnmatchcase(a, p) for a, p in zip(parts[-len(pat):], pat, strict=True))


def auto_exec_reason(relpath: str) -> str | None:
    """Why ``relpath`` (relative to the workspace, ``/``-separated) is an auto-exec surface, or None."""
    parts = [p for p in relpath.split("/") if p not in ("", ".")]
    if not parts or parts[-1] in NOT_AUTO_EXEC:
        return None
    for surface in AUTO_EXEC_SURFACES:
        if _matches(parts, surface.pattern):
            return surface.reason
    return None
