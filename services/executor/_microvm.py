"""The microVM backend's place behind the sandbox interface, and why it cannot run here.

A KVM micro-VM (QEMU ``microvm`` or Firecracker) gives hardware isolation. It
needs a usable ``/dev/kvm``, a VMM binary, and a guest kernel and root file
system that boot on it. The backend itself is not built yet: :func:`probe`
says which of those this host lacks, and :class:`MicrovmSandbox` refuses to
start with the same reason, so `auto` never picks it and a grant asking for
it fails with a clear message.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from devsilo.protocol import SandboxError

from ._sandbox import Sandbox
from ._spec import SandboxSpec


def probe(*, kernel: str | None = None, **_: Any) -> str | None:
    """Why a micro-VM cannot run here (it never can yet: the backend is not built)."""
    if not os.path.exists("/dev/kvm"):
        return "no /dev/kvm on this host"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not accessible to this user"
    if not (shutil.which("firecracker") or shutil.which("qemu-system-x86_64")):
        return "no VMM (firecracker or qemu-system-x86_64) installed"
    kernel = kernel or os.environ.get("DEVSILO_MICROVM_KERNEL")
    if not kernel or not os.path.exists(kernel):
        return "no guest kernel configured (DEVSILO_MICROVM_KERNEL); the microvm backend is not built yet"
    return "the microvm backend is not built yet"


class MicrovmSandbox(Sandbox):
    """Refuses to start, saying why (see the module docstring)."""

    backend = "microvm"

    def __init__(self, spec: SandboxSpec, **config: Any) -> None:
        self.spec = spec
        self._config = config

    async def start(self) -> None:
        """Raise SandboxError with the probe's reason."""
        raise SandboxError(f"microvm sandbox unavailable: {probe(**self._config)}")

    @property
    def helper(self) -> Any:
        """Never available."""
        raise SandboxError("microvm sandbox is not running")

    async def close(self) -> None:
        """Nothing was started."""
