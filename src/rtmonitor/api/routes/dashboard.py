"""The web dashboard: static files, no build step."""

from __future__ import annotations

import pathlib

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = pathlib.Path(__file__).resolve().parents[1] / "static"

router = APIRouter(include_in_schema=False)


# The page has a login form that takes a token: no other site may show it in a frame
# (clickjacking). Both headers: CSP for current browsers, X-Frame-Options for older ones.
NO_FRAMING = {
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "frame-ancestors 'none'",
}


@router.get("/")
async def dashboard() -> FileResponse:
    """The web dashboard (static files, no build step)."""
    return FileResponse(STATIC / "index.html", headers=NO_FRAMING)


def static_files() -> StaticFiles:
    """What the app mounts at /static (a router cannot carry a mount)."""
    return StaticFiles(directory=STATIC)
