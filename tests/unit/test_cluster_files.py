"""cluster/: the files that run rsray on a Ray cluster stay valid and agree with the repository.

Nothing here starts a cluster: the launcher config goes through Ray's own schema and validation
(what `ray up` runs first), KubeRay commands are parsed and their configs loaded with rsray's
loader, capacities are compared with the training config, and pins with constraints.txt (the tested set).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import tomllib
import yaml

from pipelines.cli import STAGES
from rsray.config import Config, load_config
from rsray.models import model_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# the exact versions the tests ran with (pyproject.toml holds ranges): the cluster's image must match them
PINS = dict(
    re.match(r"^([A-Za-z0-9_.-]+)==(\S+)$", line).groups()
    for line in (ROOT / "constraints.txt").read_text().splitlines()
    if line and not line.startswith("#")
)
CLUSTER_CONFIG = "cluster/conf/rsitmd-swan-8gpu.yaml"
WEIGHTS_MOUNT = "/mnt/weights"


def _load_script(path: Path):
    """A script in cluster/ (not a package) as a module."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


image_requirements = _load_script(CLUSTER / "image_requirements.py").image_requirements


def load_yaml(relative: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((ROOT / relative).read_text()) if doc is not None]


def dockerfile(relative: str = "cluster/Dockerfile") -> str:
    return (ROOT / relative).read_text()


def image_workdir() -> str:
    """Where the Dockerfile puts the repository's code (its first WORKDIR)."""
    return re.search(r"^WORKDIR\s+(\S+)", dockerfile(), re.M).group(1)


def entrypoint(job: dict) -> tuple[str, str, list[str]]:
    """(stage, config file in this repository, overrides) of a RayJob's `rsray` command."""
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "rsray", f"{job['metadata']['name']}: entrypoint must run rsray, got {argv[0]!r}"
    prefix = image_workdir().rstrip("/") + "/"
    assert argv[2].startswith(prefix), f"config {argv[2]} is not inside the image's code folder {prefix}"
    return argv[1], argv[2][len(prefix) :], argv[3:]


def rayjobs() -> dict[str, dict]:
    return {path: load_yaml(f"cluster/kuberay/{path}")[0] for path in ("rayjob-train.yaml", "rayjob-sweep.yaml")}


def raycluster() -> dict:
    return load_yaml("cluster/kuberay/raycluster.yaml")[0]


def pod_specs(cluster: dict) -> list[dict]:
    spec = cluster["spec"]
    return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]


def cluster_training_config(overrides: list[str] = ()) -> Config:
    return load_config(ROOT / CLUSTER_CONFIG, list(overrides))


# ----------------------------------------------------------------------------- every file


@pytest.mark.parametrize("relative", sorted(str(p.relative_to(ROOT)) for p in CLUSTER.rglob("*.yaml")))
def test_every_yaml_file_parses_to_mappings(relative):
    docs = load_yaml(relative)
    assert docs and all(isinstance(doc, dict) for doc in docs)


def test_paths_named_in_the_docs_exist():
    text = (ROOT / "README.md").read_text() + (CLUSTER / "README.md").read_text()
    named = set(re.findall(r"cluster/[\w./-]*\w", text))
    assert {"cluster/aws-gpu.yaml", "cluster/kuberay/raycluster.yaml", CLUSTER_CONFIG} <= named
    missing = [p for p in named if not (ROOT / p).exists()]
    assert not missing, f"documented but missing: {missing}"


# ----------------------------------------------------------------------------- images


def test_image_requirements_are_pyproject_dependencies_plus_ray_default_at_the_tested_version():
    requirements = image_requirements(ROOT / "pyproject.toml", ROOT / "constraints.txt")
    assert requirements[:-1] == [d.replace(" ", "") for d in PYPROJECT["project"]["dependencies"]]
    assert requirements[-1] == f"ray[default]=={PINS['ray']}"


def test_image_requirements_refuse_constraints_without_a_pinned_ray(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\ndependencies = ["ray[train]>=2", "torch>=2.13"]\n')
    (tmp_path / "constraints.txt").write_text("torch==2.13.0\n")
    with pytest.raises(ValueError, match="pinned ray"):
        image_requirements(tmp_path / "pyproject.toml", tmp_path / "constraints.txt")


def test_every_dependency_is_pinned_in_constraints():
    names = [re.match(r"^([A-Za-z0-9_.-]+)", d)[1].lower() for d in PYPROJECT["project"]["dependencies"]]
    assert not [name for name in names if name not in {pin.lower() for pin in PINS}]


def test_dockerfile_torch_pins_equal_the_tested_set():
    text = dockerfile()
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.M))
    assert args["TORCH_VERSION"] == PINS["torch"]
    assert args["TORCHVISION_VERSION"] == PINS["torchvision"]
    assert args["BASE_IMAGE"].startswith("pytorch/pytorch:${TORCH_VERSION}-cuda")
    assert "image_requirements.py pyproject.toml" in text  # every other pin comes from pyproject


def test_dockerfile_runs_as_non_root_without_secrets():
    text = dockerfile()
    user = re.findall(r"^USER\s+(\S+)", text, re.M)[-1]
    uid = user.split(":")[0]
    assert uid.isdigit() and uid != "0", "a numeric non-root USER lets Kubernetes check runAsNonRoot"
    assert re.search(r"^ENV\s+HOME=/home/", text, re.M), "the cluster launcher reads HOME from the image env"
    baked = re.findall(r"^(?:ENV|ARG)\s+.*(?:KEY|SECRET|PASSWORD|TOKEN)", text, re.M | re.I)
    assert not baked


def test_build_context_lets_in_everything_the_dockerfile_copies():
    allowed = {
        line[1:] for line in (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines() if line.startswith("!")
    }
    copied = [src for line in re.findall(r"^COPY\s+(.+)$", dockerfile(), re.M) for src in line.split()[:-1]]
    assert copied and set(copied) <= allowed
    assert all((ROOT / src).exists() for src in copied)


def test_mlflow_images_pin_rsrays_mlflow():
    version = PINS["mlflow"]
    assert f"ARG MLFLOW_VERSION={version}" in dockerfile("cluster/mlflow/Dockerfile")
    deployment = load_yaml("cluster/mlflow/k8s.yaml")[0]
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"].endswith(f":{version}")
    assert load_yaml("cluster/mlflow/docker-compose.yaml")[0]["services"]["mlflow"]["image"].endswith(f":{version}")


# ----------------------------------------------------------------------------- cluster launcher


def launcher() -> dict:
    return load_yaml("cluster/aws-gpu.yaml")[0]


def test_launcher_config_passes_rays_schema_and_validation():
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = launcher()
    jsonschema.validate(config, schema)
    validate_config(prepare_config(config))  # what `ray up` does before touching AWS

    config["available_node_types"]["gpu"]["gpus"] = 4  # the check is live: a stray key is refused
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, schema)


def test_launcher_runs_the_rsray_image_with_the_weights_mounted():
    config = launcher()
    assert config["docker"]["image"].endswith(f"/rsray:{PYPROJECT['project']['version']}")
    assert any(f":{WEIGHTS_MOUNT}:" in option for option in config["docker"]["run_options"])
    assert config["available_node_types"][config["head_node_type"]]["resources"].get("CPU") == 0
    region = config["provider"]["region"]
    assert f"--env AWS_DEFAULT_REGION={region}" in " ".join(config["docker"]["run_options"])
    assert f".ecr.{region}." in config["docker"]["image"]


def test_launcher_gpu_nodes_fit_the_cluster_training_config():
    train = cluster_training_config().train
    gpu_nodes = [t for t in launcher()["available_node_types"].values() if t["resources"].get("GPU", 0) > 0]
    assert gpu_nodes
    node = gpu_nodes[0]
    assert node["max_workers"] * node["resources"]["GPU"] >= train.num_workers
    assert node["resources"]["GPU"] * train.cpus_per_worker < node["resources"]["CPU"], (
        "one node's train workers must leave CPUs for Ray Data"
    )


# ----------------------------------------------------------------------------- KubeRay


def test_kuberay_manifests_have_the_expected_kinds():
    assert (raycluster()["apiVersion"], raycluster()["kind"]) == ("ray.io/v1", "RayCluster")
    for job in rayjobs().values():
        assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
        assert job["spec"]["clusterSelector"] == {"ray.io/cluster": raycluster()["metadata"]["name"]}


def test_raycluster_matches_the_pinned_ray_and_image():
    cluster = raycluster()
    assert cluster["spec"]["rayVersion"] == PINS["ray"]
    images = {c["image"] for pod in pod_specs(cluster) for c in pod["containers"] + pod.get("initContainers", [])}
    assert images == {f"REGISTRY/rsray:{PYPROJECT['project']['version']}"}


def test_raycluster_pods_get_storage_settings_from_the_secret_and_the_weights():
    for pod in pod_specs(raycluster()):
        for container in pod["containers"]:
            from_secret = {e["name"] for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})}
            assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3"} <= from_secret
            assert WEIGHTS_MOUNT in {m["mountPath"] for m in container["volumeMounts"]}
        assert pod["securityContext"]["runAsNonRoot"] is True


def test_weights_init_command_copies_a_folder(tmp_path):
    """The init container's own command, run on a local folder instead of s3:// (same code path
    through rsray.storage)."""
    init = raycluster()["spec"]["headGroupSpec"]["template"]["spec"]["initContainers"][0]
    command = list(init["command"])
    assert command[-2].startswith("s3://") and command[-1] == WEIGHTS_MOUNT
    source = tmp_path / "weights"
    (source / "glove").mkdir(parents=True)
    (source / "resnet50.pth").write_bytes(b"w")
    (source / "glove" / "vectors.txt").write_text("the 0.1\n")
    command[0], command[-2], command[-1] = sys.executable, str(source), str(tmp_path / "mounted")
    subprocess.run(command, check=True, cwd=ROOT, timeout=120)
    assert (tmp_path / "mounted" / "resnet50.pth").read_bytes() == b"w"
    assert (tmp_path / "mounted" / "glove" / "vectors.txt").read_text() == "the 0.1\n"


def test_train_job_runs_an_existing_stage_on_the_cluster_config_with_valid_overrides():
    stage, config_file, overrides = entrypoint(rayjobs()["rayjob-train.yaml"])
    assert stage == "train" and stage in STAGES
    assert config_file == CLUSTER_CONFIG
    cfg = cluster_training_config(overrides)
    model_config(cfg)  # the model section is typed and checked by the model's own config
    assert cfg.train.use_gpu and cfg.train.data.startswith("s3://") and cfg.train.storage_path.startswith("s3://")
    assert cfg.tracking.uri.startswith("http://")
    assert set(overrides) >= {"train.num_workers=8", "train.use_gpu=true"}


def test_train_job_fits_the_rayclusters_gpu_workers():
    _, _, overrides = entrypoint(rayjobs()["rayjob-train.yaml"])
    train = cluster_training_config(overrides).train
    group = raycluster()["spec"]["workerGroupSpecs"][0]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    gpus, cpus = int(limits["nvidia.com/gpu"]), float(limits["cpu"])
    assert group["maxReplicas"] * gpus >= train.num_workers
    assert gpus * train.cpus_per_worker < cpus


def test_sweep_job_runs_the_sweep_stage_on_an_existing_sweep_config():
    stage, config_file, overrides = entrypoint(rayjobs()["rayjob-sweep.yaml"])
    assert stage == "sweep" and stage in STAGES and config_file.startswith("conf/sweep/")
    if not (ROOT / config_file).is_file():
        pytest.skip(f"{config_file} has not landed yet")
    from rsray.sweep import load_sweep

    sweep = load_sweep(ROOT / config_file, overrides)  # the sweep's own loader checks every override
    assert sweep.base.train.use_gpu and sweep.folder.startswith("s3://")
    assert sweep.base.tracking.uri.startswith("http://")
    group = raycluster()["spec"]["workerGroupSpecs"][0]
    gpus = group["maxReplicas"] * int(
        group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    )
    assert 1 <= sweep.settings.max_concurrent_trials * sweep.base.train.num_workers <= gpus


def test_cluster_config_keeps_weights_under_the_mounted_folder():
    cfg = cluster_training_config()
    files = {k: v for k, v in cfg.model.items() if k.endswith(("_path", "_checkpoint")) and v}
    assert files and all(v.startswith(WEIGHTS_MOUNT + "/") for v in files.values())
    assert cfg.train.num_workers == 8 and cfg.train.use_gpu


# ----------------------------------------------------------------------------- MLflow


def test_jobs_reach_the_mlflow_service_and_the_server_accepts_its_host_name():
    from mlflow.server.security_utils import is_allowed_host_header

    deployment, service = load_yaml("cluster/mlflow/k8s.yaml")
    assert (deployment["kind"], service["kind"]) == ("Deployment", "Service")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = " ".join(container["args"])
    assert "--backend-store-uri=$(MLFLOW_DB_URI)" in args and "--artifacts-destination=s3://" in args
    env = {e["name"]: e for e in container["env"]}
    allowed = [h.strip() for h in env["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")]
    port = service["spec"]["ports"][0]["port"]
    for job in rayjobs().values():
        _, _, overrides = entrypoint(job)
        uri = dict(o.split("=", 1) for o in overrides)["tracking.uri"]
        host = uri[len("http://") :]
        assert host == f"{service['metadata']['name']}:{port}"
        assert is_allowed_host_header(allowed, host)
    assert is_allowed_host_header(allowed, "127.0.0.1:5000")  # kubectl port-forward
    assert not is_allowed_host_header(allowed, "attacker.example.com")


def test_compose_runs_postgres_and_an_s3_backed_mlflow_server():
    services = load_yaml("cluster/mlflow/docker-compose.yaml")[0]["services"]
    assert set(services) == {"postgres", "mlflow"}
    command = " ".join(services["mlflow"]["command"])
    assert "--backend-store-uri=postgresql://mlflow:${POSTGRES_PASSWORD}@postgres:5432/mlflow" in command
    assert "--artifacts-destination=${MLFLOW_ARTIFACTS:?" in command
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "${POSTGRES_PASSWORD:?" in services["postgres"]["environment"]["POSTGRES_PASSWORD"]


# ----------------------------------------------------------------------------- security defaults


def test_the_ray_clusters_require_a_token_that_no_file_holds():
    assert raycluster()["spec"]["authOptions"] == {"mode": "token"}  # KubeRay generates the Secret
    config = launcher()
    options = " ".join(config["docker"]["run_options"])
    assert "--env RAY_AUTH_MODE=token" in options
    token_path = re.search(r"--env RAY_AUTH_TOKEN_PATH=(\S+)", options).group(1)
    host_file = re.search(rf"--volume (\S+):{re.escape(token_path)}:ro", options).group(1)
    fetch = [c for c in config["initialization_commands"] if c.endswith(f"> {host_file})")]
    assert len(fetch) == 1 and "umask 077" in fetch[0] and "--with-decryption" in fetch[0]  # from SSM, private
    env_file = re.search(r"--env-file (\S+)", options).group(1)
    assert any(c.endswith(f"> {env_file})") and "umask 077" in c for c in config["initialization_commands"])
    for text in (ROOT / "cluster" / "aws-gpu.yaml", ROOT / "cluster" / "kuberay" / "raycluster.yaml"):
        assert not re.search(r"RAY_AUTH_TOKEN=[^$\s]", text.read_text()), f"{text}: a literal token"


def test_the_mlflow_server_needs_a_login_and_is_not_published():
    assert re.search(r'^ENTRYPOINT \["start-mlflow"\]', dockerfile("cluster/mlflow/Dockerfile"), re.M)
    assert "COPY start-mlflow.sh /usr/local/bin/start-mlflow" in dockerfile("cluster/mlflow/Dockerfile")
    assert "mlflow[auth]==" in dockerfile("cluster/mlflow/Dockerfile")
    deployment, service = load_yaml("cluster/mlflow/k8s.yaml")
    env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_AUTH_DB_URI"):
        assert "secretKeyRef" in env[name]["valueFrom"], name
    assert service["spec"]["type"] == "ClusterIP"
    compose = load_yaml("cluster/mlflow/docker-compose.yaml")[0]["services"]["mlflow"]
    assert compose["ports"] == ["${MLFLOW_BIND:-127.0.0.1}:5000:5000"]
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert compose["environment"][name] == f"${{{name}:?set {name}}}"


@pytest.mark.parametrize(
    "missing", ["MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_AUTH_DB_URI"]
)
def test_start_mlflow_refuses_to_start_without_each_secret(missing, tmp_path):
    """The entrypoint itself, run: it stops before `mlflow` with the name of what is missing (the
    tests' MLflow server shows it starting when all are there)."""
    env = {
        "PATH": "/usr/bin:/bin",
        "TMPDIR": str(tmp_path),
        "MLFLOW_AUTH_ADMIN_PASSWORD": "x",
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "y",
        "MLFLOW_AUTH_DB_URI": "sqlite:///z",
    }
    del env[missing]
    done = subprocess.run(
        ["sh", str(CLUSTER / "mlflow" / "start-mlflow.sh")], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode != 0 and f"{missing}: set {missing}" in done.stderr
    assert not list(tmp_path.iterdir())  # no settings file written
