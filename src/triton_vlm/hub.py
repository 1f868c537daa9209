"""Whether and where the Hugging Face Hub can be used: offline mode, its endpoint, a quick reachability probe."""

from __future__ import annotations

import os
import socket
import threading
import urllib.parse

from triton_vlm.config import parse_bool

#: Seconds the Hub may take to accept a connection before a load uses the local cache alone.
HUB_PROBE_TIMEOUT_S = 3.0


def hub_offline() -> bool:
    return any(parse_bool(os.environ.get(k, "0"), name=k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether the Hub (``HF_ENDPOINT``) accepts a TCP connection within ``timeout``.

    Without network, huggingface_hub retries every file with backoff (about 25 s each), so a first request
    would wait minutes for its error; after this probe fails the load reads the cache alone, at once. Behind a
    proxy a direct connection proves nothing, so there the answer is left to huggingface_hub."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urllib.parse.urlsplit(hub_endpoint())
    if not url.hostname:
        return True
    address = (url.hostname, url.port or (80 if url.scheme == "http" else 443))
    answered: list[bool] = []

    def connect() -> None:
        try:
            with socket.create_connection(address, timeout=timeout):
                answered.append(True)
        except OSError:
            answered.append(False)

    # On a thread: the name lookup itself has no timeout, and a broken resolver can take far longer than this.
    probe = threading.Thread(target=connect, name="triton-vlm-hub-probe", daemon=True)
    probe.start()
    probe.join(timeout)
    return bool(answered) and answered[0]


def hub_miss_reason() -> str:
    """Why hub weights were not found, for error messages: offline mode, or the Hub out of reach."""
    if hub_offline():
        return "offline mode (HF_HUB_OFFLINE=1) found no cached copy"
    return f"the Hugging Face Hub ({hub_endpoint()}) could not be reached and no cached copy was found"
