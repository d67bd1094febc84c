"""devsilo egress: the only way out to the network, and the only holder of credentials."""

from ._policy import PolicyTable, SessionPolicy
from ._service import serve

__all__ = ["PolicyTable", "SessionPolicy", "serve"]
