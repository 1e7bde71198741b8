"""Monitoring checked against a real Prometheus (Debian's `prometheus`, on loopback): it
scrapes a running API and inference worker with the jobs and alert rules of
`deploy/prometheus/`, and after some traffic every Grafana panel query and every alert
expression evaluates without error, and the traffic panels have data."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from test_worker_remote import TOKEN, Process

from conftest import CKPT_A, free_port
from helpers import encode, synth_song

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS = shutil.which("prometheus")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(PROMETHEUS is None, reason="needs the prometheus server (Debian package)"),
]
# panels that must show data once the API has served requests
TRAFFIC = (
    "Request rate per route",
    "Responses by status",
    "Latency per route (p50 / p99)",
    "Ready processes",
    "Tracks",
)


def loopback_config(api: str, worker: str, out: Path) -> Path:
    """deploy/prometheus/prometheus.yml with its targets on loopback and a 1 s scrape."""
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert {"refrain-api", "refrain-worker"} <= set(jobs)
    jobs["refrain-api"]["static_configs"] = [{"targets": [api]}]
    jobs["refrain-worker"].pop("dns_sd_configs", None)
    jobs["refrain-worker"]["static_configs"] = [{"targets": [worker]}]
    if "prometheus" in jobs:
        config["scrape_configs"].remove(jobs["prometheus"])
    shutil.copy(ROOT / "deploy" / "prometheus" / "alerts.yml", out / "alerts.yml")
    path = out / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def panel_queries() -> list[tuple[str, str]]:
    board = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "refrain.json").read_text())
    return [(p["title"], t["expr"]) for p in board["panels"] for t in p.get("targets", [])]


def alert_exprs() -> list[tuple[str, str]]:
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    return [
        (r.get("alert") or r.get("record"), r["expr"]) for g in rules["groups"] for r in g["rules"]
    ]


def test_dashboard_and_alerts_evaluate_on_live_metrics(tmp_path):
    env = {"REFRAIN_WORKER_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}
    worker = Process(
        ["worker", "--port", str(free_port()), "--model", str(CKPT_A)], env, tmp_path / "worker.log"
    )
    api = prom = None
    try:
        api = Process(
            [
                "serve",
                "--port",
                str(free_port()),
                "--data",
                str(tmp_path / "data"),
                "--model",
                str(CKPT_A),
                "--open-writes",
            ],
            {**env, "REFRAIN_WORKER_URLS": worker.url},
            tmp_path / "api.log",
        )
        port = free_port()
        config = loopback_config(api.url[len("http://") :], worker.url[len("http://") :], tmp_path)
        prom = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=(tmp_path / "prometheus.log").open("wb"),
        )
        base = f"http://127.0.0.1:{port}"

        def query(expr: str) -> dict:
            r = httpx.get(base + "/api/v1/query", params={"query": expr}, timeout=10)
            return r.json()

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # both targets up
            try:
                # Prometheus answers 503 "Service Unavailable" until its storage is ready
                if httpx.get(base + "/-/ready", timeout=10).status_code != 200:
                    time.sleep(0.5)
                    continue
                up = query('up{job=~"refrain-.*"}').get("data", {}).get("result", [])
                if len(up) == 2 and all(s["value"][1] == "1" for s in up):
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail(f"targets not up: {(tmp_path / 'prometheus.log').read_text()[-2000:]}")

        with httpx.Client(base_url=api.url, timeout=120) as c:  # traffic
            for k in range(2):
                song = encode(synth_song(25.0, seed=80 + k), "flac")
                r = c.post(
                    "/v1/tracks", files={"audio": (f"s{k}.flac", song)}, data={"track_id": f"s{k}"}
                )
                assert r.status_code == 201, r.text
            clip = encode(synth_song(25.0, seed=80)[: 10 * 44100], "wav")
            for _ in range(3):
                assert c.post("/v1/search", files={"audio": ("q.wav", clip)}).status_code == 200
            assert c.get("/v1/tracks/nope").status_code == 404
        time.sleep(6)  # a few scrapes after the traffic

        failures, empty = {}, []
        for title, expr in panel_queries():
            result = query(expr.replace("$__rate_interval", "30s"))
            if result.get("status") != "success":
                failures[title] = result.get("error")
            elif title in TRAFFIC and not result["data"]["result"]:
                empty.append(title)
        for name, expr in alert_exprs():
            result = query(expr)
            if result.get("status") != "success":
                failures[name] = result.get("error")
        assert failures == {} and empty == []
        rules = httpx.get(base + "/api/v1/rules", timeout=10).json()["data"]["groups"]
        health = {r["name"]: r["health"] for g in rules for r in g["rules"]}
        assert health and all(h in ("ok", "unknown") for h in health.values()), health
    finally:
        if prom is not None:
            prom.terminate()
            prom.wait(timeout=30)
        for p in (api, worker):
            if p is not None:
                p.stop()
