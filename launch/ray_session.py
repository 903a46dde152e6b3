"""Where a run's Ray comes from: an existing cluster (`--address` / RAY_ADDRESS) or the embedded default,
a local Ray started in this process with its temporary files under the run folder (or a short path: Ray's
socket paths must stay under ~100 characters)."""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterator


def _temp_dir(run_dir: Path) -> str:
    candidate = run_dir / ".ray_tmp"
    if len(str(candidate)) <= 60:
        return str(candidate)
    digest = hashlib.sha1(str(run_dir).encode()).hexdigest()[:10]
    return os.path.join(tempfile.gettempdir(), f"scpermut-ray-{digest}")


@contextlib.contextmanager
def ray_session(run_dir: str | Path, address: str | None = None, num_cpus: int | None = None,
                num_gpus: int | None = None, quiet: bool = False) -> Iterator[str]:
    """Yields a description of the cluster; shuts down only a Ray it started itself."""
    import ray

    if ray.is_initialized():  # a caller (tests, a notebook) owns the session
        current = ray.get_runtime_context().gcs_address
        if address and address not in (current, "auto"):  # host aliases make a mismatch a guess: warn, don't refuse
            logging.getLogger(__name__).warning(
                "--address %s is not used: this process is already connected to the Ray cluster at %s "
                "(ray.shutdown() first to connect elsewhere)", address, current)
        yield f"existing Ray session ({current})"
        return
    address = address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if address:
        ray.init(address=address, log_to_driver=not quiet)
        where = f"Ray cluster at {address}"
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private, single-machine cluster
        tmp = _temp_dir(Path(run_dir).absolute())
        Path(tmp).mkdir(parents=True, exist_ok=True)
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, _temp_dir=tmp,
                 configure_logging=False, log_to_driver=not quiet)
        where = f"local Ray ({int(ray.cluster_resources().get('CPU', 0))} CPUs, temp {tmp})"
    try:
        yield where
    finally:
        ray.shutdown()
