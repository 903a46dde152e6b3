"""KubeRay manifests for a training run: a ConfigMap holding the run config and a RayJob running `scpermut train`.

Pure functions returning plain dicts (no text templates), so `scpermut launch k8s` and the files under
k8s/ come from one place and tests compare objects against the KubeRay CRD schemas.
"""
from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml

from scpermut_dist import __version__
from scpermut_dist.errors import UsageError

RAY_VERSION = "2.60.0"  # the Ray the image installs (k8s/Dockerfile's RAY_VERSION); KubeRay reads it
DEFAULT_IMAGE = f"scpermut-dist:{__version__}"
DEFAULT_S3_SECRET = "scpermut-s3"
CONFIG_DIR = "/etc/scpermut"  # where every pod sees the ConfigMap
CONFIG_FILE = "run.yaml"
SCRATCH = "/scratch"  # each pod's emptyDir, for the run folder when storage is an object store
GPU = "nvidia.com/gpu"
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
MAX_NAME = 47  # KubeRay derives cluster, pod and service names from the RayJob's name and caps it here


@dataclass(frozen=True)
class Storage:
    """Where data and checkpoints live: a ReadWriteMany claim mounted everywhere, or an object store."""

    uri: str | None = None  # s3://bucket/prefix
    claim: str | None = None
    mount: str = "/data"
    secret: str = DEFAULT_S3_SECRET  # s3 only: a Secret with AWS_* variables, loaded with envFrom


def parse_storage(text: str, secret: str = DEFAULT_S3_SECRET) -> Storage:
    """`pvc:CLAIM[:MOUNT]` or `s3://bucket/prefix`; anything else is a UsageError naming both forms."""
    forms = "give pvc:CLAIM[:MOUNT] (a ReadWriteMany claim, mounted at /data by default) or s3://bucket/prefix"
    if text.startswith("pvc:"):
        claim, _, mount = text[4:].partition(":")
        mount = mount or "/data"
        if not _DNS_LABEL.match(claim) or not mount.startswith("/") or mount.rstrip("/") == "":
            raise UsageError(f"--storage {text!r}: claim must be a Kubernetes name and MOUNT an absolute path; {forms}")
        return Storage(claim=claim, mount=mount.rstrip("/"))
    if text.startswith("s3://") and text[5:].split("/")[0]:
        _check_name(secret, "--s3-secret")
        return Storage(uri=text.rstrip("/"), secret=secret)
    raise UsageError(f"--storage {text!r} is not supported; {forms}")


def _check_name(name: str, what: str, limit: int = 63) -> None:
    if not _DNS_LABEL.match(name) or len(name) > limit:
        raise UsageError(f"{what} {name!r}: use at most {limit} lowercase letters, digits and '-', "
                         "starting and ending with a letter or digit")


def default_name(config_path: str | Path) -> str:
    """`scpermut-<config file stem>`, made a valid name: re-using a config re-uses its run (and resumes it)."""
    stem = re.sub(r"[^a-z0-9]+", "-", Path(config_path).stem.lower()).strip("-")
    return f"scpermut-{stem}"[:MAX_NAME].rstrip("-") if stem else "scpermut-train"


@dataclass(frozen=True)
class JobSpec:
    """One training run on KubeRay; validated on creation so nothing half-valid gets rendered."""

    name: str
    workers: int
    gpus_per_worker: int
    storage: Storage
    image: str = DEFAULT_IMAGE
    gpus_per_node: int = 8
    cpus_per_worker: int = 4
    memory_per_worker_gib: int = 16
    head_cpus: int = 4
    head_memory_gib: int = 16
    max_failures: int | None = None
    ttl_seconds: int = 300  # the finished run's cluster (GPUs!) lingers this long for its pods' logs, then goes
    deadline_seconds: int | None = 2 * 24 * 3600  # a hung run must not hold the GPUs forever
    backoff_limit: int = 0  # whole-job retries; each would resume from the same storage path
    ray_version: str = RAY_VERSION

    def __post_init__(self) -> None:
        _check_name(self.name, "--name", MAX_NAME)
        if self.workers < 1:
            raise UsageError(f"--workers {self.workers}: a run needs at least one Ray Train worker")
        if self.gpus_per_worker < 0:
            raise UsageError(f"--gpus-per-worker {self.gpus_per_worker}: give 0 (CPU) or more")
        if self.gpus_per_worker > self.gpus_per_node:
            raise UsageError(f"--gpus-per-worker {self.gpus_per_worker} exceeds --gpus-per-node "
                             f"{self.gpus_per_node}: a worker must fit on one node")
        for flag, value in (("--cpus-per-worker", self.cpus_per_worker), ("--head-cpus", self.head_cpus),
                            ("--memory-per-worker", self.memory_per_worker_gib),
                            ("--head-memory", self.head_memory_gib), ("--gpus-per-node", self.gpus_per_node)):
            if value < 1:
                raise UsageError(f"{flag} {value}: must be at least 1")
        if not self.image:
            raise UsageError("--image: give the image built from k8s/Dockerfile")


def worker_layout(spec: JobSpec) -> tuple[int, int]:
    """(worker pods, Ray Train workers per pod): GPU pods fill nodes, a CPU run has one pod per worker.

    pods = ceil(N * G / gpus_per_node) when G divides gpus_per_node; the workers are then spread evenly so
    a run of 10 x 1 GPU asks for 2 pods x 5 GPUs, not 2 x 8.
    """
    if spec.gpus_per_worker == 0:
        return spec.workers, 1
    pods = math.ceil(spec.workers / (spec.gpus_per_node // spec.gpus_per_worker))
    return pods, math.ceil(spec.workers / pods)


def run_paths(spec: JobSpec) -> tuple[str, str]:
    """(RUN_DIR for `--out`, Ray Train storage path): both on the claim, or local scratch + the object store."""
    s = spec.storage
    if s.claim:
        run_dir = f"{s.mount}/runs/{spec.name}"
        return run_dir, run_dir
    return f"{SCRATCH}/runs/{spec.name}", f"{s.uri}/{spec.name}"


def entrypoint(spec: JobSpec) -> str:
    """The command KubeRay submits to the head; RAY_ADDRESS is set there, so `scpermut train` attaches."""
    run_dir, storage_path = run_paths(spec)
    argv = ["scpermut", "train", "--config", f"{CONFIG_DIR}/{CONFIG_FILE}", "--workers", str(spec.workers),
            "--gpus-per-worker", str(spec.gpus_per_worker), "--cpus-per-worker", str(spec.cpus_per_worker),
            "--out", run_dir, "--storage-path", storage_path]
    if spec.max_failures is not None:
        argv += ["--max-failures", str(spec.max_failures)]
    return shlex.join(argv)


def labels(spec: JobSpec, component: str | None = None) -> dict[str, str]:
    out = {"app.kubernetes.io/name": "scpermut", "app.kubernetes.io/instance": spec.name}
    return out | ({"app.kubernetes.io/component": component} if component else {})


def config_map_name(spec: JobSpec) -> str:
    return f"{spec.name}-config"


def config_map(spec: JobSpec, config_text: str) -> dict:
    """The run config file as a ConfigMap (verbatim, comments kept), mounted at CONFIG_DIR in every pod."""
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": config_map_name(spec), "labels": labels(spec)},
            "data": {CONFIG_FILE: config_text}}


def _volumes(spec: JobSpec, with_config: bool) -> tuple[list[dict], list[dict]]:
    """(volumes, volumeMounts): the config, and the claim or a scratch emptyDir, in every pod.

    Workers write into RUN_DIR too (their rank files, metrics), so it must exist on every pod: shared on the
    claim, or one local scratch folder per pod when the checkpoints go to an object store.
    """
    volumes, mounts = [], []
    if with_config:
        volumes.append({"name": "run-config", "configMap": {"name": config_map_name(spec)}})
        mounts.append({"name": "run-config", "mountPath": CONFIG_DIR, "readOnly": True})
    if spec.storage.claim:
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": spec.storage.claim}})
        mounts.append({"name": "data", "mountPath": spec.storage.mount})
    else:
        volumes.append({"name": "scratch", "emptyDir": {}})
        mounts.append({"name": "scratch", "mountPath": SCRATCH})
    return volumes, mounts


def _resources(cpus: int, memory_gib: int, gpus: int = 0) -> dict:
    """Requests equal to limits (Ray sizes itself from the limits; GPUs cannot be overcommitted anyway)."""
    amounts = {"cpu": str(cpus), "memory": f"{memory_gib}Gi"} | ({GPU: str(gpus)} if gpus else {})
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _pod_template(spec: JobSpec, component: str, resources: dict, head: bool, with_config: bool) -> dict:
    volumes, mounts = _volumes(spec, with_config)
    container = {"name": component, "image": spec.image, "imagePullPolicy": "IfNotPresent", "resources": resources}
    if mounts:
        container["volumeMounts"] = mounts
    if head:
        container["ports"] = [{"containerPort": 6379, "name": "gcs-server"},
                              {"containerPort": 8265, "name": "dashboard"},
                              {"containerPort": 10001, "name": "client"}]
    if spec.storage.uri:
        container["envFrom"] = [{"secretRef": {"name": spec.storage.secret}}]
    pod: dict = {"containers": [container]} | ({"volumes": volumes} if volumes else {})
    if not head and spec.gpus_per_worker:
        pod["tolerations"] = [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}]
    return {"metadata": {"labels": labels(spec, component)}, "spec": pod}


def head_group(spec: JobSpec, with_config: bool = True) -> dict:
    """The head runs the driver (the entrypoint) and the dashboard the job is submitted through."""
    return {"rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": str(spec.head_cpus)},
            "template": _pod_template(spec, "ray-head", _resources(spec.head_cpus, spec.head_memory_gib), True,
                                      with_config)}


def worker_group(spec: JobSpec, with_config: bool = True) -> dict:
    """One fixed-size group (no autoscaling: a DDP run needs all its workers at once)."""
    pods, per_pod = worker_layout(spec)
    gpus = per_pod * spec.gpus_per_worker
    cpus = per_pod * spec.cpus_per_worker
    params = {"num-cpus": str(cpus)} | ({"num-gpus": str(gpus)} if gpus else {})
    resources = _resources(cpus, per_pod * spec.memory_per_worker_gib, gpus)
    return {"groupName": "gpu-workers" if gpus else "cpu-workers", "replicas": pods, "minReplicas": pods,
            "maxReplicas": pods, "rayStartParams": params,
            "template": _pod_template(spec, "ray-worker", resources, False, with_config)}


def cluster_spec(spec: JobSpec, with_config: bool = True) -> dict:
    return {"rayVersion": spec.ray_version, "headGroupSpec": head_group(spec, with_config),
            "workerGroupSpecs": [worker_group(spec, with_config)]}


def ray_job(spec: JobSpec) -> dict:
    """The RayJob: a cluster made for this run, torn down when the entrypoint finishes."""
    job = {"entrypoint": entrypoint(spec), "submissionMode": "K8sJobMode", "shutdownAfterJobFinishes": True,
           "ttlSecondsAfterFinished": spec.ttl_seconds, "backoffLimit": spec.backoff_limit}
    if spec.deadline_seconds is not None:
        job["activeDeadlineSeconds"] = spec.deadline_seconds
    return {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": spec.name, "labels": labels(spec)},
            "spec": job | {"rayClusterSpec": cluster_spec(spec)}}


def ray_cluster(spec: JobSpec) -> dict:
    """A long-lived RayCluster with the same pods but no run config, for interactive use (`ray job submit`)."""
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": spec.name, "labels": labels(spec)},
            "spec": cluster_spec(spec, with_config=False)}


def render_job(config_path: str | Path, spec: JobSpec) -> list[dict]:
    """[ConfigMap, RayJob] for a run; the config is validated first, so a bad one fails here, not on the cluster."""
    from scpermut_dist.config import RunConfig

    RunConfig.from_yaml(config_path)
    return [config_map(spec, Path(config_path).read_text()), ray_job(spec)]


class _Dumper(yaml.SafeDumper):
    """safe_dump, with multi-line strings (the run config) as readable `|` blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)


def dump(docs: list[dict]) -> str:
    """Multi-document YAML, keys in the order built (apiVersion, kind, metadata, spec)."""
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=10_000)
