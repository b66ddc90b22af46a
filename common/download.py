"""Fetching images over HTTP: retries with backoff and jitter, Retry-After, a body cap, a decode check.

One URL is fetched once however many rows share it. Failures come back as a reason string, never as an
exception, so that every row ends in the manifest with a status.
"""
from __future__ import annotations

import email.utils
import io
import random
import threading
import time
from dataclasses import dataclass

import requests
from PIL import Image

# Reasons a later run may fix by trying again; everything else is final for that URL.
RETRYABLE = {"timeout", "connection_error", "truncated", "http_429", "http_5xx"}
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


@dataclass
class FetchResult:
    status: str              # "ok" or a failure reason
    data: bytes | None = None
    ext: str | None = None
    attempts: int = 0


_local = threading.local()


def _session(policy: FetchPolicy) -> requests.Session:
    if getattr(_local, "session", None) is None:
        s = requests.Session()
        s.max_redirects = policy.max_redirects
        s.headers["User-Agent"] = "vlm-price-pipeline/1.0"
        _local.session = s
    return _local.session


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


def _get_once(url: str, policy: FetchPolicy) -> tuple[str, bytes | None, float | None]:
    """One request: (reason or 'ok', body, seconds the server asked us to wait)."""
    try:
        with _session(policy).get(url, timeout=(policy.timeout_s, policy.timeout_s), stream=True) as resp:
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
            return "ok", bytes(buf), None
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


def fetch(url: str, policy: FetchPolicy, rng: random.Random | None = None) -> FetchResult:
    """Fetch and verify one image, retrying what may succeed on a later attempt."""
    if not url or not url.strip():
        return FetchResult("no_link")
    rng = rng or random.Random()
    attempts = 0
    while True:
        attempts += 1
        reason, body, wait = _get_once(url.strip(), policy)
        if reason == "ok":
            reason, ext = check_image(body, policy.max_image_pixels)
            if reason == "ok":
                return FetchResult("ok", body, ext, attempts)
        if reason not in RETRYABLE or attempts > policy.retries:
            return FetchResult(reason, attempts=attempts)
        backoff = min(policy.max_backoff_s, policy.backoff_s * 2 ** (attempts - 1)) * rng.uniform(0.5, 1.5)
        time.sleep(min(policy.max_backoff_s, max(backoff, wait or 0.0)))
