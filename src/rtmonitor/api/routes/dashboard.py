"""The web dashboard: static files, no build step."""

from __future__ import annotations

import pathlib

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = pathlib.Path(__file__).resolve().parents[1] / "static"

router = APIRouter(include_in_schema=False)


@router.get("/")
async def dashboard() -> FileResponse:
    """The web dashboard (static files, no build step)."""
    return FileResponse(STATIC / "index.html")


def static_files() -> StaticFiles:
    """What the app mounts at /static (a router cannot carry a mount)."""
    return StaticFiles(directory=STATIC)
