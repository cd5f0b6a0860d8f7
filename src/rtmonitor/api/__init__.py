"""The HTTP/JSON API (FastAPI): metrics, health and readiness."""
