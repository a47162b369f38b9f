"""The Flower App's components: dpa's ServerApp (the SuperLink's side) and bridge (each SuperNode's)."""

from dpa.federation.deployment.bridge import app as client
from dpa.federation.deployment.server_app import app as server

__all__ = ["client", "server"]
