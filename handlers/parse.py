"""Pure: raw AMQP body + routing key → a validated sale event, or ``invalid_message``."""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from handlers.errors import ErrorCode, InvoicingError
from handlers.messages import INBOUND_TYPES, SalePaid, SaleStorno


def _invalid(message: str) -> InvoicingError:
    return InvoicingError(ErrorCode.INVALID_MESSAGE, message)


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False, include_input=False)[:10]:
        where = ".".join(str(p) for p in error["loc"]) or "body"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


def parse_event(body: bytes, routing_key: str, *, max_bytes: int) -> SalePaid | SaleStorno:
    # Checked before parsing: a huge body is refused without spending memory or CPU on it.
    if len(body) > max_bytes:
        raise _invalid(f"body of {len(body)} bytes exceeds the limit of {max_bytes} bytes")
    model = INBOUND_TYPES.get(routing_key)
    if model is None:
        raise _invalid(
            f"unknown routing key {routing_key!r}; expected one of {', '.join(INBOUND_TYPES)}"
        )
    try:
        # Decoded explicitly: the contract says UTF-8, and json.loads would guess UTF-16/32.
        data: Any = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _invalid(f"body is not JSON in UTF-8: {exc}") from None
    except RecursionError:
        raise _invalid("body is nested too deeply to be a sale event") from None
    if not isinstance(data, dict):
        raise _invalid("body is not a JSON object")
    if data.get("event_type") != routing_key:
        raise _invalid(
            f"event_type {data.get('event_type')!r} does not match routing key {routing_key!r}"
        )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _invalid(_describe(exc)) from None


def peek_tenant(body: bytes, max_bytes: int) -> str | None:
    """Best effort, for the dead-letter headers of a message that failed to parse."""
    if len(body) > max_bytes:
        return None
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    tenant = data.get("tenant_id") if isinstance(data, dict) else None
    return tenant if isinstance(tenant, str) and tenant else None
