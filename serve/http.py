"""HTTP hardening shared by every program server: size cap, short errors, bearer auth, offline docs.

    >>> app = FastAPI(docs_url=None)
    >>> harden(app, max_body_bytes=4 << 20)          # 413 past 4 MiB, short 422s, /docs served offline

* :class:`BodySizeLimit` - pure ASGI middleware: 413 before the body is parsed,
  from ``Content-Length`` or, for chunked uploads, as soon as the streamed body
  passes the cap (never buffering more than the cap);
* :func:`short_validation_errors` - a 422 names each bad field and the rule it
  broke (``loc``, ``msg``, ``type``, and the limit from ``ctx``) but never
  echoes the input back; the whole body stays under 2 KB;
* :func:`bearer_auth` - ``Authorization: Bearer <token>`` (the scheme in any
  case, RFC 7235), compared in constant time, declared in the OpenAPI document;
* :func:`mount_offline_docs` - Swagger UI 5 from the assets the
  ``fastapi-offline`` package ships, so ``/docs`` renders with no internet.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
import json
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

MAX_ERROR_BYTES = 2048
MAX_ERRORS = 10

class FieldError(BaseModel):
    loc: list[str | int] = Field(..., description="Where: body, then the field path")
    msg: str = Field(..., description="What is wrong (never the value sent)")
    type: str = Field(..., description="The rule's id, e.g. string_too_long")
    ctx: dict[str, Any] | None = Field(None, description="The rule's limits, e.g. {max_length: 200000}")


class ValidationErrors(BaseModel):
    detail: list[FieldError]
    more_errors: int | None = Field(None, description="Errors left out to keep the answer short")


class ErrorDetail(BaseModel):
    detail: str


# Documented on every program route (FastAPI adds 200 itself).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorDetail, "description": "Missing or wrong bearer token (only when SERVE_API_TOKEN is set)"},
    413: {"model": ErrorDetail, "description": "Request body larger than the server's limit"},
    422: {"model": ValidationErrors, "description": "A field is missing or breaks its rule; the input is not echoed"},
    502: {"model": ErrorDetail, "description": "The LM endpoint still failed after retries; the detail says why"},
    503: {"description": "Overloaded: too many queued requests; retry after the Retry-After header's seconds"},
}


class BodySizeLimit:
    """ASGI middleware answering 413 for request bodies over ``max_bytes``, before anything parses them."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._reject(send)
        seen = 0
        rejected = False

        async def limited_receive():
            # A streamed (chunked) body is counted as it arrives: past the cap, answer 413 at once and tell the
            # app the client went away, so nothing parses what was received.
            nonlocal seen, rejected
            if rejected:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    rejected = True
                    await self._reject(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if not rejected:
                await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not rejected:
                raise

    async def _reject(self, send) -> None:
        body = json.dumps({"detail": f"request body larger than {self.max_bytes} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def describe_errors(errors: list[dict[str, Any]], prefix: tuple = ()) -> list[dict[str, Any]]:
    """Pydantic/FastAPI errors without their ``input`` (and without long values in ``ctx``)."""
    out = []
    for err in errors[:MAX_ERRORS]:
        item = {"loc": [*prefix, *err.get("loc", ())], "msg": str(err.get("msg", ""))[:200],
                "type": err.get("type", "")}
        ctx = {k: v for k, v in (err.get("ctx") or {}).items()
               if isinstance(v, (int, float, bool)) or (isinstance(v, str) and len(v) <= 80)}
        if ctx:
            item["ctx"] = ctx
        out.append(item)
    return out


def short_detail(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """At most MAX_ERRORS errors, trimmed until the JSON is under MAX_ERROR_BYTES."""
    detail = describe_errors(errors)
    while len(json.dumps({"detail": detail})) > MAX_ERROR_BYTES and len(detail) > 1:
        detail.pop()
    return detail


async def short_validation_errors(request: Request, exc: RequestValidationError) -> JSONResponse:
    detail = short_detail(list(exc.errors()))
    extra = len(exc.errors()) - len(detail)
    body: dict[str, Any] = {"detail": detail}
    if extra > 0:
        body["more_errors"] = extra
    return JSONResponse(status_code=422, content=body)


def bearer_auth(token: str | None):
    """A FastAPI dependency requiring ``Authorization: Bearer <token>`` when ``token`` is set.

    The scheme is declared with FastAPI's ``HTTPBearer``, so the OpenAPI document of
    the routes that use it lists it; the comparison is constant-time.
    """
    scheme = HTTPBearer(auto_error=False, description="SERVE_API_TOKEN, when the server was started with one")
    expected = hashlib.sha256(token.encode()).digest() if token else b""

    async def check(credentials: HTTPAuthorizationCredentials | None = Security(scheme)) -> None:
        if not token:
            return
        given = credentials.credentials.strip() if credentials else ""
        # Digests of equal length: the comparison's time says nothing about the token or its length.
        if not hmac.compare_digest(hashlib.sha256(given.encode()).digest(), expected):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    return check


def docs_assets() -> Path:
    """The folder of Swagger UI's JS and CSS inside the installed ``fastapi-offline`` package.

    (Swagger UI 5: FastAPI's OpenAPI 3.1 documents need it; 4.x shows "Unable to render".)"""
    spec = importlib.util.find_spec("fastapi_offline")
    folder = Path(next(iter(spec.submodule_search_locations))) / "static" if spec and spec.submodule_search_locations \
        else None
    if folder is None or not (folder / "swagger-ui-bundle.js").is_file():
        raise RuntimeError("the API docs need the 'fastapi-offline' package's assets; reinstall the project")
    return folder


def mount_offline_docs(app: FastAPI, title: str) -> None:
    """``/docs`` with Swagger UI's JS and CSS served from this server, not a CDN.

    Every URL is built from the request's ``root_path``, as FastAPI does for its own docs, so the page
    also works behind a Serve route prefix or a proxy."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles

    app.mount("/docs-assets", StaticFiles(directory=docs_assets()), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request):
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(openapi_url=f"{root}{app.openapi_url}", title=f"{title} - API",
                                   swagger_js_url=f"{root}/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url=f"{root}/docs-assets/swagger-ui.css",
                                   swagger_favicon_url=f"{root}/docs-assets/favicon.png")


def harden(app: FastAPI, *, max_body_bytes: int, title: str = "program") -> None:
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    app.add_exception_handler(RequestValidationError, short_validation_errors)
    mount_offline_docs(app, title)


def request_body_schema(model: type) -> dict[str, Any]:
    """``openapi_extra`` declaring ``model`` as a route's JSON body (for routes that read the body themselves)."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def add_component_schemas(app: FastAPI, *models: type) -> None:
    """Put ``models`` (and the models they use) into the OpenAPI components, next to FastAPI's own."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in models:
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, sub in body.pop("$defs", {}).items():
                components.setdefault(name, sub)
            components.setdefault(model.__name__, body)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
