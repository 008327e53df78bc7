"""Pure: raw AMQP body + routing key → a validated sale event, or ``invalid_message``."""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import ValidationError

from handlers.messages import INBOUND_TYPES, SalePaid, SaleStorno
from providers.errors import ErrorCode, InvoicingError


def _invalid(message: str) -> InvoicingError:
    return InvoicingError(ErrorCode.INVALID_MESSAGE, message)


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False, include_input=False)[:10]:
        where = ".".join(str(p) for p in error["loc"]) or "body"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


def decode_body(body: bytes, *, max_bytes: int) -> dict[str, Any]:
    """The body as a JSON object, or ``invalid_message``. Decoded once per delivery: the
    pacing check reads the tenant from it and :func:`event_from` validates it."""
    # Checked before parsing: a huge body is refused without spending memory or CPU on it.
    if len(body) > max_bytes:
        raise _invalid(f"body of {len(body)} bytes exceeds the limit of {max_bytes} bytes")
    try:
        # orjson takes bytes as UTF-8 only, as the contract says (json.loads would also
        # guess UTF-16/32), and refuses nesting deeper than 1024 instead of recursing.
        data: Any = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if str(exc).startswith("depth limit"):
            raise _invalid("body is nested too deeply to be a sale event") from None
        raise _invalid(f"body is not JSON in UTF-8: {exc}") from None
    if not isinstance(data, dict):
        raise _invalid("body is not a JSON object")
    return data


def event_from(data: dict[str, Any], routing_key: str) -> SalePaid | SaleStorno:
    """A decoded body → the validated event its routing key names, or ``invalid_message``."""
    model = INBOUND_TYPES.get(routing_key)
    if model is None:
        raise _invalid(
            f"unknown routing key {routing_key!r}; expected one of {', '.join(INBOUND_TYPES)}"
        )
    if data.get("event_type") != routing_key:
        raise _invalid(
            f"event_type {data.get('event_type')!r} does not match routing key {routing_key!r}"
        )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _invalid(_describe(exc)) from None


def parse_event(body: bytes, routing_key: str, *, max_bytes: int) -> SalePaid | SaleStorno:
    return event_from(decode_body(body, max_bytes=max_bytes), routing_key)


def tenant_of(data: dict[str, Any]) -> str | None:
    tenant = data.get("tenant_id")
    return tenant if isinstance(tenant, str) and tenant else None


def peek_tenant(body: bytes, max_bytes: int) -> str | None:
    """Best effort, for the dead-letter headers of a message that failed to parse."""
    try:
        return tenant_of(decode_body(body, max_bytes=max_bytes))
    except InvoicingError:
        return None
