"""Settings of the OpenAI-compatible front, and where its API keys come from. Dependency-free."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from triton_vlm.errors import TritonVLMError

MiB = 1024 * 1024
#: Environment variable holding API keys (one, or several separated by commas).
API_KEY_ENV = "TRITON_VLM_API_KEY"
API_KEY_FILE_ENV = "TRITON_VLM_API_KEY_FILE"


class OpenAIConfigError(TritonVLMError):
    """The front cannot start with these settings; the message says which one is wrong."""


@dataclass(frozen=True)
class OpenAIOptions:
    """Where the front listens, where Triton is, and what it lets through."""

    port: int = 9000
    host: str = "127.0.0.1"
    #: Triton's gRPC endpoint, ``host:port``.
    triton_grpc_url: str = "127.0.0.1:8001"
    #: Empty: no authentication. Never printed (``repr=False``); compared in constant time.
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    #: Origins allowed by CORS; empty: no CORS headers at all. ``*`` allows any origin.
    cors_origins: tuple[str, ...] = ()
    #: Fetch ``http(s)://`` image URLs (off: only ``data:`` URIs).
    allow_remote_images: bool = False
    #: With remote images: also fetch from loopback, private, link-local and other non-public addresses.
    allow_private_image_hosts: bool = False
    max_body_bytes: int = 32 * MiB
    max_image_bytes: int = 20 * MiB
    remote_image_timeout_s: float = 10.0
    #: Requests in flight (streams count until they end); one more is answered 429.
    max_concurrent_requests: int = 256
    #: The same, for each API key alone (0: no per-key bound), so one client cannot take every slot.
    max_concurrent_per_key: int = 0
    #: Longest a request may take in Triton, streams included; then 504.
    request_timeout_s: float = 600.0
    log_level: str = "warning"
    #: Serve the browser playground at ``/playground`` (a static page; its data calls need the API key).
    playground: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise OpenAIConfigError(f"OpenAI port must be in 1..65535, got {self.port}")
        for name in ("max_body_bytes", "max_image_bytes", "max_concurrent_requests"):
            if getattr(self, name) < 1:
                raise OpenAIConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_concurrent_per_key < 0:
            raise OpenAIConfigError(f"max_concurrent_per_key must be 0 (no bound) or more, got "
                                    f"{self.max_concurrent_per_key}")
        for name in ("remote_image_timeout_s", "request_timeout_s"):
            if not getattr(self, name) > 0:
                raise OpenAIConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for key in self.api_keys:
            _check_key(key, "an API key")

    @property
    def client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    @property
    def base_url(self) -> str:
        """What OpenAI clients take as ``base_url``."""
        return f"http://{self.client_host}:{self.port}/v1"


def _check_key(key: str, where: str) -> str:
    if not key or any(not 0x21 <= ord(c) <= 0x7E for c in key) or "," in key:
        # The key itself is never echoed.
        raise OpenAIConfigError(f"{where} is not usable: API keys are printable ASCII without spaces or commas")
    return key


def load_api_keys(key: str | None = None, key_file: str | Path | None = None,
                  env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """Every accepted key: ``key``, the lines of ``key_file`` (blank lines and ``#`` comments skipped), and
    ``$TRITON_VLM_API_KEY`` (comma-separated) / ``$TRITON_VLM_API_KEY_FILE`` when neither is given."""
    env = os.environ if env is None else env
    keys: list[str] = []
    if key is None and key_file is None:
        key = env.get(API_KEY_ENV) or None
        key_file = env.get(API_KEY_FILE_ENV) or None
    if key is not None:
        parts = [part.strip() for part in key.split(",")]
        keys.extend(_check_key(part, "--api-key (or $TRITON_VLM_API_KEY)") for part in parts if part)
        if not keys:
            raise OpenAIConfigError("--api-key (or $TRITON_VLM_API_KEY) is empty")
    if key_file is not None:
        path = Path(key_file)
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise OpenAIConfigError(f"--api-key-file {path}: cannot read it ({exc.strerror})") from None
        found = [(n, line.strip()) for n, line in enumerate(lines, 1)
                 if line.strip() and not line.strip().startswith("#")]
        if not found:
            raise OpenAIConfigError(f"--api-key-file {path} holds no key (one key per line)")
        keys.extend(_check_key(k, f"the key on line {n} of {path}") for n, k in found)
    return tuple(dict.fromkeys(keys))
