"""The bytes of an ``image_url``: ``data:`` URIs always; ``http(s)://`` URLs only when the server allows them.

Remote fetching is off by default. When on, it follows at most :data:`MAX_REDIRECTS` redirects, stops at
``max_bytes`` and ``timeout_s``, and (unless private hosts are allowed too) connects only to public addresses:
names are resolved by a resolver that drops loopback, private, link-local and other non-global addresses, and
the connection goes to an address that passed, so a DNS answer cannot change between check and use.
The bytes are not decoded here: the model decodes and checks them (a bad image is its 400).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import socket
from typing import Any
from urllib.parse import unquote_to_bytes, urljoin, urlsplit

from triton_vlm.openai.errors import APIError

MAX_REDIRECTS = 3
CHUNK = 64 * 1024
#: Media types a data URI may declare (besides none at all).
GENERIC_TYPES = ("application/octet-stream", "binary/octet-stream")


def _too_large(param: str, size: int | str, limit: int) -> APIError:
    return APIError(413, f"image is {size} bytes, over this server's limit of {limit} bytes", param=param,
                    code="image_too_large")


def decode_data_uri(url: str, *, max_bytes: int, param: str) -> bytes:
    """The payload of ``data:[<media type>][;base64],<data>``."""
    header, comma, payload = url[len("data:"):].partition(",")
    if not comma:
        raise APIError(400, "malformed data URI: expected data:<media type>;base64,<data>", param=param,
                       code="invalid_image_url")
    fields = [f.strip().lower() for f in header.split(";")]
    is_base64 = fields[-1] == "base64"
    media_type = "" if fields[0] == "base64" else fields[0]
    if media_type and not media_type.startswith("image/") and media_type not in GENERIC_TYPES:
        raise APIError(400, f"data URI media type {media_type!r} is not an image", param=param,
                       code="invalid_image_url")
    if is_base64:
        text = "".join(payload.split())  # line breaks and spaces are allowed inside base64
        if len(text) // 4 * 3 - 3 > max_bytes:
            raise _too_large(param, f"about {len(text) // 4 * 3}", max_bytes)
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, "the data URI's base64 payload is not valid base64", param=param,
                           code="invalid_image_url") from None
    else:
        try:
            data = unquote_to_bytes(payload)
        except UnicodeEncodeError:
            raise APIError(400, "the data URI is not valid text (lone surrogate)", param=param,
                           code="invalid_image_url") from None
    if len(data) > max_bytes:
        raise _too_large(param, len(data), max_bytes)
    if not data:
        raise APIError(400, "the data URI holds no image bytes", param=param, code="invalid_image_url")
    return data


def is_public_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class _Refused(Exception):
    pass


def _resolver(allow_private: bool) -> Any:
    import aiohttp
    from aiohttp.abc import AbstractResolver

    class PublicOnlyResolver(AbstractResolver):
        """Resolves like aiohttp's threaded resolver, keeping only addresses that may be fetched."""

        def __init__(self) -> None:
            self._inner = aiohttp.ThreadedResolver()

        async def resolve(self, host: str, port: int = 0,
                          family: socket.AddressFamily = socket.AF_INET) -> list[Any]:
            found = await self._inner.resolve(host, port, family)
            kept = [r for r in found if allow_private or is_public_address(r["host"])]
            if not kept:
                raise _Refused(f"{host} resolves only to non-public addresses "
                               f"({', '.join(sorted({r['host'] for r in found}))})")
            return kept

        async def close(self) -> None:
            await self._inner.close()

    return PublicOnlyResolver()


async def fetch_image(url: str, *, max_bytes: int, timeout_s: float, allow_private: bool, param: str) -> bytes:
    """GET ``url`` (http or https), following up to :data:`MAX_REDIRECTS` redirects under the same rules."""
    try:
        return await asyncio.wait_for(_fetch(url, max_bytes, allow_private, param), timeout=timeout_s)
    except asyncio.TimeoutError:
        raise APIError(400, f"fetching the image URL took longer than {timeout_s:g} s", param=param,
                       code="image_fetch_failed") from None


async def _fetch(url: str, max_bytes: int, allow_private: bool, param: str) -> bytes:
    import aiohttp

    def refused(why: str) -> APIError:
        return APIError(400, f"image URL refused: {why}", param=param, code="image_url_forbidden")

    connector = aiohttp.TCPConnector(resolver=_resolver(allow_private), limit=4, force_close=True)
    async with aiohttp.ClientSession(connector=connector, trust_env=False,
                                     headers={"User-Agent": "triton-vlm-openai", "Accept": "image/*"}) as session:
        for _ in range(MAX_REDIRECTS + 1):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise refused(f"only http and https URLs with a host can be fetched, not {url[:80]!r}")
            try:
                literal = ipaddress.ip_address(parts.hostname)
            except ValueError:
                literal = None
            if literal is not None and not allow_private and not is_public_address(str(literal)):
                raise refused(f"{parts.hostname} is not a public address")
            try:
                async with session.get(url, allow_redirects=False) as response:
                    if response.status in (301, 302, 303, 307, 308) and "Location" in response.headers:
                        url = urljoin(url, response.headers["Location"])
                        continue
                    if response.status != 200:
                        raise APIError(400, f"fetching the image URL answered HTTP {response.status}", param=param,
                                       code="image_fetch_failed")
                    if (response.content_length or 0) > max_bytes:
                        raise _too_large(param, response.content_length or 0, max_bytes)
                    data = bytearray()
                    async for chunk in response.content.iter_chunked(CHUNK):
                        data += chunk
                        if len(data) > max_bytes:
                            raise _too_large(param, f"more than {max_bytes}", max_bytes)
                    return bytes(data)
            except _Refused as exc:
                raise refused(str(exc)) from None
            except aiohttp.ClientConnectorError as exc:
                refusal = exc.os_error if isinstance(exc.os_error, _Refused) else exc.__cause__
                if isinstance(refusal, _Refused):
                    raise refused(str(refusal)) from None
                raise APIError(400, f"could not connect to the image URL's host: {exc.os_error}", param=param,
                               code="image_fetch_failed") from None
            except aiohttp.ClientError as exc:
                raise APIError(400, f"fetching the image URL failed: {type(exc).__name__}: {exc}", param=param,
                               code="image_fetch_failed") from None
        raise APIError(400, f"the image URL redirected more than {MAX_REDIRECTS} times", param=param,
                       code="image_fetch_failed")


async def image_bytes(url: str, *, param: str, max_bytes: int, allow_remote: bool, allow_private: bool,
                      timeout_s: float) -> bytes:
    """The image an ``image_url.url`` names; :class:`APIError` (400 or 413) if it can't be had."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return decode_data_uri(url, max_bytes=max_bytes, param=param)
    if scheme in ("http", "https"):
        if not allow_remote:
            raise APIError(400, "image URLs are not fetched by this server: send the image inline as a data URI "
                                "(data:image/png;base64,...), or start the server with --allow-remote-images",
                           param=param, code="remote_images_disabled")
        return await fetch_image(url, max_bytes=max_bytes, timeout_s=timeout_s, allow_private=allow_private,
                                 param=param)
    what = f"URL scheme '{scheme[:20]}:'" if scheme else "value (not a URL)"
    raise APIError(400, f"unsupported image {what}: send a data URI (data:image/png;base64,...)",
                   param=param, code="invalid_image_url")
