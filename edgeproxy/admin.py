"""The admin API: JSON over HTTP on ``listen.admin`` only, bearer-token auth.

Owns: routes, request/response schemas (OpenAPI at ``/openapi.json``), the token
file, and the mapping of our exceptions to HTTP statuses. Every route calls the
same ``Registry`` functions as the CLI.
Must not import: storage backends, ``acme``.

The app is mounted on its own loopback listener by ``server.py`` and never on
the public sockets: the public ASGI app has no route that reaches it.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from datetime import datetime, timezone
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from .errors import (
    DomainExists,
    DomainNotFound,
    EdgeproxyError,
    InvalidHostname,
    StorageUnavailable,
)
from .registry import Registry
from .spool import ReplayFilters, parse_time

__all__ = ["create_admin_app", "load_or_create_token"]

log = logging.getLogger("edgeproxy.admin")


def load_or_create_token(path: str) -> str:
    """Read the admin token; on first start create one (0600) so that a fresh
    install is never left open. Operators read it from the file."""
    file = Path(path)
    if file.exists():
        token = file.read_text().strip()
        if len(token) < 16:
            raise EdgeproxyError(f"admin token in {path} is shorter than 16 characters", code="config")
        return token
    file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = secrets.token_urlsafe(32)
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    log.warning("created admin token file %s", path)
    return token


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


class DomainList(BaseModel):
    domains: list[DomainOut]


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "Not registered"},
    401: {"model": ErrorResponse, "description": "Missing or wrong bearer token"},
}


class ReplayRequest(BaseModel):
    since: str | None = Field(None, description="ISO-8601, or an age such as 12h or 7d")
    until: str | None = None
    domain: str | None = None
    status: int | None = None
    dry_run: bool = False


def create_admin_app(
    registry: Registry,
    token: str,
    on_registered: Callable[[str], None] | None = None,
    *,
    spool_status: Callable[[], dict[str, Any]] | None = None,
    replay: Callable[[ReplayFilters, bool], Awaitable[dict[str, Any]]] | None = None,
) -> FastAPI:
    """Build the admin app. ``on_registered`` wakes the issuance loop (same process);
    ``spool_status``/``replay`` (issue 3) back ``GET /v1/spool`` and ``POST /v1/replay``."""
    app = FastAPI(
        title="edgeproxy admin API",
        version="1",
        description="Register customer domains; the edge obtains and renews their certificates.",
        docs_url=None,
        redoc_url=None,
    )
    bearer = HTTPBearer(auto_error=False)
    expected = token.encode()

    def require_token(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        supplied = credentials.credentials.encode() if credentials else b""
        # compare_digest: the time taken does not reveal how much of the token matched.
        if not credentials or not hmac.compare_digest(supplied, expected):
            raise _Unauthorized()

    class _Unauthorized(Exception):
        pass

    @app.exception_handler(_Unauthorized)
    async def _unauthorized(_request: Request, _exc: _Unauthorized) -> JSONResponse:
        return _error(401, "unauthorized", "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})

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
        elif isinstance(exc, DomainNotFound):
            status = 404
        elif isinstance(exc, StorageUnavailable):
            status = 503
        elif exc.code == "bad_time":  # issue 3: an unreadable --since/--until in POST /v1/replay
            status = 400
        if status == 500:
            log.error("admin request failed: %s", exc)
        return _error(status, exc.code, str(exc))

    @app.get("/healthz", summary="Liveness: the process answers and its store is readable")
    def healthz() -> dict[str, Any]:
        registry.storage.get_domain("healthz.invalid")  # raises StorageUnavailable -> 503
        return {"status": "ok"}

    @app.post(
        "/v1/domains",
        status_code=201,
        response_model=DomainOut,
        dependencies=[Depends(require_token)],
        responses={
            400: {"model": ErrorResponse}, 401: _ERRORS[401],
            409: {"model": ErrorResponse, "description": "Already registered"},
            422: {"model": ErrorResponse, "description": "Hostname cannot be served"},
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
        return {"domains": [registry.view(r) for r in registry.list()]}

    @app.get("/v1/domains/{hostname}", response_model=DomainOut, dependencies=[Depends(require_token)],
             responses=_ERRORS)
    def get_domain(hostname: str) -> dict[str, Any]:
        return registry.view(registry.get(hostname))

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

    # -- BEGIN issue 3: spool and replay ------------------------------------------------
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
            now = datetime.now(timezone.utc)
            filters = ReplayFilters(
                since=parse_time(body.since, now) if body.since else None,
                until=parse_time(body.until, now) if body.until else None,
                domain=body.domain.lower().rstrip(".") if body.domain else None,
                status=body.status,
            )
            return await replay_fn(filters, body.dry_run)
    # -- END issue 3 -------------------------------------------------------------------

    return app
