"""The OpenAPI document describes the live API: generated requests against a running server
(schemathesis) get responses whose status, content type, headers and body the document lists.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from conftest import CKPT_A, LiveServer
from helpers import encode, synth_song

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.checks import positive_data_acceptance  # noqa: E402

KEY = {"Authorization": "Bearer k1"}
EXAMPLES = 150  # per operation: about 1,000 generated requests over the 11 operations


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from refrain.service.settings import Settings

    data = tmp_path_factory.mktemp("openapi") / "data"
    srv = LiveServer(
        Settings(data_dir=data, model=str(CKPT_A), api_keys="k1", job_retention_hours=0)
    )
    with srv.client(headers=KEY) as c:
        r = c.post(
            "/v1/tracks",
            files={"audio": ("t.wav", encode(synth_song(30.0, seed=3), "wav"))},
            data={"track_id": "seed"},
        )
        assert r.status_code == 201, r.text
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


def test_the_document_lists_statuses_errors_and_security(server):
    import httpx

    doc = httpx.get(server.url + "/openapi.json").json()
    ops = doc["paths"]
    add = ops["/v1/tracks"]["post"]["responses"]
    assert {"200", "201", "401", "403", "413", "415", "409", "422", "503", "507"} <= set(add)
    assert add["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    assert set(doc["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    assert list(ops["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    assert ops["/v1/ingest"]["post"]["responses"]["202"]["content"]["application/json"]
    for path, methods in ops.items():
        for method, op in methods.items():
            for status, response in op["responses"].items():
                if path != "/metrics":
                    assert "schema" in response["content"]["application/json"], (
                        path,
                        method,
                        status,
                    )


@pytest.mark.slow
def test_live_responses_conform_to_the_document(server, api_schema):
    """Every operation, EXAMPLES generated requests each (valid and invalid), over real HTTP;
    every check schemathesis has (no 5xx, documented status, content type, headers, body),
    but one: a schema cannot say "decodable audio", so a schema-valid upload of random bytes
    is rightly refused (422 bad_audio), which `positive_data_acceptance` would count."""
    failures: dict[str, str] = {}
    calls: list[str] = []

    def run(operation) -> None:
        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def call(case):
            calls.append(operation.label)
            case.call_and_validate(
                base_url=server.url, headers=KEY, excluded_checks=[positive_data_acceptance]
            )

        try:
            call()
        except (Exception, BaseExceptionGroup) as e:  # noqa: BLE001 - every operation runs
            failures[operation.label] = f"{type(e).__name__}: {e}"[:2000]

    for result in api_schema.get_all_operations():
        run(result.ok())
    print(f"{len(calls)} generated requests over {len(set(calls))} operations")
    assert failures == {}
    assert len(set(calls)) >= 11
