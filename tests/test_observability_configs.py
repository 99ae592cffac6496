"""The generated Grafana dashboard and Prometheus alert rules: current, well-formed, and
referring only to series the exporter really exports. No Grafana server exists here, so the
dashboard's structure is checked directly; PromQL is parsed by promtool."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fljob.backends.kubernetes_render import objects
from fljob.cli import main
from fljob.observability import alerts, dashboards, series
from fljob.observability.series import JOB_ENV, RUN_ID_ENV
from fljob.spec.models import JobSpec

REPO = Path(__file__).resolve().parents[1]
GRAFANA = REPO / "configs" / "grafana"
PROM = REPO / "configs" / "prometheus"
UPDATE = os.environ.get("FLJOB_UPDATE_GOLDEN") == "1"
needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool missing (Debian package prometheus)")

GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range"}


def _check_current(path: Path, text: str) -> None:
    if UPDATE:
        path.write_text(text, encoding="utf-8")
    assert path.read_text(encoding="utf-8") == text, (
        f"{path.relative_to(REPO)} is stale: regenerate with "
        "FLJOB_UPDATE_GOLDEN=1 pytest tests/test_observability_configs.py")


def test_committed_dashboard_files_are_current():
    for name, text in dashboards.rendered_files().items():
        _check_current(GRAFANA / name, text)


def test_committed_alert_rules_are_current():
    _check_current(PROM / "alerts.yml", alerts.alert_rules_text())


def test_fljob_dashboard_writes_the_committed_files(tmp_path, capsys):
    assert main(["dashboard", "-o", str(tmp_path / "out")]) == 0
    written = capsys.readouterr().out.split()
    assert sorted(Path(p).name for p in written) == sorted(p.name for p in GRAFANA.iterdir())
    for p in written:
        assert Path(p).read_text() == (GRAFANA / Path(p).name).read_text()


def test_fljob_dashboard_does_not_import_torch(tmp_path):
    code = ("import sys; from fljob.cli import main; main(['dashboard', '-o', sys.argv[1]]); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=60)


def _panels() -> list[dict]:
    return dashboards.training_dashboard()["panels"]


def test_panel_ids_unique_and_grid_positions_do_not_overlap():
    panels = _panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= dashboards.GRID_WIDTH, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]


def test_every_target_has_expr_and_unique_ref_id_and_uses_the_datasource_variable():
    dashboard = dashboards.training_dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    data_panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert data_panels
    for p in data_panels:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], p["title"]
        assert p["fieldConfig"]["defaults"]["unit"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)) and all(refs), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip(), p["title"]
            assert t["datasource"]["uid"] == "${datasource}", p["title"]


def _variables_used(text: str) -> set[str]:
    return set(re.findall(r"\$\{?(\w+)", text))


def test_variables_used_exist_and_job_run_id_are_offered():
    dashboard = dashboards.training_dashboard()
    defined = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "job", "run_id"} <= defined
    texts = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    texts += [v.get("definition", "") for v in dashboard["templating"]["list"]]
    used = set().union(*map(_variables_used, texts))
    assert used - GRAFANA_BUILTINS <= defined, used - GRAFANA_BUILTINS - defined
    for p in dashboard["panels"]:
        for t in p.get("targets", []):
            assert 'job=~"$job"' in t["expr"] and 'run_id=~"$run_id"' in t["expr"], t["expr"]


def test_queries_and_rules_name_only_exported_series():
    exported = series.exposed_names()
    exprs = [t["expr"] for p in _panels() for t in p.get("targets", [])]
    exprs += [r["expr"] for g in alerts.alert_rules()["groups"] for r in g["rules"]]
    for expr in exprs:
        for name in re.findall(r"\bfljob_\w+", expr):
            assert name in exported, f"{name} in {expr!r} is not exported"


def test_issue_panels_are_present():
    titles = " | ".join(p["title"].lower() for p in _panels())
    for wanted in ("loss", "held-out loss", "learning rate", "tokens/s", "mfu", "step time p50 / p95",
                   "gradient norm", "update / parameter", "moment", "data wait",
                   "checkpoint age", "device memory", "goodput", "restarts", "lost steps",
                   "start-up time", "checkpoint blocking", "productive, checkpoint and wall time"):
        assert wanted in titles, wanted


def test_configmap_carries_the_sidecar_label_and_the_dashboard():
    files = dashboards.rendered_files(namespace="monitoring")
    cm = yaml.safe_load(files[dashboards.CONFIGMAP_FILE])
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["data"][dashboards.DASHBOARD_FILE] == files[dashboards.DASHBOARD_FILE]
    provider = yaml.safe_load(files[dashboards.PROVISIONING_FILE])["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"] == dashboards.PROVISIONED_PATH


@needs_promtool
def test_every_panel_query_parses_as_promql(tmp_path):
    """promtool parses expressions only inside rules: each query becomes a recording rule
    (Grafana's variables replaced by values, as Grafana does before sending it)."""
    rules = []
    for p in _panels():
        for t in p.get("targets", []):
            expr = (t["expr"].replace("$__rate_interval", "1m").replace("$job", ".*")
                    .replace("$run_id", ".*"))
            rules.append({"record": f"fljob:panel_{p['id']}_{t['refId']}", "expr": expr})
    path = tmp_path / "panels.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    proc = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_promtool
def test_promtool_checks_the_alert_rules_and_their_unit_tests():
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"],
                 ["check", "config", "prometheus.yml"]):
        proc = subprocess.run(["promtool", *args], cwd=PROM, capture_output=True, text=True,
                              timeout=120, check=False)
        assert proc.returncode == 0, f"promtool {' '.join(args)}:\n{proc.stdout}{proc.stderr}"


def test_kubernetes_pod_monitor_scrapes_the_exporter_with_the_selected_release_label():
    """The contract between the renderer and the exporter: kube-prometheus-stack selects the
    PodMonitor by its `release` label, which scrapes the master's port that rank 0 serves,
    keeping the job/run_id labels the exporter reads from the pod's environment."""
    spec = JobSpec.model_validate({
        "name": "demo", "image": "registry.example/fljob:1", "metrics": {"port": 19463},
        "kubernetes": {"pod_monitor": {"labels": {"release": "monitoring"}}}})
    by_kind = {o["kind"]: o for o in objects(spec)}
    monitor = by_kind["PodMonitor"]
    assert monitor["metadata"]["labels"]["release"] == "monitoring"
    master = by_kind["PyTorchJob"]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= master["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics" and endpoint["honorLabels"] is True
    container = master["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports[endpoint["port"]] == spec.metrics.port
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env[JOB_ENV] == "demo" and env[RUN_ID_ENV]
