"""At-least-once forwarding of the daemon's files to a central rsyslog over RELP (docs/forwarding.md)."""

from .checkpoint import Checkpoint, SegmentState
from .forwarder import Forwarder, ForwardOptions, options_from_config
from .relp import RelpClient, RelpError
from .rsyslog import central_config

__all__ = ["Checkpoint", "Forwarder", "ForwardOptions", "RelpClient", "RelpError", "SegmentState",
           "central_config", "options_from_config"]
