"""docker-compose.yml and Dockerfile: parsed and checked for the services the README promises."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_services_and_volumes():
    c = compose()
    assert {"postgres", "runner", "dashboard"} <= set(c["services"])
    assert "pgdata" in c["volumes"]
    pg = c["services"]["postgres"]
    assert pg["image"].startswith("postgres") and any("pgdata:" in v for v in pg["volumes"])


def test_runner_reserves_a_gpu_and_uses_postgres():
    runner = compose()["services"]["runner"]
    devices = runner["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    cmd = runner["command"]
    assert cmd[:2] == ["run", "experiments/smollm2-default.yaml"]
    assert cmd[cmd.index("--db") + 1].startswith("postgresql+psycopg://")
    assert (ROOT / cmd[1]).exists()
    assert runner["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_dashboard_serves_8501_on_all_interfaces_inside_the_container():
    dash = compose()["services"]["dashboard"]
    ep = dash["entrypoint"]
    assert ep[ep.index("run") + 1] == "dashboard/app.py" and (ROOT / "dashboard/app.py").exists()
    assert ep[ep.index("--server.address") + 1] == "0.0.0.0"
    assert ep[ep.index("--server.port") + 1] == "8501"
    assert dash["environment"]["HARNESS_DB"].startswith("postgresql+psycopg://")
    assert any(p.endswith("8501:8501") for p in dash["ports"])


def test_commands_parse_with_the_cli():
    from harness.cli import build_parser

    c = compose()["services"]
    build_parser().parse_args(c["runner"]["command"])


def test_dockerfile_installs_the_harness():
    text = (ROOT / "Dockerfile").read_text()
    assert 'pip install -e ".[postgres]"' in text and 'ENTRYPOINT ["harness"]' in text
    assert "EXPOSE 8501" in text
