"""Who may read: bearer tokens on every data route, and the dashboard's login cookie.

Scopes: `read` for /metrics, /metrics/{id} and /stream; `admin` for /stats. /healthz,
/readyz, /docs and /openapi.json stay open (probes; the schema is no secret).

The dashboard cannot send a header on an EventSource, so POST /login checks a token and
sets it in a cookie the server accepts in place of the header: HttpOnly (page scripts
never see it), SameSite=Strict (no other site's page makes the browser send it, which is
the CSRF defence: every route that accepts it is a read), Secure when the service serves
TLS, Path=/, and no Max-Age (it ends with the browser session). The cookie holds the
secret itself, so a token removed from the auth file stops working for the browser too.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request, Security
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from rtmonitor.api.deps import ApiDep, ApiState
from rtmonitor.api.schemas import Problem
from rtmonitor.auth import SECRET_MAX, AuthError, Principal, Scope, require

SURFACE = "http"
COOKIE = "rtm_session"

# The scheme shown in /docs: Swagger UI's Authorize button sends `Authorization: Bearer`.
bearer = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    description="A token of the service's --auth-file (`rtmonitor token new`).",
)

REFUSALS: dict[int | str, dict[str, object]] = {
    401: {"model": Problem, "description": "No token, or an unknown one."},
    403: {"model": Problem, "description": "The token lacks the scope this route needs."},
}


def _client(request: Request) -> str:
    return request.client.host if request.client is not None else ""


def _refuse(api: ApiState, request: Request, exc: AuthError) -> HTTPException:
    api.auth.refuse(SURFACE, _client(request), exc)
    if exc.status == "unauthenticated":
        return HTTPException(401, exc.message, headers={"WWW-Authenticate": "Bearer"})
    return HTTPException(403, exc.message)


def _authenticate(api: ApiState, request: Request, scope: Scope) -> Principal:
    header = request.headers.get("authorization")
    # The login cookie stands in for the header on the read routes only (EventSource sends
    # no header); /stats wants the header, whatever token the browser logged in with.
    if header is None and scope == "read" and (cookie := request.cookies.get(COOKIE)):
        header = f"Bearer {cookie}"
    try:
        principal = api.auth.authenticate(header)
        require(principal, scope)
    except AuthError as exc:
        raise _refuse(api, request, exc) from None
    return principal


async def read_access(
    request: Request,
    api: ApiDep,
    _: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
) -> Principal:
    """A token with the `read` scope (header or login cookie)."""
    return _authenticate(api, request, "read")


async def admin_access(
    request: Request,
    api: ApiDep,
    _: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
) -> Principal:
    """A token with the `admin` scope, in the header (never the login cookie)."""
    return _authenticate(api, request, "admin")


ReadDep = Annotated[Principal, Depends(read_access)]
AdminDep = Annotated[Principal, Depends(admin_access)]


class Login(BaseModel):
    token: str = Field(min_length=1, max_length=SECRET_MAX, description="The token's secret.")


router = APIRouter(tags=["session"])


@router.post(
    "/login",
    status_code=204,
    summary="Dashboard login: keep a read token in a session cookie",
    responses=REFUSALS,
)
async def login(body: Login, request: Request, api: ApiDep) -> Response:
    """Checks the token (it needs the `read` scope) and sets it in an HttpOnly,
    SameSite=Strict session cookie that the read routes accept in place of the header
    (EventSource cannot send headers)."""
    try:
        require(api.auth.authenticate_secret(body.token), "read")
    except AuthError as exc:
        raise _refuse(api, request, exc) from None
    response = Response(status_code=204)
    if api.auth.enabled:
        response.set_cookie(
            COOKIE,
            body.token,
            httponly=True,
            samesite="strict",
            secure=api.secure_cookies,
            path="/",
        )
    return response


@router.post("/logout", status_code=204, summary="Dashboard logout: drop the session cookie")
async def logout(api: ApiDep) -> Response:
    response = Response(status_code=204)
    response.delete_cookie(
        COOKIE, httponly=True, samesite="strict", secure=api.secure_cookies, path="/"
    )
    return response
