"""The server's other addresses, from the one a command was given: metrics and gRPC beside HTTP.

Triton has no API that tells its metrics or gRPC port, so they are derived only where ``--url`` uses Triton's
default ports (HTTP 8000, gRPC 8001; metrics then on 8002). A server on other ports may have its metrics
anywhere: guessing would show another server's numbers, so the flag is required there.
"""

from __future__ import annotations

from dataclasses import dataclass

HTTP_PORT, GRPC_PORT, METRICS_PORT = 8000, 8001, 8002


@dataclass(frozen=True)
class Address:
    """An address and where it came from; ``url`` is None when it cannot be known (``source`` says why)."""

    url: str | None
    source: str


def split_url(url: str) -> tuple[str, int | None]:
    """``(host, port)`` of ``host:port``, ``http://host:port/...`` or ``grpc://host:port``; port None if absent."""
    rest = url.split("://", 1)[-1].split("/", 1)[0]
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or host.endswith(":"):  # no port (an IPv6 literal alone ends in ':')
        return rest, None
    return host, int(port)


def metrics_address(url: str, explicit: str | None, *, flag: str = "--metrics-url") -> Address:
    """Where the metrics of the server at ``url`` are: ``explicit`` if given, else port 8002 of its host when
    ``url`` uses Triton's default HTTP or gRPC port, else unknown."""
    if explicit:
        return Address(explicit, f"from {flag}")
    host, port = split_url(url)
    if port in (None, HTTP_PORT, GRPC_PORT):
        return Address(f"http://{host}:{METRICS_PORT}/metrics",
                       f"derived from {url}: Triton's default metrics port; pass {flag} if it differs")
    return Address(None, f"not read: {url} is not on Triton's default ports ({HTTP_PORT}/{GRPC_PORT}), so its "
                         f"metrics port is unknown; pass {flag} http://{host}:PORT/metrics")


def grpc_address(http_url: str, explicit: str | None, *, flag: str = "--grpc-url") -> Address:
    """The gRPC address of the server whose HTTP address is ``http_url``: ``explicit``, else port 8001 of its
    host where ``http_url`` is on port 8000, else unknown."""
    if explicit:
        return Address(explicit, f"from {flag}")
    host, port = split_url(http_url)
    if port in (None, HTTP_PORT):
        return Address(f"{host}:{GRPC_PORT}", f"derived from {http_url}: Triton's default gRPC port")
    return Address(None, f"{http_url} is not on Triton's default HTTP port ({HTTP_PORT}), so its gRPC port is "
                         f"unknown; pass {flag} {host}:PORT")
