"""`fljob doctor` against the real things it asks: the project's SLURM cluster, the Swift S3
server, kubectl with no cluster behind it, and a PATH without the tools."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

FLJOB = Path(sys.executable).parent / "fljob"
PARTITION = "fljob-doctor"
PARTITION_MAX_TIME = "00:10:00"
# Ports for "nothing listens here" (an unreachable S3 endpoint or API server): this test's range.
UNUSED_PORTS = range(18595, 18600)


def doctor(env: dict[str, str], folder: Path, spec: str, *args: str) -> subprocess.CompletedProcess[str]:
    path = folder / "spec.yaml"
    path.write_text(spec)
    return subprocess.run([str(FLJOB), "doctor", *args, str(path)], env=env, capture_output=True,
                          text=True, timeout=120, check=False)


def line(out: str, status: str, name: str) -> str:
    """The check's line and, when there is one, its fix line."""
    lines = out.splitlines()
    for i, text in enumerate(lines):
        if text.startswith(f"{status}  {name}"):
            fix = lines[i + 1] if i + 1 < len(lines) and "fix:" in lines[i + 1] else ""
            return f"{text}\n{fix}"
    raise AssertionError(f"no {status} line for {name!r} in:\n{out}")


def unused_port() -> int:
    for port in UNUSED_PORTS:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return port
    pytest.skip(f"every port in {UNUSED_PORTS} is in use")


# --------------------------------------------------------------------------- SLURM


@pytest.fixture(scope="module")
def short_partition(slurm_cluster):
    """A partition with a 10-minute MaxTime, made in the running controller and removed after."""
    env = slurm_cluster
    subprocess.run(["scontrol", "delete", f"PartitionName={PARTITION}"], env=env,
                   capture_output=True, check=False)
    made = subprocess.run(["scontrol", "create", f"PartitionName={PARTITION}", "Nodes=ALL",
                           f"MaxTime={PARTITION_MAX_TIME}", "State=UP"],
                          env=env, capture_output=True, text=True, check=False)
    assert made.returncode == 0, made.stderr
    yield env
    subprocess.run(["scontrol", "delete", f"PartitionName={PARTITION}"], env=env,
                   capture_output=True, check=False)


def slurm_spec(time: str = "00:05:00", nodes: int = 1, partition: str = PARTITION, extra: str = "") -> str:
    return (f"name: doctor\nresources: {{nodes: {nodes}}}\n"
            f"slurm:\n  partition: {partition}\n  time: '{time}'\n{extra}")


def test_spec_within_partition_limits_passes(short_partition, tmp_path):
    proc = doctor(short_partition, tmp_path, slurm_spec(), "--backend", "slurm")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS  slurm tools" in proc.stdout
    assert f"within MaxTime {PARTITION_MAX_TIME}" in line(proc.stdout, "PASS", "partition time limit")
    assert "FAIL" not in proc.stdout


def test_time_over_partition_limit_fails_with_the_fix(short_partition, tmp_path):
    proc = doctor(short_partition, tmp_path, slurm_spec(time="1-00:00:00"), "--backend", "slurm")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    found = line(proc.stdout, "FAIL", "partition time limit")
    assert f"exceeds partition {PARTITION}'s MaxTime {PARTITION_MAX_TIME}" in found
    assert f"fix: set slurm.time to at most {PARTITION_MAX_TIME} (" in found
    assert "spec.yaml:5:" in found  # points at the `time:` line


def test_more_nodes_than_the_partition_has_fails(short_partition, tmp_path):
    proc = doctor(short_partition, tmp_path, slurm_spec(nodes=3), "--backend", "slurm")
    assert proc.returncode == 1
    assert "fix: set resources.nodes to at most 1" in line(proc.stdout, "FAIL", "partition nodes")


def test_no_partition_checks_the_clusters_default(short_partition, tmp_path):
    spec = "name: doctor\nslurm: {time: '2-00:00:00'}\n"
    proc = doctor(short_partition, tmp_path, spec, "--backend", "slurm")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "partition debug answered" in line(proc.stdout, "PASS", "slurm controller")
    assert "within MaxTime UNLIMITED" in line(proc.stdout, "PASS", "partition time limit")


def test_unknown_partition_names_the_existing_ones(short_partition, tmp_path):
    proc = doctor(short_partition, tmp_path, slurm_spec(partition="nosuch"), "--backend", "slurm")
    assert proc.returncode == 1
    found = line(proc.stdout, "FAIL", "partition limits")
    assert "'nosuch' does not exist" in found and PARTITION in found and "debug" in found


def test_pyxis_missing_from_srun_fails(short_partition, tmp_path):
    """Debian's SLURM has no pyxis plugin: srun --help lacks --container-image."""
    spec = slurm_spec(extra="  container: {runtime: pyxis}\nimage: nvcr.io/example/fljob:1\n")
    proc = doctor(short_partition, tmp_path, spec, "--backend", "slurm")
    assert proc.returncode == 1
    assert "pyxis plugin is not loaded" in line(proc.stdout, "FAIL", "container runtime (pyxis)")


# --------------------------------------------------------------------------- missing tools


@pytest.fixture
def bare_path_env():
    """PATH holding only this Python's bin folder: fljob, but no SLURM, kubectl or apptainer."""
    env = dict(os.environ)
    env["PATH"] = str(FLJOB.parent)
    return env


def test_missing_slurm_tools_fail_with_install_fix(bare_path_env, tmp_path):
    spec = slurm_spec(partition="debug", extra="  container: {runtime: apptainer}\nimage: /img/fljob.sif\n")
    proc = doctor(bare_path_env, tmp_path, spec, "--backend", "slurm")
    assert proc.returncode == 1
    tools = line(proc.stdout, "FAIL", "slurm tools")
    assert "not on PATH: sbatch, srun, sacct" in tools and "apt-get install slurm-client" in tools
    assert "install apptainer" in line(proc.stdout, "FAIL", "container runtime (apptainer)")
    assert "scontrol is missing" in line(proc.stdout, "SKIP", "partition limits")


def test_missing_kubectl_fails_and_skips_the_crd_check(bare_path_env, tmp_path):
    spec = "name: doctor\nimage: registry.example/fljob:1\n"
    proc = doctor(bare_path_env, tmp_path, spec, "--backend", "k8s")
    assert proc.returncode == 1
    assert "install kubectl" in line(proc.stdout, "FAIL", "kubectl")
    assert "kubectl is missing" in line(proc.stdout, "SKIP", "CRD pytorchjobs.kubeflow.org")
    assert "kubectl is missing" in line(proc.stdout, "SKIP", "CRD podmonitors.monitoring.coreos.com")


def test_kubectl_without_a_cluster_skips_the_crd_check(tmp_path):
    if not any((Path(d) / "kubectl").exists() for d in os.environ.get("PATH", "").split(os.pathsep)):
        pytest.skip("kubectl is not installed")
    port = unused_port()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(f"""\
apiVersion: v1
kind: Config
clusters: [{{name: none, cluster: {{server: "https://127.0.0.1:{port}"}}}}]
contexts: [{{name: none, context: {{cluster: none, user: none}}}}]
users: [{{name: none, user: {{}}}}]
current-context: none
""")
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    proc = doctor(env, tmp_path, "name: doctor\nimage: registry.example/fljob:1\n", "--backend", "k8s")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS  kubectl" in proc.stdout
    assert "no cluster reachable" in line(proc.stdout, "SKIP", "CRD pytorchjobs.kubeflow.org")


# --------------------------------------------------------------------------- S3


KEY_VAR = "FLJOB_DOCTOR_KEY_ID"


def s3_spec(server, secret_file: Path, bucket: str = "", endpoint: str = "") -> str:
    bucket = bucket or server.bucket
    return f"""\
name: doctor
data:
  streams: [{{uri: s3://{bucket}/doctor/data}}]
checkpoint: {{uri: s3://{bucket}/doctor/ckpt}}
storage:
  endpoint_url: {endpoint or server.endpoint_url}
  region: {server.region}
  access_key_id: {{env: {KEY_VAR}}}
  secret_access_key: {{file: {secret_file}}}
"""


@pytest.fixture
def s3_env(s3_server, tmp_path):
    """No AWS_* in the environment: only the spec's references can supply credentials."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
    env[KEY_VAR] = s3_server.access_key_id
    secret = tmp_path / "secret"
    secret.write_text(s3_server.secret_access_key + "\n")
    secret.chmod(0o600)
    return env, secret


def assert_no_secret(proc: subprocess.CompletedProcess[str], server) -> None:
    for value in (server.access_key_id, server.secret_access_key):
        assert value not in proc.stdout + proc.stderr


def test_bucket_reachable_with_referenced_credentials(s3_server, s3_env, tmp_path):
    env, secret = s3_env
    proc = doctor(env, tmp_path, s3_spec(s3_server, secret))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = line(proc.stdout, "PASS", f"S3 bucket {s3_server.bucket}")
    assert "used by data.streams[0].uri, checkpoint.uri" in found
    assert_no_secret(proc, s3_server)


def test_wrong_secret_is_refused(s3_server, s3_env, tmp_path):
    env, secret = s3_env
    secret.write_text("not-the-secret\n")
    proc = doctor(env, tmp_path, s3_spec(s3_server, secret))
    assert proc.returncode == 1
    assert "refused access" in line(proc.stdout, "FAIL", f"S3 bucket {s3_server.bucket}")
    assert_no_secret(proc, s3_server)


def test_missing_bucket_says_create_it(s3_server, s3_env, tmp_path):
    env, secret = s3_env
    proc = doctor(env, tmp_path, s3_spec(s3_server, secret, bucket="fljob-doctor-nosuch"))
    assert proc.returncode == 1
    assert "does not exist" in line(proc.stdout, "FAIL", "S3 bucket fljob-doctor-nosuch")


def test_unset_credential_variable_says_export_it(s3_server, s3_env, tmp_path):
    env, secret = s3_env
    del env[KEY_VAR]
    proc = doctor(env, tmp_path, s3_spec(s3_server, secret))
    assert proc.returncode == 1
    assert f"fix: export {KEY_VAR}" in line(proc.stdout, "FAIL", "S3 credentials")


def test_unreachable_endpoint_fails(s3_server, s3_env, tmp_path):
    env, secret = s3_env
    spec = s3_spec(s3_server, secret, endpoint=f"http://127.0.0.1:{unused_port()}")
    proc = doctor(env, tmp_path, spec)
    assert proc.returncode == 1
    assert "cannot reach the S3 endpoint" in line(proc.stdout, "FAIL", f"S3 bucket {s3_server.bucket}")
    assert_no_secret(proc, s3_server)


OFFICIAL_CRDS = Path(__file__).resolve().parents[3] / "shared" / "schemas" / "kubeflow"


def test_crd_versions_read_from_the_cluster(tmp_path):
    """No API server exists here: a stand-in kubectl answers `version` and `get crd` with the
    official PyTorchJob CRD (training-operator v1.9.4); the PodMonitor CRD is not installed."""
    crd_file = OFFICIAL_CRDS / "kubeflow.org_pytorchjobs.v1.9.4.yaml"
    if not crd_file.is_file():
        pytest.skip(f"official CRD missing: {crd_file}")
    stub = tmp_path / "bin" / "kubectl"
    stub.parent.mkdir()
    stub.write_text(f"""#!{sys.executable}
import json, sys, yaml
args = sys.argv[1:]
if args[:1] == ["version"]:
    print(json.dumps({{"serverVersion": {{"gitVersion": "v1.31.0"}}}}))
elif args[:3] == ["get", "crd", "pytorchjobs.kubeflow.org"]:
    print(json.dumps(yaml.safe_load(open({str(crd_file)!r}))))
else:
    sys.exit('Error from server (NotFound): customresourcedefinitions "' + args[2] + '" not found')
""")
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{stub.parent}{os.pathsep}{os.environ['PATH']}"}
    proc = doctor(env, tmp_path, "name: doctor\nimage: registry.example/fljob:1\n", "--backend", "k8s")
    assert proc.returncode == 1
    assert "served versions: v1" in line(proc.stdout, "PASS", "CRD pytorchjobs.kubeflow.org")
    podmonitor = line(proc.stdout, "FAIL", "CRD podmonitors.monitoring.coreos.com")
    assert "not installed" in podmonitor and "kubernetes.pod_monitor.enabled: false" in podmonitor
    off = doctor(env, tmp_path, "name: doctor\nimage: registry.example/fljob:1\n"
                 "kubernetes: {pod_monitor: {enabled: false}}\n", "--backend", "k8s")
    assert off.returncode == 0 and "podmonitors" not in off.stdout
