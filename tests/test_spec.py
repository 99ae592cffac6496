"""The job spec through the real CLI: bad input gets one clear problem per line, exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fljob.spec import SpecError, dump_spec, load_spec, load_spec_text
from fljob.spec.sweep import expand

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def fljob(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fljob.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)


# Each case: a spec body (after `name: ok-job`), the field the error must name, the line it is
# on, and a word of the fix the message must contain.
BAD_SPECS = [
    ("optimizer:\n  nmae: adopt\n", "optimizer.nmae", 3, "Did you mean 'name'"),
    ("traning:\n  steps: 5\n", "traning", 2, "Did you mean 'training'"),
    ("optimizer:\n  name: adamm\n", "optimizer.name", 3, "Did you mean 'adamw'"),
    ("optimizer:\n  lr: -0.1\n", "optimizer.lr", 3, "greater than 0"),
    ("training:\n  steps: ten\n", "training.steps", 3, "valid integer"),
    ("training:\n  dtype: bf16\n", "training.dtype", 3, "Did you mean 'bfloat16'"),
    ("resources:\n  nodes: 0\n", "resources.nodes", 3, "greater than or equal to 1"),
    ("resources:\n  gpus_per_node: 8\n  procs_per_node: 4\n", "resources", 2, "must equal gpus_per_node"),
    ("kubernetes:\n  namespace: Team_A\n", "kubernetes.namespace", 3, "DNS-1035"),
    ("kubernetes:\n  shm_size: lots\n", "kubernetes.shm_size", 3, "16Gi"),
    ("kubernetes:\n  labels: {'bad key!': x}\n", "kubernetes.labels", 3, "label key"),
    ("slurm:\n  time: UNLIMITED\n", "slurm.time", 3, "explicit limit"),
    ("slurm:\n  partition: 'gpu; rm -rf /'\n", "slurm.partition", 3, "one word"),
    ("slurm:\n  container: {runtime: docker}\n", "slurm.container.runtime", 3, "'pyxis'"),
    ("slurm:\n  container: {mounts: ['/data']}\n", "slurm.container.mounts", 3, "src:dst"),
    ("slurm:\n  extra_sbatch: {signal: 'USR1@60'}\n", "slurm.extra_sbatch", 3, "fljob owns it"),
    ("slurm:\n  grace_seconds: 1\n", "slurm.grace_seconds", 3, "greater than or equal to 10"),
    ("checkpoint:\n  uri: gs://bucket/ckpt\n", "checkpoint.uri", 3, "s3://"),
    ("checkpoint:\n  keep_latest: 0\n", "checkpoint.keep_latest", 3, "greater than or equal to 1"),
    ("metrics:\n  port: 80\n", "metrics.port", 3, "greater than or equal to 1024"),
    ("env:\n  AWS_SECRET_ACCESS_KEY: hunter2\n", "env", 2, "secret_env"),
    ("env:\n  1BAD: x\n", "env", 2, "environment variable name"),
    ("storage:\n  access_key_id: {value: AKIA123}\n", "storage.access_key_id.value", 3, "unknown field"),
    ("storage:\n  access_key_id: {env: KEY}\n", "storage", 2, "both access_key_id and secret_access_key"),
    ("secret_env:\n  TOKEN: {}\n", "secret_env.TOKEN", 3, "at least one of env, k8s_secret or file"),
    ("parallelism:\n  tensor_parallel_degree: 3\nresources: {procs_per_node: 2}\n", "", 1, "must divide the world size"),
    ("optimizer:\n  betas: [0.9, 1.5]\n", "optimizer.betas", 3, "[0, 1)"),
    ("schedule:\n  decay_type: exponential\n", "schedule.decay_type", 3, "'cosine'"),
    ("data:\n  streams: [{url: s3://x}]\n", "data.streams[0].url", 3, "Did you mean 'uri'"),
    ("model:\n  flavor: 1b\n", "model.flavor", 3, "nearest in size is '1.06B'"),
    ("optimizer:\n  name: adamw\n  nus: [0.5, 1.0]\n", "optimizer", 2, "adamw would ignore it"),
    ("optimizer:\n  name: qhadopt\n  nus: [0.5, 0.9]\n", "optimizer", 2, "qhadopt needs nus[1] = 1.0"),
    ("training: {seq_len: 100}\nparallelism: {tensor_parallel_degree: 8}\nresources: {procs_per_node: 8}\n",
     "", 1, "multiple of parallelism.tensor_parallel_degree"),
    ("training: {device: cpu}\noptimizer: {implementation: fused}\n", "", 1, "CUDA only"),
    ("model: {width: 100}\n", "model", 2, "not a positive multiple of the flavor's head_dim 16"),
    ("model: {tie_embeddings: true, zero_init_readout: true}\n", "model", 2,
     "set model.tie_embeddings: false"),
    ("data:\n  validation: [{uri: s3://b/val}]\n", "data", 2, "data.validation needs data.streams"),
    ("data: {streams: [{uri: s3://b/train}]}\ntraining: {validation_interval: 10}\n", "", 1,
     "add data.validation streams"),
    ("sweep:\n  grid: {resources.nodes: [1, 2]}\n", "sweep.grid", 3, "cannot vary between trials"),
    ("sweep:\n  grid: {optimizer.lr: []}\n", "sweep.grid", 3, "has no values"),
    ("sweep:\n  grid: {optimizer.lr: [0.1]}\n  name_format: '{name}-{lr_rate}'\n", "sweep", 2,
     "unknown: lr_rate"),
]


@pytest.mark.parametrize(("body", "field", "line", "fix"), BAD_SPECS, ids=[c[1] or "world" for c in BAD_SPECS])
def test_bad_spec_gets_clear_error(tmp_path: Path, body: str, field: str, line: int, fix: str) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: ok-job\n" + body)
    result = fljob("validate", str(spec))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    problem_lines = [ln for ln in result.stderr.splitlines() if ln.startswith("  ")]
    match = [ln for ln in problem_lines if f": {field or '(top level)'}:" in ln]
    assert match, f"no problem names {field!r}:\n{result.stderr}"
    assert f"{spec}:{line}:" in match[0], match[0]
    assert fix in match[0], match[0]


def test_at_least_twenty_distinct_bad_specs() -> None:
    assert len({(b, f) for b, f, _, _ in BAD_SPECS}) >= 20


@pytest.mark.parametrize("name", ["Tiny", "-tiny", "tiny-", "9tiny", "tiny_mup", "a" * 60])
def test_bad_names(name: str) -> None:
    with pytest.raises(SpecError) as err:
        load_spec_text(f"name: {name!r}\n", "s.yaml")
    assert "name" in err.value.problems[0].field


def test_name_limit_keeps_derived_names_within_63() -> None:
    longest_ok = "a" * (63 - len("-worker-99"))
    load_spec_text(f"name: {longest_ok}\n")
    with pytest.raises(SpecError, match="63-character"):
        load_spec_text(f"name: {longest_ok}a\n")


def test_yaml_syntax_error_has_position(tmp_path: Path) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text("name: x\ntraining:\n  steps: [1, 2\n")
    result = fljob("validate", str(spec))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{spec}:4:" in result.stderr or f"{spec}:3:" in result.stderr
    assert "YAML syntax error" in result.stderr


def test_duplicate_keys_are_errors() -> None:
    with pytest.raises(SpecError, match="duplicate key") as err:
        load_spec_text("name: a\ntraining: {steps: 1}\ntraining: {steps: 2}\n", "s.yaml")
    assert err.value.problems[0].origin == "s.yaml:3:1"


def test_missing_file_and_missing_name(tmp_path: Path) -> None:
    result = fljob("validate", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and "cannot read the spec" in result.stderr
    (tmp_path / "s.yaml").write_text("training: {steps: 3}\n")
    result = fljob("validate", str(tmp_path / "s.yaml"))
    assert result.returncode == 2 and "name: required field is missing" in result.stderr


def test_overrides_apply_and_report_their_origin(tmp_path: Path) -> None:
    spec = load_spec_text("name: a\n", overrides=["training.steps=7", "optimizer.betas=[0.8, 0.9]",
                                                   "env.FOO=bar baz"])
    assert spec.training.steps == 7 and spec.optimizer.betas == (0.8, 0.9) and spec.env == {"FOO": "bar baz"}
    with pytest.raises(SpecError) as err:
        load_spec_text("name: a\n", "s.yaml", overrides=["training.stesp=7"])
    problem = err.value.problems[0]
    assert problem.origin == "--set training.stesp=7" and "Did you mean 'steps'" in problem.message
    with pytest.raises(SpecError, match="KEY=VALUE"):
        load_spec_text("name: a\n", overrides=["training.steps"])


def test_override_into_list_item() -> None:
    text = "name: a\ndata:\n  streams: [{uri: s3://a, proportion: 1}, {uri: s3://b, proportion: 1}]\n"
    spec = load_spec_text(text, overrides=["data.streams.1.proportion=0.25"])
    assert spec.data.streams[1].proportion == 0.25
    with pytest.raises(SpecError, match="no list item 5"):
        load_spec_text(text, overrides=["data.streams.5.uri=x"])


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_example_configs_validate(config: Path) -> None:
    result = fljob("validate", str(config))
    assert result.returncode == 0, result.stderr
    spec = load_spec(config)
    assert load_spec_text(dump_spec(spec)).model_dump() == spec.model_dump()  # the shipped spec reads back


def test_backend_checks_point_at_the_line(tmp_path: Path) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text("name: a\nstorage:\n  access_key_id: {k8s_secret: {name: s3, key: id}}\n"
                    "  secret_access_key: {k8s_secret: {name: s3, key: secret}}\n")
    assert fljob("validate", str(spec)).returncode == 0
    result = fljob("validate", "--backend", "slurm", str(spec))
    assert result.returncode == 2
    assert f"{spec}:3:3: storage.access_key_id: has only a k8s_secret reference" in result.stderr


def test_schema_is_json_schema_of_the_spec() -> None:
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema (test extra) is not installed")
    result = fljob("schema")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for config in CONFIGS:
        import yaml

        assert not list(validator.iter_errors(yaml.safe_load(config.read_text()))), config
    assert list(validator.iter_errors({"name": "a", "optimizer": {"nmae": "adopt"}}))


def test_help_teaches() -> None:
    result = fljob("--help")
    assert result.returncode == 0
    for text in ("fljob validate spec.yaml", "--set training.steps=100", "slurm://1234", "exit codes"):
        assert text in result.stdout


def test_spec_example_in_help_is_valid(tmp_path: Path) -> None:
    result = fljob("--help")
    block = result.stdout.split("every field has a default except `name`:")[1].split("examples:")[0]
    (tmp_path / "s.yaml").write_text(textwrap.dedent(block))
    assert fljob("validate", str(tmp_path / "s.yaml")).returncode == 0


SITE = REPO / "slurm" / "site-profile.yaml"


def test_site_profile_lies_under_the_spec(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: site-job\nslurm: {time: '04:00:00', partition: gpu-long}\nenv: {NCCL_DEBUG: WARN}\n")
    merged = load_spec(spec, site=SITE)
    assert merged.slurm.partition == "gpu-long"  # the spec wins
    assert merged.slurm.account == "llm" and merged.slurm.container.runtime == "pyxis"  # the site fills in
    assert merged.env == {"NCCL_IB_HCA": "mlx5", "NCCL_SOCKET_IFNAME": "ib0", "NCCL_DEBUG": "WARN"}
    assert merged.origin("slurm.account").startswith(f"{SITE}:")
    assert merged.origin("slurm.partition").startswith(f"{spec}:")
    assert load_spec(spec).slurm.account is None  # nothing leaks in without the profile


def test_site_profile_from_the_environment_and_its_errors_point_into_it(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: site-job\nslurm: {time: '01:00:00'}\n")
    site = tmp_path / "site.yaml"
    site.write_text("slurm:\n  partiton: gpu\n")
    result = subprocess.run([sys.executable, "-m", "fljob.cli", "validate", str(spec)], capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO), "FLJOB_SITE": str(site)}, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{site}:2:3: slurm.partiton: unknown field" in result.stderr
    assert "Did you mean 'partition'" in result.stderr
    ok = fljob("validate", "--site", str(SITE), "--print", str(spec))
    assert ok.returncode == 0 and "account: llm" in ok.stdout


def test_a_bad_value_in_one_trial_names_the_trial_and_points_at_the_grid(tmp_path: Path) -> None:
    spec = tmp_path / "sweep.yaml"
    spec.write_text("name: sw\nsweep:\n  grid:\n    model.width: [64, 96]\n"
                    "    optimizer.lr: [0.001, -1]\n  parallel: 2\n")
    result = fljob("validate", str(spec))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("  ")]
    assert [line.split(": ", 2)[:2] for line in lines] == [[f"  {spec}:5:5", "optimizer.lr"]] * 2, result.stderr
    assert "trial 1 (model.width=64, optimizer.lr=-1)" in lines[0] and "trial 3 (model.width=96" in lines[1]
    spec.write_text("name: sw\nsweep: {grid: {optimizer.lr: [0.001, 0.002]}, name_format: '{name}-x'}\n")
    assert "must name each trial apart" in fljob("validate", str(spec)).stderr


def test_a_sweep_validates_every_trial_and_says_how_many(tmp_path: Path) -> None:
    spec = tmp_path / "sweep.yaml"
    spec.write_text("name: sw\nsweep: {grid: {model.mup: [true, false], optimizer.lr: [0.001, 0.002, 0.004]}}\n")
    result = fljob("validate", str(spec))
    assert result.returncode == 0 and "a sweep of 6 trials" in result.stdout, result.stderr
    names = [t.name for t in expand(load_spec(spec))]
    assert names == [f"sw-{i}" for i in range(6)]
