"""The prompt, written once: system text, user template, price format and parser.

Training (stage 3 writes it, stage 4 encodes it) and inference (stage 7) both build their chats here,
so the model is asked at test time exactly what it was taught.
"""
from __future__ import annotations

import math
import re

SYSTEM_PROMPT = ("You are a retail pricing expert. From the product's catalog entry and photo, "
                 "reply with its price in US dollars as a plain number, nothing else.")
USER_TEMPLATE = "{catalog}\n\nWhat is this product's price in USD?"

_PRICE_RE = re.compile(r"\d+(?:\.\d+)?|\.\d+")


def format_price(price: float) -> str:
    """The assistant's answer text: two decimals, no thousands separator, no currency sign."""
    return f"{float(price):.2f}"


def parse_price(text: str) -> float | None:
    """First number in the model's text, or None if there is none or it is not a positive finite price."""
    m = _PRICE_RE.search(text.replace(",", ""))
    if not m:
        return None
    value = float(m.group(0))
    return value if math.isfinite(value) and value > 0 else None


def user_text(catalog: str) -> str:
    return USER_TEMPLATE.format(catalog=catalog.strip())


def build_messages(catalog: str, image_path: str | None, price: float | None) -> list[dict]:
    """The seed's chat schema: system, user = [image] + text, assistant = price (absent for test rows)."""
    user_content = []
    if image_path is not None:
        user_content.append({"type": "image", "image": image_path})
    user_content.append({"type": "text", "text": user_text(catalog)})
    messages = [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
        {"role": "user", "content": user_content},
    ]
    if price is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": format_price(price)}]})
    return messages


def message_parts(messages: list[dict]) -> tuple[str, str | None, str | None]:
    """(user text, image path or None, answer text or None) back from a chat built above."""
    text, image, answer = "", None, None
    for msg in messages:
        for part in msg["content"]:
            if msg["role"] == "user" and part["type"] == "image":
                image = part["image"]
            elif msg["role"] == "user" and part["type"] == "text":
                text = part["text"]
            elif msg["role"] == "assistant" and part["type"] == "text":
                answer = part["text"]
    return text, image, answer


_CATALOG_PREFIX, _CATALOG_SUFFIX = USER_TEMPLATE.split("{catalog}")


def catalog_from_user_text(text: str) -> str:
    """The catalog part of a user turn built by `user_text`, so that it alone can be truncated."""
    if not (text.startswith(_CATALOG_PREFIX) and text.endswith(_CATALOG_SUFFIX)):
        raise ValueError("user text does not follow common.prompt.USER_TEMPLATE; rebuild the JSONL (stage 3)")
    return text[len(_CATALOG_PREFIX): len(text) - len(_CATALOG_SUFFIX)]
