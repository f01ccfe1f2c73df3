"""ZeroMQ transport: socket factory, endpoint resolution, link emulation.

Pure of actor logic: ``actors/`` builds on these; nothing here knows about messages.
"""

from sft_actors.transport.endpoints import TRANSPORTS, Endpoints, Transport
from sft_actors.transport.link import LinkRate, PacedSender, Pacer, fitted_mbps
from sft_actors.transport.sockets import SocketOptions, bind_router, connect_dealer

__all__ = [
    "TRANSPORTS",
    "Endpoints",
    "LinkRate",
    "PacedSender",
    "Pacer",
    "SocketOptions",
    "Transport",
    "bind_router",
    "connect_dealer",
    "fitted_mbps",
]
