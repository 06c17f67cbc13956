"""Inngest's rules for events sent to the relay (POST /e/{key}), and their ids.

The rules are those of Inngest's event API (shared/inngest-event-api.md; the
server's ``pkg/event/event.go`` and ``pkg/eventstream``), applied to the whole
request before anything is stored, so that nothing the relay accepts is later
refused by Inngest. Fields are read as Go's encoding/json reads them (keys in
any case, the last non-null one wins) and kept as sent; an event without an
id gets one, and one without a timestamp the time it was received, so that
Inngest sees the event as it was sent however late it is delivered.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from .ids import new_event_id
from .models import MAX_EVENT_ID_LENGTH
from .store.contract import NewEvent
from .store.encoding import RawJSON

MAX_EVENTS = 5000  # Inngest's consts.MaxEvents
TS_MIN_MS = 315_532_800_000  # 1980-01-01, pkg/event/event.go
TS_MAX_MS = 4_102_444_800_000  # 2100-01-01
MAX_NAME_LENGTH = 255  # the outbox's event_name column
INVALID_BODY = "Request body must contain an event object or an array of event objects"
SEED_HEADER = "x-inngest-event-id-seed"

# (what the value must be, the JSON types that are it)
_FIELDS: dict[str, tuple[str, tuple[type, ...]]] = {
    "id": ("a string", (str,)),
    "name": ("a string", (str,)),
    "data": ("an object", (dict,)),
    "user": ("an object", (dict,)),
    "v": ("a string", (str,)),
    "ts": ("an integer (milliseconds)", (int,)),
}
_INT64 = range(-(2**63), 2**63)


class Refused(Exception):
    """The request breaks a rule: nothing of it is stored."""

    def __init__(self, error: str) -> None:
        super().__init__(error)
        self.error = error


@dataclass(frozen=True, slots=True)
class Seed:
    """An SDK's ``x-inngest-event-id-seed``: the same on every retry of one send."""

    ms: int
    entropy: bytes


def parse_seed(header: str | None) -> Seed | None:
    """``"<ms>,<base64 of 10 random bytes>"``, or None (absent or malformed:
    the events get new ids, as when no seed is sent)."""
    if not header:
        return None
    ms_text, _, entropy_text = header.partition(",")
    if not ms_text.isdigit() or len(ms_text) > 15:
        return None
    try:
        entropy = base64.b64decode(entropy_text, validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(entropy) != 10:
        return None
    return Seed(int(ms_text), entropy)


def seeded_id(seed: Seed, origin: str, index: int) -> str:
    """The id of the event at ``index`` of a request sent with ``seed``: a
    UUIDv7 of the seed's milliseconds, its other bits a hash of the seed, the
    key's name and the position. A retry gets the same ids; another key's
    request with the same seed does not meet them."""
    digest = hashlib.sha256(b"%s\0%s\0%d" % (origin.encode(), seed.entropy, index)).digest()
    raw = bytearray((seed.ms & 0xFFFF_FFFF_FFFF).to_bytes(6, "big") + digest[:10])
    raw[6] = 0x70 | (raw[6] & 0x0F)  # version 7
    raw[8] = 0x80 | (raw[8] & 0x3F)  # variant 0b10
    text = raw.hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def read_events(
    raw: bytes,
    *,
    origin: str,
    seed: Seed | None,
    received_at: datetime,
    max_event_bytes: int,
) -> list[NewEvent]:
    """The request's events as the outbox stores them; Refused if any event
    breaks a rule (the message names the event by its position)."""
    body = _parse(raw)
    if isinstance(body, dict):
        events: list[Any] = [body]
    elif isinstance(body, list):
        events = body
    else:
        raise Refused(INVALID_BODY)
    if len(events) > MAX_EVENTS:
        raise Refused(f"Cannot have more than {MAX_EVENTS} events in a batch")
    now_ms = int(received_at.timestamp() * 1000)
    out: list[NewEvent] = []
    for index, event in enumerate(events):
        name, event_id, ts = _check(event, index)
        if event_id is None:
            event_id = seeded_id(seed, origin, index) if seed is not None else new_event_id(now_ms)
            event["id"] = event_id
        if not ts:
            event["ts"] = now_ms  # Inngest's default: the time of receipt
        payload, size = _serialize(event, index)
        if size > max_event_bytes:
            raise Refused(
                f"event {index}: Event is over the max size: Max {max_event_bytes} bytes"
                f" / Size {size} bytes"
            )
        out.append(NewEvent(id=event_id, name=name, payload=payload, created_at=received_at))
    return out


def _check(event: Any, index: int) -> tuple[str, str | None, int | None]:
    """The event's name, own id (None: it has none) and ts, or Refused."""
    if not isinstance(event, dict):
        raise Refused(f"event {index}: an event must be a JSON object")
    # Nearly every event spells its fields as the SDKs do and is valid: then
    # each field is one look-up and one test, not a search through keys of any
    # case (_field) and a table of rules (_check_types, which names the fault).
    if event.keys() <= _FIELDS.keys():
        get = event.get
        name, ts, event_id = get("name"), get("ts"), get("id")
        if not (
            (name is None or type(name) is str)
            and (event_id is None or type(event_id) is str)
            and (ts is None or (type(ts) is int and ts in _INT64))
            and ((v := get("v")) is None or type(v) is str)
            and ((data := get("data")) is None or type(data) is dict)
            and ((user := get("user")) is None or type(user) is dict)
        ):
            _check_types(event, index)
    else:
        _check_types(event, index)
        name, ts, event_id = _field(event, "name"), _field(event, "ts"), _field(event, "id")
    if not name:
        raise Refused(f"event {index}: event name is empty")
    if name.lower().startswith("inngest/"):
        raise Refused(f"event {index}: event name is reserved for internal use: {name}")
    if len(name) > MAX_NAME_LENGTH:
        raise Refused(f"event {index}: event name is longer than {MAX_NAME_LENGTH} characters")
    if ts and ts < TS_MIN_MS:
        raise Refused(f"event {index}: timestamp is before Jan 1, 1980")
    if ts and ts > TS_MAX_MS:
        raise Refused(f"event {index}: timestamp is after Jan 1, 2100")
    event_id = event_id or None
    if event_id is not None and len(event_id) > MAX_EVENT_ID_LENGTH:
        raise Refused(f"event {index}: id is longer than {MAX_EVENT_ID_LENGTH} characters")
    return name, event_id, ts


def _check_types(event: dict[str, Any], index: int) -> None:
    """Refused, naming the first field (in the event's order) of a wrong type."""
    for key, value in event.items():
        spec = _FIELDS.get(key.lower())
        if spec is None or value is None:
            continue
        kind, types = spec
        if (
            isinstance(value, bool)
            or not isinstance(value, types)
            or (types == (int,) and value not in _INT64)
        ):
            raise Refused(f"event {index}: {key.lower()} must be {kind}")


def _field(event: dict[str, Any], name: str) -> Any:
    """A field as Go reads it: keys match in any case, the last non-null one wins."""
    found = None
    for key, item in event.items():
        if item is not None and key.lower() == name:
            found = item
    return found


# 19 digits or more in a row: perhaps an integer orjson would read as an
# inexact float. Found by mapping each digit to "1" and anything else to "0"
# and looking for a run: a tenth of the time of a regular expression's search.
_DIGITS = bytes(0x31 if 0x30 <= b <= 0x39 else 0x30 for b in range(256))
_LONG_RUN = b"1" * 19


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _parse(raw: bytes) -> Any:
    if _LONG_RUN not in raw.translate(_DIGITS):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass  # the standard parser gives the error, or reads what orjson does not
    try:
        return _DECODER.decode(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise Refused(f"the body is not UTF-8 (invalid byte at offset {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise Refused(f"invalid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    except RecursionError:
        raise Refused("invalid JSON: nested too deeply") from None
    except ValueError as exc:
        raise Refused(f"invalid JSON: {exc}") from None


def _serialize(event: dict[str, Any], index: int) -> tuple[RawJSON, int]:
    """The event's JSON text and its size in bytes."""
    try:
        raw = orjson.dumps(event)
        return RawJSON(raw.decode("utf-8")), len(raw)
    except TypeError:
        pass  # integers past 64 bits, nesting orjson does not write
    try:
        text = _ENCODER.encode(event)
        size = len(text.encode("utf-8"))
    except RecursionError:
        raise Refused(f"event {index}: nested too deeply") from None
    except UnicodeEncodeError:
        raise Refused(f"event {index}: a string holds an unpaired UTF-16 surrogate") from None
    return RawJSON(text), size
