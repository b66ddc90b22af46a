"""Fetching images over HTTP: retries with backoff and jitter, Retry-After, a body cap, a decode check.

One URL is fetched once however many rows share it. Failures come back as a reason string, never as an
exception, so that every row ends in the manifest with a status.

Only public http(s) hosts are fetched. A link is a row of someone's CSV, so it may point inside the network
the pipeline runs in (a cloud's metadata service at 169.254.169.254, an internal dashboard): every hop of a
request, redirects included, is resolved once, refused (`blocked_host`) if any of its addresses is link-local,
or loopback, private, multicast or reserved unless `allow_private_hosts`, and connected to at exactly the
address that was checked, so a second DNS answer cannot send it elsewhere. Other schemes are `bad_url`.
"""
from __future__ import annotations

import email.utils
import io
import ipaddress
import random
import socket
import threading
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit, urlunsplit

import requests
from PIL import Image
from requests.adapters import HTTPAdapter

# Reasons a later run may fix by trying again; everything else is final for that URL. `interrupted`: the run was
# stopped (Ctrl-C) before this URL was done.
RETRYABLE = {"timeout", "connection_error", "truncated", "http_429", "http_5xx", "interrupted"}
FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}


@dataclass
class FetchPolicy:
    timeout_s: float = 10.0
    retries: int = 3
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    max_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 89_478_485
    max_redirects: int = 5
    allow_private_hosts: bool = False  # loopback, private, multicast, reserved; link-local stays refused


@dataclass
class FetchResult:
    status: str              # "ok" or a failure reason
    data: bytes | None = None
    ext: str | None = None
    attempts: int = 0


_local = threading.local()


class Refused(Exception):
    """A hop the fetcher will not make; `reason` is the manifest status."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def address_refused(address: str, allow_private_hosts: bool = False) -> bool:
    """Whether an IP address is off limits: link-local always (169.254.0.0/16, fe80::/10: where cloud metadata
    services answer), and anything not globally routable or multicast unless private hosts are allowed."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_link_local:
        return True
    return not allow_private_hosts and (not ip.is_global or ip.is_multicast)


def checked_address(host: str, port: int, allow_private_hosts: bool) -> str:
    """The one address a hop connects to: host resolved once, refused if any of its addresses is refused."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise Refused("connection_error") from None
    addresses = [info[4][0] for info in infos]
    if not addresses or any(address_refused(a, allow_private_hosts) for a in addresses):
        raise Refused("blocked_host")
    return min(addresses, key=lambda a: ":" in a)  # IPv4 first: a host without IPv6 routes is common


class PinnedAdapter(HTTPAdapter):
    """Connects to the checked IP address in the URL while TLS verifies (and SNI names) the real host, which the
    request carries in its Host header."""

    def build_connection_pool_key_attributes(self, request, verify, cert=None):
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(request, verify, cert)
        host = urlsplit("//" + request.headers.get("Host", "")).hostname
        if host_params["scheme"] == "https" and host:
            pool_kwargs["server_hostname"] = host
            pool_kwargs["assert_hostname"] = host
        return host_params, pool_kwargs


def _session(policy: FetchPolicy) -> requests.Session:
    if getattr(_local, "session", None) is None:
        s = requests.Session()
        s.trust_env = False  # no proxy from the environment: the connection goes to the address checked here
        s.mount("http://", PinnedAdapter())
        s.mount("https://", PinnedAdapter())
        s.headers["User-Agent"] = "vlm-price-pipeline/1.0"
        _local.session = s
    return _local.session


def _pinned(url: str, allow_private_hosts: bool) -> tuple[str, str]:
    """(the URL with its host replaced by the checked address, the Host header) for one hop."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Refused("bad_url")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise Refused("bad_url") from None
    address = checked_address(parts.hostname, port, allow_private_hosts)
    shown = f"[{address}]" if ":" in address else address
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    header = host if parts.port is None else f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, f"{shown}:{port}", parts.path or "/", parts.query, "")), header


def _open(url: str, policy: FetchPolicy) -> requests.Response:
    """The response at the end of url's redirects, each hop checked and pinned; the caller closes it."""
    for _ in range(policy.max_redirects + 1):
        target, host = _pinned(url, policy.allow_private_hosts)
        resp = _session(policy).get(target, headers={"Host": host}, allow_redirects=False, stream=True,
                                    timeout=(policy.timeout_s, policy.timeout_s))
        if not (resp.is_redirect and resp.headers.get("Location")):
            return resp
        url = urljoin(url, resp.headers["Location"])
        resp.close()
    raise requests.exceptions.TooManyRedirects(url)


def check_image(data: bytes, max_image_pixels: int) -> tuple[str, str | None]:
    """('ok', ext) if the bytes decode to an image within the pixel cap, else (reason, None)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            if img.width * img.height > max_image_pixels:
                return "decompression_bomb", None
            if fmt == "JPEG":
                img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))  # decodes every block, cheaply
            img.load()
    except Image.DecompressionBombError:
        return "decompression_bomb", None
    except Image.UnidentifiedImageError:
        return "not_image", None
    except (OSError, SyntaxError, ValueError):
        return "corrupt_image", None
    return "ok", FORMAT_EXT.get(fmt, "img")


def _retry_after(resp: requests.Response) -> float | None:
    value = resp.headers.get("Retry-After")
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    try:  # an HTTP date; anything else (e.g. "soon", "1.5") is ignored rather than failing the run
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, parsed.timestamp() - time.time()) if parsed else None


def _get_once(url: str, policy: FetchPolicy, stop: threading.Event | None = None
              ) -> tuple[str, bytes | None, float | None]:
    """One request: (reason or 'ok', body, seconds the server asked us to wait)."""
    try:
        with _open(url, policy) as resp:
            if resp.status_code == 429:
                return "http_429", None, _retry_after(resp)
            if resp.status_code >= 500:
                return "http_5xx", None, _retry_after(resp)
            if resp.status_code >= 400:
                return f"http_{resp.status_code}", None, None
            try:
                declared = int(resp.headers.get("Content-Length") or 0)
            except ValueError:
                declared = 0  # a malformed header: the streamed body cap below still applies
            if declared > policy.max_bytes:
                return "too_large", None, None
            deadline = time.monotonic() + 3 * policy.timeout_s
            buf = bytearray()
            for chunk in resp.iter_content(64 * 1024):
                buf += chunk
                if len(buf) > policy.max_bytes:
                    return "too_large", None, None
                if time.monotonic() > deadline:
                    return "timeout", None, None
                if stop is not None and stop.is_set():
                    return "interrupted", None, None
            return "ok", bytes(buf), None
    except Refused as err:
        return err.reason, None, None
    except requests.exceptions.TooManyRedirects:
        return "too_many_redirects", None, None
    except (requests.exceptions.Timeout, TimeoutError):
        return "timeout", None, None
    except requests.exceptions.ChunkedEncodingError:
        return "truncated", None, None
    except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
            requests.exceptions.InvalidSchema):
        return "bad_url", None, None
    except requests.exceptions.ConnectionError as err:
        return ("truncated" if "IncompleteRead" in str(err) else "connection_error"), None, None
    except requests.exceptions.RequestException:
        return "bad_response", None, None  # e.g. a body that fails its Content-Encoding; one URL, not the run


def fetch(url: str, policy: FetchPolicy, rng: random.Random | None = None,
          stop: threading.Event | None = None) -> FetchResult:
    """Fetch and verify one image, retrying what may succeed on a later attempt. Once `stop` is set (Ctrl-C) no
    new attempt starts, a backoff ends at once and the result is `interrupted`."""
    if not url or not url.strip():
        return FetchResult("no_link")
    rng = rng or random.Random()
    stop = stop or threading.Event()
    attempts = 0
    while True:
        if stop.is_set():
            return FetchResult("interrupted", attempts=attempts)
        attempts += 1
        reason, body, wait = _get_once(url.strip(), policy, stop)
        if reason == "ok":
            reason, ext = check_image(body, policy.max_image_pixels)
            if reason == "ok":
                return FetchResult("ok", body, ext, attempts)
        if reason not in RETRYABLE or attempts > policy.retries:
            return FetchResult(reason, attempts=attempts)
        if stop.is_set():  # a failure that would be retried: left for the next run
            return FetchResult("interrupted", attempts=attempts)
        backoff = min(policy.max_backoff_s, policy.backoff_s * 2 ** (attempts - 1)) * rng.uniform(0.5, 1.5)
        stop.wait(min(policy.max_backoff_s, max(backoff, wait or 0.0)))
