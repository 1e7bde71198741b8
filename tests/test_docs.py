"""/docs and /redoc load nothing from another host: their scripts and styles come from the
service (a catalog's host often has no way out to a CDN)."""

from __future__ import annotations

from html.parser import HTMLParser
from urllib.parse import urlsplit

import pytest

from refrain.service.settings import Settings

from conftest import CKPT_A, LiveServer


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.urls.append(value)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = LiveServer(Settings(data_dir=tmp_path_factory.mktemp("docs") / "data", model=str(CKPT_A)))
    yield srv
    srv.stop()


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_use_only_the_services_own_assets(server, page):
    with server.client() as c:
        r = c.get(page)
        assert r.status_code == 200 and "text/html" in r.headers["content-type"]
        assert "cdn." not in r.text and "fonts.googleapis" not in r.text
        links = _Links()
        links.feed(r.text)
        assets = [u for u in links.urls if u.endswith((".js", ".css", ".png"))]
        assert len(assets) >= (3 if page == "/docs" else 2), links.urls
        for url in assets:
            assert not urlsplit(url).netloc, url  # same host: a path, no scheme or host
            asset = c.get(url)
            assert asset.status_code == 200 and len(asset.content) > 1000, url
        assert "openapi.json" in r.text and c.get("/openapi.json").status_code == 200
