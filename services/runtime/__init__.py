"""What every devsilo service shares at run time: state, NATS, the signed bus, health."""

from ._bus import Bus
from ._health import HealthServer
from ._logging import configure_logging
from ._metrics import ServiceMetrics
from ._service import ServiceContext, run_service

__all__ = ["Bus", "HealthServer", "ServiceContext", "ServiceMetrics", "configure_logging", "run_service"]
