"""The admin API: JSON over HTTP on ``listen.admin`` only, bearer-token auth.

Owns: routes, request/response schemas (OpenAPI at ``/openapi.json``), the token
file, and the mapping of our exceptions to HTTP statuses. Every route calls the
same ``Registry`` functions as the CLI.
Must not import: storage backends, ``acme``.

The app is mounted on its own loopback listener by ``server.py`` and never on
the public sockets: the public ASGI app has no route that reaches it.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from ..errors import (
    DomainExists,
    DomainNotFound,
    EdgeproxyError,
    EventNotFound,
    InvalidHostname,
    LimitReached,
    StorageUnavailable,
)
from .registry import Registry
from ..edge.spool import ReplayFilters
from .tokens import TokenStore
from .webhooks import EventLog

__all__ = ["create_admin_app"]

log = logging.getLogger("edgeproxy.admin")


class DomainCreate(BaseModel):
    hostname: str = Field(..., description="The customer's hostname, e.g. cdn.shop.example", max_length=1024)


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class CertificateOut(BaseModel):
    not_before: str | None
    not_after: str | None
    issuer: str
    serial: str


class DnsRecord(BaseModel):
    type: str
    name: str
    value: str


class DnsOut(BaseModel):
    records: list[DnsRecord]
    alternatives: list[DnsRecord]


class DomainOut(BaseModel):
    hostname: str
    status: str = Field(..., description="pending_dns | issuing | active | renewing | failing | moved")
    error: ErrorBody | None
    certificate: CertificateOut | None
    next_attempt_at: str | None
    attempts: int
    created_at: str | None
    updated_at: str | None
    dns: DnsOut = Field(..., description="The record the customer must publish (CNAME, or A/AAAA alternatives)")
    snippet: str = Field(..., description="HTML to paste into the customer's pages")
    last_check: dict[str, Any] | None = Field(
        None, description="The last acceptance probe of this domain (monitor loop in serve), or null")


class DomainList(BaseModel):
    domains: list[DomainOut]


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "Not registered"},
    401: {"model": ErrorResponse, "description": "Missing or wrong bearer token"},
}


class DeliveryOut(BaseModel):
    seq: int = Field(..., description="Outbox order; per endpoint and domain, the delivery order")
    id: str = Field(..., description="The event id (the webhook-id header; the same at every attempt)")
    type: str = Field(..., description="domain.registered | domain.active | domain.failing | domain.moved | "
                                       "domain.removed | certificate.issued | certificate.renewed | "
                                       "certificate.expiring")
    hostname: str
    endpoint: str
    occurred_at: str | None
    state: str = Field(..., description="pending | delivered | dead (dead-lettered after events.horizon)")
    attempts: int
    next_attempt_at: str | None
    last_status: int | None = Field(..., description="The receiver's last HTTP status (null: no answer)")
    last_error: str | None
    delivered_at: str | None


class DeliveryList(BaseModel):
    deliveries: list[DeliveryOut]


class ReplayRequest(BaseModel):
    since: str | None = Field(None, description="ISO-8601, or an age such as 12h or 7d")
    until: str | None = None
    domain: str | None = None
    status: int | None = None
    dry_run: bool = False


class _AdminAPI(FastAPI):
    """FastAPI whose OpenAPI document tells the truth about malformed requests.

    FastAPI documents a 422 ``HTTPValidationError`` on every route with
    parameters, but this API answers malformed requests with 400 in its one
    error shape (``_bad_request``); 422 is reserved for "hostname cannot be served".
    """

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            schema = super().openapi()
            error_ref = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
            for operations in schema["paths"].values():
                for operation in operations.values():
                    responses = operation.get("responses", {})
                    if "HTTPValidationError" in str(responses.get("422", "")):
                        del responses["422"]
                        responses.setdefault("400", {"description": "Malformed request", "content": error_ref})
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            self.openapi_schema = schema
        return self.openapi_schema


def create_admin_app(
    registry: Registry,
    tokens: TokenStore,
    on_registered: Callable[[str], None] | None = None,
    *,
    last_check: Callable[[str], dict[str, Any] | None] | None = None,
    metrics: Callable[[], tuple[bytes, str]] | None = None,
    spool_status: Callable[[], dict[str, Any]] | None = None,
    replay: Callable[[ReplayFilters, bool], Awaitable[dict[str, Any]]] | None = None,
    event_log: EventLog | None = None,
) -> FastAPI:
    """Build the admin app. ``on_registered`` wakes the issuance loop (same process);
    ``last_check`` gives a domain's last probe result; ``metrics`` renders ``/metrics``
    as (body, content type); ``spool_status``/``replay`` back ``GET /v1/spool`` and
    ``POST /v1/replay``."""
    app = _AdminAPI(
        title="edgeproxy admin API",
        version="1",
        description="Register customer domains; the edge obtains and renews their certificates.",
        docs_url=None,
        redoc_url=None,
    )
    bearer = HTTPBearer(auto_error=False)
    def token_ok(authorization: str | None) -> bool:
        scheme, _, supplied = (authorization or "").partition(" ")
        return scheme.lower() == "bearer" and tokens.check(supplied.strip()) is not None

    @app.middleware("http")
    async def require_token_first(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        # Authentication runs before routing and body validation, so that an
        # unauthenticated caller learns nothing from 400/404/405 answers.
        if request.url.path.startswith("/v1/") and not token_ok(request.headers.get("authorization")):
            return _error(401, "unauthorized", "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    # The dependency only declares the bearer scheme in the OpenAPI document;
    # the middleware above enforces it.
    require_token = bearer

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Framework answers (unknown path, wrong method) in our one error shape.
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names only the first route matching the path; RFC 9110
            # section 15.5.6 wants every method the resource supports.
            allowed: set[str] = set()
            for route in app.router.routes:
                match, _ = route.matches(request.scope)
                if match is not Match.NONE:
                    allowed |= getattr(route, "methods", None) or set()
            headers["Allow"] = ", ".join(sorted(allowed))
        return _error(exc.status_code, code, str(exc.detail), headers)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', ()) if p != 'body') or 'body'}: {err.get('msg')}"
            for err in exc.errors()
        )
        return _error(400, "bad_request", f'send JSON like {{"hostname": "cdn.shop.example"}} ({problems})')

    @app.exception_handler(EdgeproxyError)
    async def _edgeproxy_error(_request: Request, exc: EdgeproxyError) -> JSONResponse:
        status = 500
        if isinstance(exc, InvalidHostname):
            status = 422
        elif isinstance(exc, DomainExists):
            status = 409
        elif isinstance(exc, (DomainNotFound, EventNotFound)):
            status = 404
        elif isinstance(exc, StorageUnavailable):
            status = 503
        elif isinstance(exc, LimitReached):
            if exc.retry_after is None:
                return _error(403, exc.code, str(exc))
            return _error(429, exc.code, str(exc), {"Retry-After": str(int(exc.retry_after) + 1)})
        elif exc.code in ("bad_time", "bad_state"):  # POST /v1/replay's --since/--until, GET /v1/events' state
            status = 400
        if status == 500:
            log.error("admin request failed: %s", exc)
        return _error(status, exc.code, str(exc))

    @app.get("/healthz", summary="Liveness: the process answers and its store is readable",
             response_model=None, responses={503: {"description": "Degraded: the store is unreachable"}})
    def healthz() -> Response:
        try:
            registry.storage.get_domain("healthz.invalid")
        except StorageUnavailable as exc:
            # Degraded, not down: TLS, the script and forwarding go on from
            # memory; registrations and issuance wait for the store. 503 takes the node
            # out of a load balancer's admin pool without hiding why.
            return JSONResponse({"status": "degraded", "serving": True,
                                 "error": {"code": exc.code, "message": str(exc)}}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.post(
        "/v1/domains",
        status_code=201,
        response_model=DomainOut,
        dependencies=[Depends(require_token)],
        responses={
            400: {"model": ErrorResponse}, 401: _ERRORS[401],
            409: {"model": ErrorResponse, "description": "Already registered"},
            403: {"model": ErrorResponse, "description": "The edge's domain limit is reached"},
            422: {"model": ErrorResponse, "description": "Hostname cannot be served"},
            429: {"model": ErrorResponse, "description": "Too many registrations; see Retry-After"},
        },
        summary="Register a customer hostname; certificate issuance starts at once",
    )
    def add_domain(body: DomainCreate) -> dict[str, Any]:
        record = registry.add(body.hostname)
        if on_registered is not None:
            on_registered(record.hostname)
        return registry.view(record)

    @app.get("/v1/domains", response_model=DomainList, dependencies=[Depends(require_token)],
             responses={401: _ERRORS[401]})
    def list_domains() -> dict[str, Any]:
        views = [registry.view(r) for r in registry.list()]
        if last_check is not None:
            for view in views:
                view["last_check"] = last_check(view["hostname"])
        return {"domains": views}

    @app.get("/v1/domains/{hostname}", response_model=DomainOut, dependencies=[Depends(require_token)],
             responses=_ERRORS)
    def get_domain(hostname: str) -> dict[str, Any]:
        view = registry.view(registry.get(hostname))
        if last_check is not None:
            view["last_check"] = last_check(view["hostname"])
        return view

    if metrics is not None:
        render_metrics = metrics

        # Like /healthz, no token: loopback listener only, and counts are not secrets
        # (Prometheus scrapes it without credentials).
        @app.get("/metrics", summary="Prometheus metrics of every process of this edge",
                 response_class=Response)
        def get_metrics() -> Response:
            body, content_type = render_metrics()
            return Response(body, media_type=content_type)

    @app.delete("/v1/domains/{hostname}", status_code=204, dependencies=[Depends(require_token)],
                responses=_ERRORS, summary="Remove the domain with its private key and certificate")
    def delete_domain(hostname: str) -> Response:
        registry.remove(hostname)
        return Response(status_code=204)

    @app.post("/v1/domains/{hostname}/retry", response_model=DomainOut, dependencies=[Depends(require_token)],
              responses=_ERRORS, summary="Make the next certificate attempt due now")
    def retry_domain(hostname: str) -> dict[str, Any]:
        record = registry.retry(hostname)
        if on_registered is not None:
            on_registered(record.hostname)
        return registry.view(record)

    @app.get("/v1/domains/{hostname}/history", dependencies=[Depends(require_token)], responses=_ERRORS,
             summary="The domain's status changes, newest first (pending_dns, issuing, active, moved, ...)")
    def domain_history(hostname: str) -> dict[str, Any]:
        return {"hostname": registry.get(hostname).hostname, "history": registry.history(hostname)}
    # -- spool and replay ------------------------------------------------
    if spool_status is not None:
        status_fn = spool_status

        @app.get("/v1/spool", dependencies=[Depends(require_token)], responses={401: _ERRORS[401]},
                 summary="Spool depth, bytes, age of the oldest entry, dead letters")
        def get_spool() -> dict[str, Any]:
            return status_fn()

    if replay is not None:
        replay_fn = replay

        @app.post("/v1/replay", dependencies=[Depends(require_token)], responses={401: _ERRORS[401]},
                  summary="Resend failed-request log entries (same filters as `edgeproxy replay`)")
        async def post_replay(body: ReplayRequest) -> dict[str, Any]:
            filters = ReplayFilters.parse(body.since, body.until, body.domain, body.status,
                                          datetime.now(timezone.utc))
            return await replay_fn(filters, body.dry_run)

    # -- lifecycle webhooks ----------------------------------------------
    if event_log is not None:
        log_fn = event_log

        @app.get("/v1/events", response_model=DeliveryList, dependencies=[Depends(require_token)],
                 responses={400: {"model": ErrorResponse}, 401: _ERRORS[401]},
                 summary="Recent lifecycle webhook deliveries, newest first (same as `edgeproxy events list`)")
        def list_events(request: Request, state: Literal["pending", "delivered", "dead"] | None = None,
                        hostname: str | None = Query(None, min_length=1, max_length=1024),
                        event_id: str | None = Query(None, alias="id", min_length=1, max_length=200),
                        limit: int = Query(100, ge=1, le=1000)) -> Any:
            unknown = sorted(set(request.query_params) - {"state", "hostname", "id", "limit"})
            if unknown:  # a misspelt filter must not silently list everything
                return _error(400, "bad_request", f"unknown query parameter(s) {', '.join(map(repr, unknown))}; "
                                                  "use state, hostname, id, limit")
            return {"deliveries": log_fn.list(state=state, event_id=event_id, hostname=hostname, limit=limit)}

        @app.post("/v1/events/{event_id}/redeliver", response_model=DeliveryList,
                  dependencies=[Depends(require_token)],
                  responses={401: _ERRORS[401], 404: {"model": ErrorResponse, "description": "No such event"}},
                  summary="Send an event again to every endpoint it was for, now, with a fresh retry horizon")
        def redeliver_event(event_id: str) -> dict[str, Any]:
            return {"deliveries": log_fn.redeliver(event_id)}

    return app
