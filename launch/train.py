"""`scpermut train --workers N`: the reference build on Ray Train, on a local Ray or an existing cluster.

Everything that can be wrong with the input is checked before Ray starts: the worker count, the run
folder, the source (generated first when the config asks for it), the label column and the filter (by the
preparation, which runs here once and is stored in the run folder).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from scpermut_dist.config import RunConfig
from scpermut_dist.errors import UsageError


def train_on_ray(uri: str, cfg: RunConfig, args: argparse.Namespace, organism: str | None) -> int:
    from launch.ray_session import ray_session
    from loaders.sources import spec_from_uri
    from scpermut_dist.train.distributed import Scaling, prepare_run, run_on_ray

    scaling = Scaling(workers=args.workers if args.workers is not None else 1, gpus_per_worker=args.gpus_per_worker,
                      cpus_per_worker=args.cpus_per_worker, max_failures=args.max_failures)
    scaling.check()
    uri = uri if "://" in uri else str(Path(uri).absolute())  # workers do not share the driver's cwd
    run_dir = Path(args.out).absolute()
    check_run_dir(run_dir)
    ensure_source(uri, cfg, quiet=args.quiet)
    options = {"layer": cfg.data.layer, "organism": organism}

    def factory(selection):
        return spec_from_uri(uri, selection, **options)

    arrays = prepare_run(uri, factory, cfg, run_dir, quiet=args.quiet)  # fails here, before Ray, on bad input
    local_cpus = max(os.cpu_count() or 1, int(scaling.workers * scaling.cpus_per_worker))
    with ray_session(run_dir, args.address, num_cpus=local_cpus, quiet=args.quiet) as where:
        print(f"training on {scaling.workers} worker(s), {where}", flush=True)
        from ray.train import TrainingFailedError

        try:
            out = run_on_ray(uri, factory, cfg, run_dir, scaling, storage_path=args.storage_path, quiet=args.quiet,
                             arrays=arrays)
        except TrainingFailedError as exc:
            print(f"error: the run failed after {scaling.max_failures} restart(s): {exc}\n"
                  f"Its checkpoints are kept: re-run the same command (same --out) to resume.", file=sys.stderr)
            return 1
    # as the in-process summary counts: training cells here, validation cells on the next line
    print(f"trained on {out['n_train_cells']} cells ({out['n_classes']} types, {out['n_batches']} batches, "
          f"{out['n_genes']} genes) with {scaling.workers} worker(s) in {out['wall_seconds']:.1f} s, "
          f"{out.get('step', 0)} steps")
    if "val_balanced_accuracy" in out:
        print(f"validation ({out['n_val_cells']} cells): balanced accuracy {out['val_balanced_accuracy']:.4f}, "
              f"accuracy {out['val_accuracy']:.4f}, "
              f"macro F1 {out.get('val_macro_f1', float('nan')):.4f}")
    print(f"metrics: {run_dir / 'metrics.jsonl'}")
    print(f"checkpoint: {out['model']}")
    return 0


def check_run_dir(run_dir: Path) -> None:
    """A run folder is new, empty, or one this command made (it then resumes)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--out {run_dir} is a file; give a folder for the run")
    if run_dir.is_dir() and (run_dir / "manifest.json").exists():
        raise UsageError(f"--out {run_dir} is a model checkpoint, not a run folder; choose another path "
                         "(a Ray run writes its model to RUN_DIR/model)")
    known = {"prepared", "settings.json", "ray", "metrics.jsonl", "workers", "model", ".ray_tmp"}
    if run_dir.is_dir():
        other = [p.name for p in run_dir.iterdir() if p.name not in known and not p.name.startswith(".")]
        if other:
            raise UsageError(f"--out {run_dir} holds files that are not a scpermut run ({other[:5]}); "
                             "choose a new folder")


def ensure_source(uri: str, cfg: RunConfig, quiet: bool = True) -> None:
    """Generate the config's Census-shaped store if it is missing (`data.generate`), as `scpermut synth` would."""
    gen = cfg.data.generate
    if gen is None or Path(uri).exists() or "://" in uri:
        return
    from loaders.synth import synthesize_census

    print(f"generating a Census-shaped store at {uri} ({gen.cells} cells x {gen.genes} genes)", flush=True)
    synthesize_census(uri, gen.cells, gen.genes, seed=gen.seed, n_datasets=gen.datasets, progress=not quiet)
