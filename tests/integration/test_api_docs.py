"""/docs and /redoc work offline: the pages and every asset they reference come from the
service itself (an installed package's files, no CDN), and Swagger UI renders the schema
in a real headless Chromium that is refused every request to another host."""

from __future__ import annotations

import re
from urllib.parse import urljoin, urlsplit

import httpx
from helpers import ServiceProcess
from helpers.browser import CHROMIUM_ARGS, chromium

# src="…", href="…", and the schema's url: '…' in Swagger UI's and ReDoc's init scripts
REFERENCE = re.compile(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""")


def references(html: str) -> list[str]:
    return REFERENCE.findall(html)


def test_docs_pages_and_their_assets_load_from_the_service(service: ServiceProcess) -> None:
    for page, expected in (
        ("/docs", {"swagger-ui-bundle.js", "swagger-ui.css", "openapi.json"}),
        ("/redoc", {"redoc.standalone.js", "openapi.json"}),
    ):
        r = httpx.get(f"{service.http}{page}", timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        refs = references(r.text)
        assert {ref.rsplit("/", 1)[-1] for ref in refs} >= expected, refs
        assert "cdn" not in r.text.lower() and "fonts.googleapis" not in r.text
        for ref in refs:
            url = urljoin(f"{service.http}{page}", ref)
            assert urlsplit(url).netloc == urlsplit(service.http).netloc, (page, ref)
            asset = httpx.get(url, timeout=10)
            assert asset.status_code == 200 and len(asset.content) > 0, (page, ref)


def test_swagger_ui_renders_without_internet(service: ServiceProcess) -> None:
    browser_path = chromium()
    from playwright.sync_api import Route, sync_playwright

    own = urlsplit(service.http).netloc
    refused: list[str] = []

    def only_the_service(route: Route) -> None:
        if urlsplit(route.request.url).netloc == own:
            route.continue_()
        else:  # what a machine without internet would do
            refused.append(route.request.url)
            route.abort()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.route("**/*", only_the_service)
            page.goto(f"{service.http}/docs")
            # one block per operation, rendered from /openapi.json
            page.wait_for_selector(".opblock-summary-path[data-path='/metrics']", timeout=20_000)
            assert page.locator(".opblock").count() >= 6
            assert refused == [] and errors == []
        finally:
            browser.close()


def test_schema_declares_outages_the_event_stream_and_examples(service: ServiceProcess) -> None:
    schema = httpx.get(f"{service.http}/openapi.json", timeout=10).json()
    components = schema["components"]["schemas"]

    def has_example(media: dict[str, object]) -> bool:
        if "example" in media or "examples" in media:
            return True
        ref = media.get("schema", {}).get("$ref", "")  # type: ignore[attr-defined]
        return "examples" in components.get(ref.rsplit("/", 1)[-1], {})

    for path, operations in schema["paths"].items():
        for method, op in operations.items():
            for status, response in op["responses"].items():
                if status == "422":  # FastAPI's validation error, the same everywhere
                    continue
                for media_type, media in response.get("content", {}).items():
                    assert has_example(media), (method, path, status, media_type)
    for path in ("/metrics", "/metrics/{device_id}"):
        outage = schema["paths"][path]["get"]["responses"]["503"]
        assert "Retry-After" in outage["headers"], path
    stream = schema["paths"]["/stream"]["get"]["responses"]["200"]["content"]
    assert list(stream) == ["text/event-stream"]
