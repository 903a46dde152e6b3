"""`scpermut launch`: start a training run somewhere else; `launch k8s` renders a KubeRay RayJob for it.

The output (a ConfigMap with the run config and the RayJob) goes to stdout or, atomically, to --out;
`kubectl apply -f` it. Nothing here talks to a cluster.
"""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("launch", help="start a training run on a cluster (k8s: render a KubeRay RayJob)",
                              description=__doc__.splitlines()[0])
    targets = p.add_subparsers(dest="target", required=True)
    k = targets.add_parser("k8s", help="render a ConfigMap + KubeRay RayJob (ray.io/v1) running `scpermut train`",
                           description="Render a ConfigMap + KubeRay RayJob that runs `scpermut train` on the cluster.")
    k.add_argument("--config", required=True, help="YAML run configuration (validated, then shipped as a ConfigMap)")
    k.add_argument("--workers", type=int, default=1, help="Ray Train workers (default 1)")
    k.add_argument("--gpus-per-worker", type=int, default=1, help="GPUs per worker; 0 for a CPU run (default 1)")
    k.add_argument("--gpus-per-node", type=int, default=8,
                   help="GPUs per worker pod at most, i.e. per node (default 8); pods = ceil(workers*gpus/this)")
    k.add_argument("--cpus-per-worker", type=int, default=4, help="CPUs per Ray Train worker (default 4)")
    k.add_argument("--memory-per-worker", type=int, default=16, metavar="GIB", help="memory per worker, GiB (16)")
    k.add_argument("--head-cpus", type=int, default=4, help="CPUs of the head pod, which runs the driver (4)")
    k.add_argument("--head-memory", type=int, default=16, metavar="GIB", help="memory of the head pod, GiB (16)")
    k.add_argument("--image", default=None, help="image built from k8s/Dockerfile (default scpermut-dist:VERSION)")
    k.add_argument("--storage", default="pvc:scpermut-data",
                   help="pvc:CLAIM[:MOUNT] (ReadWriteMany, default mount /data) or s3://bucket/prefix "
                        "(default pvc:scpermut-data)")
    k.add_argument("--s3-secret", default=None, help="with s3:// storage: Secret with AWS_* variables (scpermut-s3)")
    k.add_argument("--name", default=None,
                   help="RayJob name, also the run's folder in storage (default scpermut-<config stem>); "
                        "re-submitting with the same name and storage resumes the run")
    k.add_argument("--max-failures", type=int, default=None, help="passed to `scpermut train` (worker restarts)")
    k.add_argument("--out", default=None, help="write the manifests here (atomically) instead of stdout")
    k.add_argument("--quiet", action="store_true", help="no summary line after writing --out")
    k.set_defaults(func=run_k8s)


def run_k8s(args: argparse.Namespace) -> int:
    from pathlib import Path

    from launch import kuberay
    from scpermut_dist.errors import UsageError

    if args.s3_secret is not None and not args.storage.startswith("s3://"):
        raise UsageError("--s3-secret applies to s3:// storage only")
    spec = kuberay.JobSpec(
        name=args.name or kuberay.default_name(args.config), workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        storage=kuberay.parse_storage(args.storage, args.s3_secret or kuberay.DEFAULT_S3_SECRET),
        image=args.image if args.image is not None else kuberay.DEFAULT_IMAGE, gpus_per_node=args.gpus_per_node,
        cpus_per_worker=args.cpus_per_worker, memory_per_worker_gib=args.memory_per_worker,
        head_cpus=args.head_cpus, head_memory_gib=args.head_memory, max_failures=args.max_failures)
    text = kuberay.dump(kuberay.render_job(args.config, spec))
    if args.out is None:
        print(text, end="")
        return 0
    out = Path(args.out)
    if out.is_dir() or not out.parent.is_dir():
        raise UsageError(f"--out {out}: give a file in an existing folder, e.g. {spec.name}.yaml")
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text)
    tmp.replace(out)
    if not args.quiet:
        pods, per_pod = kuberay.worker_layout(spec)
        storage_path = kuberay.run_paths(spec)[1]
        kind = f"{spec.gpus_per_worker}-GPU" if spec.gpus_per_worker else "CPU"
        print(f"wrote {out}: RayJob {spec.name}, {spec.workers} {kind} worker(s) on {pods} pod(s) of {per_pod}, "
              f"checkpoints in {storage_path}; kubectl apply -f {out}")
    return 0
