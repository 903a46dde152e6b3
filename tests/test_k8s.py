"""KubeRay manifests, offline: every file under k8s/, every overlay as kustomize builds it and every output of
`scpermut launch k8s` against the KubeRay CRD schemas and Kubernetes' own (k8s/validate_manifests.py), and the
base and overlays against the renderer, so they cannot drift from each other."""
from __future__ import annotations

import copy
import functools
import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from launch import kuberay
from scpermut_dist.commands.main import build_parser, main
from scpermut_dist.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"k8s_{name}", K8S / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


vm = _load("validate_manifests")
generate = _load("generate")
INVENTORY = vm.inventory()
BUILDS = [k.parent.relative_to(K8S).as_posix() for k in INVENTORY["kustomizations"]]


@pytest.fixture(autouse=True, scope="module")
def _schemas():
    missing = [f for f in vm.CRD_FILES.values() if not (vm.SCHEMAS / f).is_file()]
    if missing:
        pytest.fail(f"expected the KubeRay CRDs {missing} in {vm.SCHEMAS} (shared/ beside the repository)")


@functools.cache
def build(folder: str) -> tuple[dict, ...]:
    return tuple(vm.kustomize_build(K8S / folder))


def render(argv: list[str], tmp_path: Path) -> list[dict]:
    out = tmp_path / "job.yaml"
    assert main(["launch", "k8s", *argv, "--out", str(out), "--quiet"]) == 0
    return [d for d in yaml.safe_load_all(out.read_text()) if d]


def by_kind(docs) -> dict[str, dict]:
    return {d["kind"]: d for d in docs}


def test_every_yaml_under_k8s_has_a_role():
    roles = {role: {p.relative_to(K8S).as_posix() for p in paths} for role, paths in INVENTORY.items()}
    assert {"base", "overlays/gpu-2x8", "overlays/s3", "overlays/cpu-small"} <= set(BUILDS)
    assert {"base/pvc.yaml", "base/rayjob-train.yaml", "base/raycluster.yaml"} <= roles["manifests"]
    assert {"base/run.yaml", "overlays/cpu-small/run.yaml"} == roles["generated"]
    for k in INVENTORY["kustomizations"]:  # the current kustomize API, no deprecated fields
        spec = yaml.safe_load(k.read_text())
        assert spec["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and spec["kind"] == "Kustomization"
        assert not {"patchesStrategicMerge", "patchesJson6902", "bases", "commonLabels"} & set(spec), k


@pytest.mark.parametrize("path", [p.relative_to(K8S).as_posix() for p in INVENTORY["manifests"]])
def test_manifest_is_valid(path):
    docs = [d for d in yaml.safe_load_all((K8S / path).read_text()) if d]
    assert docs and [p for d in docs for p in vm.problems(d)] == []


@pytest.mark.parametrize("path", [p.relative_to(K8S).as_posix() for p in INVENTORY["generated"]])
def test_run_configs_are_valid(path):
    RunConfig.from_yaml(K8S / path)


@pytest.mark.parametrize("folder", BUILDS)
def test_build_is_valid_and_complete(folder):
    docs = build(folder)
    assert [p for d in docs for p in vm.problems(d)] == []
    present = {(d["kind"], d["metadata"]["name"]) for d in docs}
    secrets = {yaml.safe_load(p.read_text())["metadata"]["name"] for p in K8S.rglob("secret.example.yaml")}
    for d in docs:
        for kind, name in vm.references(d):  # every ConfigMap and claim a pod mounts comes with it
            assert (kind, name) in present or (kind == "Secret" and name in secrets), (folder, kind, name)
        if d["kind"] == "ConfigMap":
            RunConfig.validate_dict(yaml.safe_load(d["data"][kuberay.CONFIG_FILE]))


@pytest.mark.parametrize("folder", BUILDS)
def test_build_equals_its_render_line(folder, tmp_path, monkeypatch):
    """Each kustomization.yaml names the `scpermut launch k8s` command it equals; the two must agree exactly."""
    (line,) = re.findall(r"^# render: (scpermut launch k8s .*)$", (K8S / folder / "kustomization.yaml").read_text(),
                         re.MULTILINE)
    monkeypatch.chdir(ROOT)
    rendered = render(shlex.split(line)[3:], tmp_path)
    built = by_kind(build(folder))
    assert set(built) - {"PersistentVolumeClaim"} == {"ConfigMap", "RayJob"}
    assert built["RayJob"] == by_kind(rendered)["RayJob"]
    assert built["ConfigMap"] == by_kind(rendered)["ConfigMap"]


def test_generated_base_is_up_to_date():
    for path, text in generate.generated().items():
        assert path.read_text() == text, f"{path} is stale: run python k8s/generate.py"
    assert by_kind(build("base"))["RayJob"] == kuberay.ray_job(generate.REFERENCE)


@pytest.mark.parametrize("argv", [
    ["--workers", "16", "--gpus-per-worker", "1"],
    ["--workers", "10", "--gpus-per-worker", "1", "--storage", "pvc:shared:/mnt/shared", "--max-failures", "3"],
    ["--workers", "3", "--gpus-per-worker", "4", "--storage", "s3://bucket/prefix/runs", "--s3-secret", "my-keys"],
    ["--workers", "2", "--gpus-per-worker", "0", "--cpus-per-worker", "1", "--memory-per-worker", "2"],
])
def test_rendered_outputs_are_valid(argv, tmp_path):
    docs = render(["--config", str(K8S / "base" / "run.yaml"), *argv], tmp_path)
    assert [d["kind"] for d in docs] == ["ConfigMap", "RayJob"]
    assert [p for d in docs for p in vm.problems(d)] == []
    train = build_parser().parse_args(shlex.split(docs[1]["spec"]["entrypoint"])[1:])  # `scpermut train` takes it
    assert (train.command, train.config, train.workers) == ("train", "/etc/scpermut/run.yaml", int(argv[1]))
    assert train.gpus_per_worker == float(argv[3]) and train.out and train.storage_path


def _groups(job: dict) -> tuple[dict, dict]:
    cluster = job["spec"]["rayClusterSpec"]
    return cluster["headGroupSpec"], cluster["workerGroupSpecs"][0]


def _container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]


def test_pvc_render_gpus_replicas_and_entrypoint(tmp_path):
    cfg = K8S / "base" / "run.yaml"
    docs = by_kind(render(["--config", str(cfg), "--workers", "16", "--gpus-per-worker", "1", "--name", "ref",
                           "--storage", "pvc:atlas:/mnt/atlas", "--image", "reg/img:1"], tmp_path))
    job = docs["RayJob"]
    head, workers = _groups(job)
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == 2  # ceil(16 * 1 / 8)
    assert workers["rayStartParams"]["num-gpus"] == "8"
    assert _container(workers)["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert _container(workers)["resources"]["requests"]["nvidia.com/gpu"] == "8"
    assert "nvidia.com/gpu" not in _container(head)["resources"]["limits"]
    assert shlex.split(job["spec"]["entrypoint"]) == [
        "scpermut", "train", "--config", "/etc/scpermut/run.yaml", "--workers", "16", "--gpus-per-worker", "1",
        "--cpus-per-worker", "4", "--out", "/mnt/atlas/runs/ref", "--storage-path", "/mnt/atlas/runs/ref"]
    for group in (head, workers):  # the same claim at the same path, and the config, in every pod
        assert {"name": "data", "mountPath": "/mnt/atlas"} in _container(group)["volumeMounts"]
        assert {"name": "data", "persistentVolumeClaim": {"claimName": "atlas"}} in group["template"]["spec"]["volumes"]
        assert {"name": "run-config", "configMap": {"name": "ref-config"}} in group["template"]["spec"]["volumes"]
        assert _container(group)["image"] == "reg/img:1"
    assert job["spec"]["shutdownAfterJobFinishes"] is True and job["spec"]["ttlSecondsAfterFinished"] > 0
    assert docs["ConfigMap"]["metadata"]["name"] == "ref-config"
    assert docs["ConfigMap"]["data"]["run.yaml"] == cfg.read_text()


def test_s3_render_storage_path_scratch_and_secret(tmp_path):
    cfg = tmp_path / "Lung Atlas.yaml"
    cfg.write_text("train:\n  device: cuda\n")
    job = by_kind(render(["--config", str(cfg), "--workers", "4", "--gpus-per-worker", "2",
                          "--storage", "s3://bucket/runs/"], tmp_path))["RayJob"]
    assert job["metadata"]["name"] == "scpermut-lung-atlas"  # from the config file's name
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[argv.index("--storage-path") + 1] == "s3://bucket/runs/scpermut-lung-atlas"
    assert argv[argv.index("--out") + 1] == "/scratch/runs/scpermut-lung-atlas"
    head, workers = _groups(job)
    assert workers["replicas"] == 1 and workers["rayStartParams"]["num-gpus"] == "8"  # 4 x 2 GPUs on one node
    for group in (head, workers):  # RUN_DIR on a local emptyDir in every pod (workers write rank files there)
        assert {"name": "scratch", "emptyDir": {}} in group["template"]["spec"]["volumes"]
        assert _container(group)["envFrom"] == [{"secretRef": {"name": "scpermut-s3"}}]
        assert not [v for v in group["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v]


def test_cpu_render_one_pod_per_worker(tmp_path):
    job = by_kind(render(["--config", str(K8S / "base" / "run.yaml"), "--workers", "3", "--gpus-per-worker", "0",
                          "--cpus-per-worker", "2", "--memory-per-worker", "4"], tmp_path))["RayJob"]
    _, workers = _groups(job)
    assert workers["replicas"] == 3 and "num-gpus" not in workers["rayStartParams"]
    assert _container(workers)["resources"]["requests"] == {"cpu": "2", "memory": "4Gi"}
    assert "tolerations" not in workers["template"]["spec"]


@pytest.mark.parametrize(("workers", "gpus", "per_node", "layout"), [
    (16, 1, 8, (2, 8)), (10, 1, 8, (2, 5)), (4, 1, 8, (1, 4)), (3, 4, 8, (2, 2)), (5, 0, 8, (5, 1))])
def test_worker_layout(workers, gpus, per_node, layout):
    spec = kuberay.JobSpec(name="x", workers=workers, gpus_per_worker=gpus, gpus_per_node=per_node,
                           storage=kuberay.parse_storage("pvc:data"))
    assert kuberay.worker_layout(spec) == layout


def test_out_is_replaced_atomically(tmp_path, capsys):
    out = tmp_path / "job.yaml"
    out.write_text("old")
    assert main(["launch", "k8s", "--config", str(K8S / "base" / "run.yaml"), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out and "RayJob" in out.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["job.yaml"]  # no temporary file left behind


def test_stdout_when_no_out(capsys):
    assert main(["launch", "k8s", "--config", str(K8S / "base" / "run.yaml")]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["kind"] for d in docs] == ["ConfigMap", "RayJob"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--storage", "nfs://server/export"], "pvc:CLAIM"),
    (["--storage", "pvc:"], "claim must be"),
    (["--storage", "pvc:data:relative/path"], "absolute path"),
    (["--storage", "s3://"], "s3://bucket"),
    (["--storage", "pvc:data", "--s3-secret", "keys"], "s3:// storage only"),
    (["--workers", "0"], "at least one"),
    (["--gpus-per-worker", "-1"], "--gpus-per-worker"),
    (["--gpus-per-worker", "16"], "--gpus-per-node"),
    (["--name", "Bad_Name"], "--name"),
    (["--name", "x" * 48], "at most 47"),
    (["--config", "missing.yaml"], "does not exist"),
    (["--config", "BAD"], "nonsense"),
])
def test_bad_options_exit_2_and_write_nothing(argv, message, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  nonsense: 1\n")
    argv = [str(bad) if a == "BAD" else str(tmp_path / a) if a == "missing.yaml" else a for a in argv]
    if "--config" not in argv:
        argv += ["--config", str(K8S / "base" / "run.yaml")]
    out = tmp_path / "job.yaml"
    assert main(["launch", "k8s", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def _reference_job() -> dict:
    return copy.deepcopy(kuberay.ray_job(generate.REFERENCE))


@pytest.mark.parametrize(("mutate", "expected"), [
    (lambda j: _groups(j)[1].__setitem__("rayStartParam", _groups(j)[1].pop("rayStartParams")),
     "workerGroupSpecs[0].rayStartParam: not in the schema"),
    (lambda j: _groups(j)[1].__setitem__("replicas", "2"), "'2' is not of type 'integer'"),
    (lambda j: _groups(j)[0]["rayStartParams"].__setitem__("num-cpus", 4), "4 is not of type 'string'"),
    (lambda j: j["spec"].__setitem__("shutdownAfterJobFinish", True), ".spec.shutdownAfterJobFinish: not in"),
    (lambda j: _container(_groups(j)[0]).__setitem__("imagePullPolicy", 1), "1 is not of type 'string'"),
    (lambda j: _container(_groups(j)[0])["resources"]["limits"].__setitem__("cpu", "four"), "does not match"),
    (lambda j: _groups(j)[0]["template"]["spec"].__setitem__("volumes", {"name": "x"}), "is not of type 'array'"),
    (lambda j: j["metadata"].__setitem__("labelz", {}), "'labelz' was unexpected"),
    (lambda j: j["metadata"].__setitem__("name", "Bad_Name"), "not a DNS-1123 name"),
    (lambda j: j.__setitem__("apiVersion", "ray.io/v1alpha2"), "not a KubeRay v1 kind"),
])
def test_validator_catches_broken_rayjobs(mutate, expected):
    job = _reference_job()
    assert vm.problems(job) == []
    mutate(job)
    assert any(expected in p for p in vm.problems(job)), vm.problems(job)


def test_validator_catches_broken_core_objects():
    pvc = yaml.safe_load((K8S / "base" / "pvc.yaml").read_text())
    pvc["spec"]["accesModes"] = pvc["spec"].pop("accessModes")
    assert any("'accesModes' was unexpected" in p for p in vm.problems(pvc))
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"run.yaml": 1}}
    assert any("is not of type 'string'" in p for p in vm.problems(config_map))


def test_dockerfile_builds_the_cli_with_the_rendered_ray():
    text = (K8S / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.MULTILINE)
    assert f"ARG RAY_VERSION={kuberay.RAY_VERSION}\n" in text  # the RayJob's rayVersion is the image's Ray
    assert '".[ray]"' in text and "ARG TORCH=" in text and "scpermut --help" in text
