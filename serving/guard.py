"""ASGI middleware in front of ``POST /rank``: the protocol-level checks and error format.

Before the request reaches BentoML:

- ``X-API-Key`` (when the service has a key): missing or wrong -> 401;
- ``Content-Type`` must be JSON (absent is taken as JSON) -> else 415;
- the body is read here with a hard cap: a ``Content-Length`` over the limit, or more
  bytes than the limit on the wire (chunked) -> 413, without buffering the excess.

After it: BentoML answers schema violations with a 400 whose JSON holds pydantic's
errors (``detail[].loc``) but a generic message. This middleware rewrites every 4xx
body of the route into one format that names the field(s)::

    {"error": "item_ids.3: Input should be greater than or equal to 0",
     "fields": ["item_ids.3"], "detail": [...pydantic errors, when there are any...]}

and counts every response of the route by status code (``transact_requests_total``).
"""
from __future__ import annotations

import hmac
import logging
import json
from typing import Callable

JSON_TYPES = ("application/json", "text/json")


def _field(loc) -> str:
    parts = [str(p) for p in (loc or ())]
    return ".".join(parts) if parts else "body"


def format_errors(payload) -> dict:
    """BentoML / pydantic error bodies -> {"error", "fields", "detail"}."""
    if isinstance(payload, list) and len(payload) == 1 and isinstance(payload[0], dict):
        payload = payload[0]  # BentoMLException bodies come as a one-element list
    if not isinstance(payload, dict):
        return {"error": f"body: {payload}", "fields": ["body"]}
    if "fields" in payload:  # already ours
        return payload
    detail = payload.get("detail")
    if isinstance(detail, list) and detail:
        msgs, fields = [], []
        for d in detail:
            f = _field(d.get("loc"))
            msg = str(d.get("msg", "invalid"))
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
                head, sep, rest = msg.partition(": ")
                if f == "body" and sep and head.isidentifier():
                    f, msg = head, rest  # model-level check that names its field
            fields.append(f)
            msgs.append(f"{f}: {msg}")
        return {"error": "; ".join(msgs), "fields": fields, "detail": detail}
    err = str(payload.get("error", "bad request"))
    return {"error": err, "fields": [err.split(":", 1)[0] if ":" in err else "body"]}


async def _send_json(send, status: int, body: dict, headers: list | None = None) -> None:
    data = json.dumps(body).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": hdrs + (headers or [])})
    await send({"type": "http.response.body", "body": data})


class GuardMiddleware:
    """See the module docstring. ``on_status(code)`` is called once per response of the route."""

    def __init__(self, app, route: str = "/rank", max_body_bytes: int = 4 << 20,
                 api_key: str | None = None, header: str = "X-API-Key",
                 on_status: Callable[[int], None] | None = None) -> None:
        self.app = app
        self.route = route
        self.max_body_bytes = max_body_bytes
        self.api_key = api_key.encode() if api_key else None
        self.header = header.lower().encode()
        self.on_status = on_status

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path", "").rstrip("/") != self.route:
            return await self.app(scope, receive, send)
        status_seen = {"code": 500}

        async def counted_send(msg):
            if msg["type"] == "http.response.start":
                status_seen["code"] = msg["status"]
            await send(msg)

        try:
            await self._guarded(scope, receive, counted_send)
        finally:
            if self.on_status is not None:
                self.on_status(status_seen["code"])

    async def _guarded(self, scope, receive, send):
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        if scope.get("method") != "POST":
            return await self.app(scope, receive, send)  # 405 from the router
        if self.api_key is not None:
            got = headers.get(self.header, b"")
            if not hmac.compare_digest(got, self.api_key):
                return await _send_json(send, 401, {"error": f"{self.header.decode()}: missing or wrong API key",
                                                    "fields": [self.header.decode()]},
                                        [(b"www-authenticate", b"ApiKey")])
        ctype = headers.get(b"content-type", b"application/json").decode("latin-1").split(";")[0].strip().lower()
        if ctype not in JSON_TYPES:
            return await _send_json(send, 415, {"error": f"content-type: {ctype!r} is not supported; send "
                                                         "application/json", "fields": ["content-type"]})
        limit = self.max_body_bytes
        try:
            declared = int(headers.get(b"content-length", b"-1"))
        except ValueError:
            return await _send_json(send, 400, {"error": "content-length: not an integer",
                                                "fields": ["content-length"]})
        if declared > limit:
            return await _send_json(send, 413, {"error": f"body: {declared} bytes exceed the limit of {limit}",
                                                "fields": ["body"]})
        chunks, total = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body = msg.get("body", b"")
            total += len(body)
            if total > limit:
                return await _send_json(send, 413, {"error": f"body: more than {limit} bytes",
                                                    "fields": ["body"]})
            chunks.append(body)
            if not msg.get("more_body", False):
                break
        data = b"".join(chunks)
        replayed = {"done": False}

        async def replay():
            if not replayed["done"]:
                replayed["done"] = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()

        await self.app(scope, replay, _ErrorRewriter(send))


class _ErrorRewriter:
    """Buffers 4xx JSON responses and rewrites their body with :func:`format_errors`."""

    def __init__(self, send) -> None:
        self.send = send
        self.start = None
        self.chunks: list[bytes] = []

    async def __call__(self, msg):
        if msg["type"] == "http.response.start":
            if 400 <= msg["status"] < 500:
                self.start = msg
                return
            return await self.send(msg)
        if msg["type"] == "http.response.body" and self.start is not None:
            self.chunks.append(msg.get("body", b""))
            if msg.get("more_body", False):
                return
            raw = b"".join(self.chunks)
            try:
                body = json.dumps(format_errors(json.loads(raw))).encode()
            except (ValueError, TypeError):
                body = raw
            hdrs = [(k, v) for k, v in self.start.get("headers", []) if k.lower() != b"content-length"]
            hdrs.append((b"content-length", str(len(body)).encode()))
            await self.send({**self.start, "headers": hdrs})
            await self.send({"type": "http.response.body", "body": body})
            return
        return await self.send(msg)


#: The logger BentoML reports every failed API call on, with a full traceback.
BENTOML_ERROR_LOGGER = "bentoml._internal.server.http_app"


class ClientErrorLogFilter(logging.Filter):
    """Turns BentoML's error-with-traceback for a *client* error into one INFO line.

    BentoML logs every request that fails pydantic validation (a 400 the client caused and
    is told about) as an ERROR with a traceback, which buries real server errors. Client
    errors -- pydantic ``ValidationError`` and 4xx ``BentoMLException`` -- become
    ``client error on /rank [POST]: <summary>`` at INFO; everything else passes unchanged.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or not _is_client_error(exc):
            return True
        record.msg = record.msg.replace("Exception on", "client error on") + ": %s"
        record.args = tuple(record.args or ()) + (str(exc).splitlines()[0][:200],)
        record.exc_info, record.exc_text = None, None
        record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def _is_client_error(exc: BaseException) -> bool:
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return True
    code = getattr(getattr(exc, "error_code", None), "value", None)
    return isinstance(code, int) and 400 <= code < 500


def quiet_client_error_tracebacks() -> None:
    """Installs :class:`ClientErrorLogFilter` once on BentoML's error logger."""
    logger = logging.getLogger(BENTOML_ERROR_LOGGER)
    if not any(isinstance(f, ClientErrorLogFilter) for f in logger.filters):
        logger.addFilter(ClientErrorLogFilter())
