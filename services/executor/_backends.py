"""The sandbox backends by name: how to make one, and whether it works on this host.

Each backend module provides a ``Sandbox`` subclass taking a
:class:`~devsilo.executor._spec.SandboxSpec` and a ``probe() -> str | None``
that returns ``None`` when the backend works here, else a one-line reason.
Backend-specific settings (the docker runtime ``runc`` or ``runsc``, the
daemon's URL, the runsc path) are keyword arguments of both. Modules are
imported lazily so a host without, say, the docker SDK still
runs bwrap.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from devsilo.protocol import SandboxError

from ._sandbox import Sandbox
from ._spec import SandboxSpec

# Strongest first: `auto` picks the first that works.
STRENGTH_ORDER = ("microvm", "gvisor", "docker", "bwrap")


@dataclass(frozen=True)
class Backend:
    """One backend: where its code lives and how it is configured."""

    name: str
    module: str
    cls: str

    def _mod(self) -> Any:
        return importlib.import_module(self.module, package=__package__)

    def probe(self, **config: Any) -> str | None:
        """None when the backend works on this host, else why not (one line)."""
        try:
            probe: Callable[..., str | None] | None = getattr(self._mod(), "probe", None)
        except ImportError as exc:
            return f"not installed: {exc}"
        if probe is None:
            return f"{self.name} has no probe"
        return probe(**config)

    def create(self, spec: SandboxSpec, **config: Any) -> Sandbox:
        """A new, unstarted sandbox of this backend."""
        try:
            cls = getattr(self._mod(), self.cls)
        except ImportError as exc:
            raise SandboxError(f"sandbox backend {self.name} is not available: {exc}") from None
        sandbox: Sandbox = cls(spec, **config)
        return sandbox


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("bwrap", "._sandbox", "BwrapSandbox"),
        Backend("gvisor", "._gvisor", "GvisorSandbox"),
        Backend("docker", "._docker", "DockerSandbox"),
        Backend("microvm", "._microvm", "MicrovmSandbox"),
        Backend("mock", "._mock", "MockSandbox"),
    )
}


def get_backend(name: str) -> Backend:
    """The backend called ``name``; SandboxError naming the known ones otherwise."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise SandboxError(f"unknown sandbox backend {name!r}; known: {', '.join(BACKENDS)}") from None
