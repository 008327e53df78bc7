"""structlog JSON lines on stdout, with secrets scrubbed as a last line of defence.

Secrets are kept in SecretStr and never passed to a logger on purpose; the scrubber also
replaces any registered secret value that slips into an event (an exception text from a
library, say) before the line is written.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from types import TracebackType
from typing import Any

import orjson
import structlog

_secrets: set[str] = set()
REDACTED = "[redacted]"


def register_secrets(values: list[str]) -> None:
    """Values that must never appear in a log line (API keys, agent keys)."""
    _secrets.update(v for v in values if len(v) >= 4)


def scrub_text(text: str) -> str:
    """``text`` with every registered secret replaced."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def scrub(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    texts: dict[str, str] = {}
    for key, value in event.items():
        if isinstance(value, str):
            texts[key] = value
        elif value is not None and not isinstance(value, int | float | bool):
            texts[key] = event[key] = str(value)
    # One search per secret over the whole line (NUL never occurs in a key): a line without
    # a secret - nearly every line - costs len(secrets) searches, not values x secrets.
    joined = "\0".join(texts.values())
    if any(secret in joined for secret in _secrets):
        for key, text in texts.items():
            event[key] = scrub_text(text)
    return event


def _json_line(event: Any, **kw: Any) -> str:
    # orjson: a log line in about a fifth of json.dumps' time (one or two lines per sale).
    return orjson.dumps(event, default=kw.get("default")).decode()


def _log_uncaught(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
        return
    structlog.get_logger("worker").critical("worker.crashed", exc_info=(kind, exc, tb))


class _StdlibJson(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler :func:`configure` puts on the root logger (found again and replaced when
    configure is called twice)."""


def configure(level: str = "info") -> None:
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    # Libraries log through stdlib logging (asyncpg, aiormq, aio-pika, aiohttp, asyncio): their
    # records become the same JSON lines, traceback inside the line and secrets scrubbed, so
    # stdout stays one JSON object per line whatever logs. Kept at WARNING.
    handler = _StdlibJson(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.processors.add_log_level,
                structlog.stdlib.add_logger_name,
                timestamper,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                scrub,
                structlog.processors.JSONRenderer(serializer=_json_line),
            ],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StdlibJson)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(max(numeric, logging.WARNING))
    # The last words of a worker that dies (the ledger unreachable at start): one JSON line
    # too, not a plain traceback on stderr.
    sys.excepthook = _log_uncaught
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamper,
            structlog.processors.format_exc_info,
            scrub,
            structlog.processors.JSONRenderer(serializer=_json_line),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stdout),
        # Configured once, in main(), before anything logs.
        cache_logger_on_first_use=True,
    )
