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

BentoML's generated OpenAPI (``/docs.json``) documents a 400 body with ``detail: string``,
no 401/413/415/503, the body as optional and optional fields as not nullable; the
middleware also rewrites that document (:func:`served_openapi`) so that it says what the
route does: every error response points at :data:`ERROR_SCHEMA`, the body it really gets. A 4xx body
that is not JSON is sent as a ``body`` error, so every 4xx of the route is that format.
The document also states what only the running service knows (:class:`RouteState`): the
model's heads (the keys ``score_weights`` takes) and the clock rule of ``request_ts`` with
its bound (``x-max-clock-skew-s``). Three rules no schema can state -- the clock (its
bound moves with the server's time), which item ids the item table holds, one embedding
row per item id -- are listed in the 400 response's description.

The middleware is registered when the service class is defined, before any setting is
read; the service instance hands it what it needs (:meth:`RouteState.configure`).
"""
from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable

JSON_TYPES = ("application/json", "text/json")


#: The JSON body of every error response of the route (what :func:`format_errors` and the
#: service's own errors produce); ``detail`` only comes with schema violations.
ERROR_SCHEMA: dict = {
    "title": "TransActError",
    "type": "object",
    "description": "An error of POST /rank: a one-line message that starts with the field it names.",
    "required": ["error", "fields"],
    "properties": {
        "error": {"type": "string", "description": "'<field>: <message>' (several joined by '; ')."},
        "fields": {"type": "array", "minItems": 1, "items": {"type": "string"},
                   "description": "The fields at fault, dotted paths into the body (item_ids.3) or "
                                  "'body', a header name, or 'service' for a 503."},
        "detail": {"type": "array", "description": "pydantic's errors of a schema violation.",
                   "items": {"type": "object", "required": ["loc", "msg", "type"],
                             "properties": {"loc": {"type": "array", "items": {}},
                                            "msg": {"type": "string"}, "type": {"type": "string"}}}},
    },
}

#: Rules of POST /rank that a JSON schema cannot state: a schema-valid body may break them
#: and get a 400 naming the field (the 400 response's description lists them).
UNSTATED_RULES: tuple[str, ...] = (
    "request_ts, when given, must lie within x-max-clock-skew-s seconds of the server clock "
    "(no bound when that is null); omit it to use the server clock",
    "item_ids must be in the item table unless item_embeddings gives their embeddings",
    "item_embeddings, when given, has one row per item id",
)

#: Status -> description of each error response of the route (the body is ERROR_SCHEMA).
ERROR_RESPONSES: dict[int, str] = {
    400: "Schema or semantic error (the message names the field). Besides the schema, the body "
         "must keep these rules: " + "; ".join(UNSTATED_RULES) + ".",
    401: "Missing or wrong API key (only when the service has one).",
    413: "Body larger than the limit.",
    415: "Content-Type is not JSON.",
    503: "Not ready, overloaded, deadline passed or sequence source down; retry after Retry-After "
         "seconds when that header is sent.",
}


class RouteState:
    """What the middleware and the document need from the running service.

    The middleware is created from keyword options fixed when the service class is
    defined; the service instance calls :meth:`configure` with its settings and, once the
    model is loaded, its heads. Until then the defaults hold (no API key; the route answers
    503 while the service is not ready anyway).
    """

    def __init__(self, max_body_bytes: int = 4 << 20, api_key: str | None = None,
                 max_clock_skew_s: float | None = 300.0, heads: tuple[str, ...] | None = None) -> None:
        self.configure(max_body_bytes=max_body_bytes, api_key=api_key, max_clock_skew_s=max_clock_skew_s,
                       heads=heads)

    def configure(self, *, max_body_bytes: int, api_key: str | None, max_clock_skew_s: float | None,
                  heads: tuple[str, ...] | None = None) -> None:
        self.max_body_bytes = max_body_bytes
        self.api_key = api_key.encode() if api_key else None
        self.max_clock_skew_s = max_clock_skew_s
        self.heads = tuple(heads) if heads is not None else None


def served_openapi(spec: dict, route: str = "/rank", api_key_header: str | None = None,
                   heads: tuple[str, ...] | list[str] | None = None,
                   max_clock_skew_s: float | None = 300.0) -> dict:
    """BentoML's OpenAPI document -> one that describes what ``POST route`` really does
    (:func:`_document_request`, :func:`_document_errors`, the API key when the service has
    one, the model's ``heads`` when known, the clock bound); other paths are left alone."""
    op = spec.get("paths", {}).get(route, {}).get("post")
    if op is not None:
        _document_request(op)
        _document_service(op, heads, max_clock_skew_s)
        _document_errors(spec, op)
        if api_key_header:
            spec["components"].setdefault("securitySchemes", {})["ApiKey"] = {
                "type": "apiKey", "in": "header", "name": api_key_header}
            op["security"] = [{"ApiKey": []}]
    return spec


def _document_request(op: dict) -> None:
    """What BentoML's request schema leaves out. The body is required (the document left
    ``requestBody.required`` at its default, false: a POST without a body was documented as
    valid, and is a 400). ``Optional[X]`` is flattened to X (``anyOf: [X, null]`` loses its
    null), so the document said ``null`` is refused where the service takes it as "absent":
    a property whose default is null is marked ``nullable``."""
    body = op.get("requestBody")
    if body is None:
        return
    body["required"] = True
    for media in body.get("content", {}).values():
        for prop in media.get("schema", {}).get("properties", {}).values():
            if "default" in prop and prop["default"] is None:
                prop["nullable"] = True


def _body_properties(op: dict) -> dict:
    content = op.get("requestBody", {}).get("content", {})
    media: dict = content.get("application/json") or next(iter(content.values()), {})
    return media.get("schema", {}).get("properties", {})


def _document_service(op: dict, heads, max_clock_skew_s: float | None) -> None:
    """What the running service accepts beyond the static schema: ``score_weights`` keys are
    the model's heads (an unknown head is a 400), and ``request_ts`` carries the clock bound
    (``x-max-clock-skew-s``: seconds, or null when client times are trusted) -- a bound
    around a moving clock cannot be a static minimum/maximum."""
    props = _body_properties(op)
    weights = props.get("score_weights")
    if heads and weights is not None and isinstance(weights.get("additionalProperties"), dict):
        one = weights.pop("additionalProperties")
        weights["properties"] = {h: dict(one) for h in heads}
        weights["additionalProperties"] = False
        weights["description"] = (weights.get("description", "") + " Keys: the model's heads "
                                  f"({', '.join(heads)}).").strip()
    ts = props.get("request_ts")
    if ts is not None:
        ts["x-max-clock-skew-s"] = max_clock_skew_s
        rule = (f"This service refuses (400) a request_ts more than {max_clock_skew_s:g} s from its clock "
                "(x-max-clock-skew-s)." if max_clock_skew_s is not None else
                "This service trusts client times (x-max-clock-skew-s is null): any request_ts the schema "
                "allows is used.")
        ts["description"] = (ts.get("description", "") + " " + rule).strip()


def _document_errors(spec: dict, op: dict) -> None:
    """BentoML declares 400/404/500 of every API with its own body (``detail`` a string); the
    route answers 400/401/413/415/503 with :data:`ERROR_SCHEMA` (never 404: the route
    exists). 500 stays BentoML's: only BentoML itself answers one (a bug)."""
    spec.setdefault("components", {}).setdefault("schemas", {})["TransActError"] = ERROR_SCHEMA
    responses = op["responses"] = {str(k): v for k, v in op.get("responses", {}).items()}  # JSON keys
    responses.pop("404", None)
    content = {"application/json": {"schema": {"$ref": "#/components/schemas/TransActError"}}}
    for code, text in ERROR_RESPONSES.items():
        responses[str(code)] = {"description": text, "content": content}
    responses["503"]["headers"] = {"Retry-After": {"description": "Seconds to wait before retrying.",
                                                   "schema": {"type": "integer"}}}


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
                 on_status: Callable[[int], None] | None = None, docs: str = "/docs.json",
                 state: RouteState | None = None) -> None:
        self.app = app
        self.route = route
        self.docs = docs
        #: read per request: the service configures it once its settings are read
        self.state = state if state is not None else RouteState(max_body_bytes=max_body_bytes, api_key=api_key)
        self.header = header.lower().encode()
        self.header_name = header
        self.on_status = on_status

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "").rstrip("/") if scope["type"] == "http" else None
        if path == self.docs and scope.get("method") == "GET":
            st = self.state
            key_header = self.header_name if st.api_key is not None else None
            return await self.app(scope, receive, _SpecRewriter(send, self.route, key_header, st.heads,
                                                                st.max_clock_skew_s))
        if path != self.route:
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
        api_key = self.state.api_key
        if api_key is not None:
            got = headers.get(self.header, b"")
            if not hmac.compare_digest(got, api_key):
                return await _send_json(send, 401, {"error": f"{self.header.decode()}: missing or wrong API key",
                                                    "fields": [self.header.decode()]},
                                        [(b"www-authenticate", b"ApiKey")])
        ctype = headers.get(b"content-type", b"application/json").decode("latin-1").split(";")[0].strip().lower()
        if ctype not in JSON_TYPES:
            return await _send_json(send, 415, {"error": f"content-type: {ctype!r} is not supported; send "
                                                         "application/json", "fields": ["content-type"]})
        limit = self.state.max_body_bytes
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


class _BodyRewriter:
    """Buffers the body of responses that ``wants(status)`` and sends ``rewrite(bytes)`` instead."""

    def __init__(self, send) -> None:
        self.send = send
        self.start = None
        self.chunks: list[bytes] = []

    def wants(self, status: int) -> bool:
        raise NotImplementedError

    def rewrite(self, raw: bytes) -> bytes:
        raise NotImplementedError

    def headers(self, start: dict) -> list:
        return list(start.get("headers", []))

    async def __call__(self, msg):
        if msg["type"] == "http.response.start":
            if self.wants(msg["status"]):
                self.start = msg
                return
            return await self.send(msg)
        if msg["type"] == "http.response.body" and self.start is not None:
            self.chunks.append(msg.get("body", b""))
            if msg.get("more_body", False):
                return
            body = self.rewrite(b"".join(self.chunks))
            hdrs = [(k, v) for k, v in self.headers(self.start) if k.lower() != b"content-length"]
            hdrs.append((b"content-length", str(len(body)).encode()))
            await self.send({**self.start, "headers": hdrs})
            await self.send({"type": "http.response.body", "body": body})
            return
        return await self.send(msg)


class _SpecRewriter(_BodyRewriter):
    """``/docs.json``: BentoML's document with :func:`served_openapi` applied."""

    def __init__(self, send, route: str, api_key_header: str | None, heads=None,
                 max_clock_skew_s: float | None = 300.0) -> None:
        super().__init__(send)
        self.route = route
        self.api_key_header = api_key_header
        self.heads, self.max_clock_skew_s = heads, max_clock_skew_s

    def wants(self, status: int) -> bool:
        return status == 200

    def rewrite(self, raw: bytes) -> bytes:
        try:
            return json.dumps(served_openapi(json.loads(raw), self.route, self.api_key_header, self.heads,
                                             self.max_clock_skew_s)).encode()
        except (ValueError, TypeError, AttributeError):
            return raw


class _ErrorRewriter(_BodyRewriter):
    """4xx responses of the route: the body rewritten with :func:`format_errors` (a body that
    is not JSON becomes the message of a ``body`` error), always ``application/json``."""

    def wants(self, status: int) -> bool:
        return 400 <= status < 500

    def rewrite(self, raw: bytes) -> bytes:
        try:
            payload = json.loads(raw)
        except ValueError:
            text = " ".join(raw.decode("utf-8", "replace").split())[:300]
            payload = {"error": f"body: {text or 'bad request'}", "fields": ["body"]}
        return json.dumps(format_errors(payload)).encode()

    def headers(self, start: dict) -> list:
        return [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-type"] + [
            (b"content-type", b"application/json")]


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
