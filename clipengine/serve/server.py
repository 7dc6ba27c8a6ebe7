"""Running the service: bind, announce, serve until stopped, withdraw.

Safe by default: it binds 127.0.0.1. Binding anything else exposes the photos to the network, so it needs
a token (checked on every API call and the page), and it says so. The socket is bound before the
service is announced, so the URL in <index>/service.json is the real one (port 0 picks a free port).
"""

from __future__ import annotations

import ipaddress
import signal
import socket
import threading
from collections.abc import Callable

from clipengine.errors import BadInput
from clipengine.index.service import announce, withdraw
from clipengine.serve.app import create_app
from clipengine.serve.state import ServiceConfig


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise BadInput(f"cannot bind {host}: {e.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # inherited by every accepted connection: a response's headers and body leave at once instead of the body
    # waiting for the client's delayed ACK (40 ms per query, measured by benchmarks/bench_serve.py)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise BadInput(f"cannot listen on {host}:{port}: {e.strerror} (another service? try --port 0)") from None
    sock.listen(128)
    return sock


def serve(config: ServiceConfig, host: str = "127.0.0.1", port: int = 8000,
          on_ready: Callable[[str, list[str]], None] | None = None) -> None:
    """Serve until interrupted. `on_ready(url, warnings)` is called once the socket listens and the indexes
    are open."""
    import uvicorn

    warnings = []
    if not is_loopback(host):
        if not config.token:
            raise BadInput(f"--host {host} makes the indexes reachable from the network: add --token SECRET "
                           "(clients then send 'Authorization: Bearer SECRET')")
        warnings.append(f"listening on {host}: anyone who can reach this machine and knows the token can "
                        "search these indexes and read their images")
    app = create_app(config)
    sock = bind(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = "127.0.0.1" if bound_host in ("0.0.0.0", "::") else bound_host
    url = f"http://{'[' + shown + ']' if ':' in shown else shown}:{bound_port}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5))
    announce(config.indexes, url, config.token)
    # uvicorn re-raises the signal that stopped it once it has shut down; SIGTERM's default action would then end
    # the process before the announcement is withdrawn, so SIGTERM leaves the way Ctrl-C does, through `finally`
    previous = signal.signal(signal.SIGTERM, _exit_quietly) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        if on_ready:
            on_ready(url, warnings)
        server.run(sockets=[sock])
    finally:
        withdraw(config.indexes)
        sock.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _exit_quietly(signum: int, frame: object) -> None:
    raise SystemExit(0)
