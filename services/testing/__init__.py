"""Test environments shipped with devsilo: a real NATS server, a whole stack."""

from ._nats import ErrorRecorder, free_port, init_state, running_nats
from ._stack import Stack, free_ports, pid_alive

__all__ = ["ErrorRecorder", "Stack", "free_port", "free_ports", "init_state", "pid_alive", "running_nats"]
