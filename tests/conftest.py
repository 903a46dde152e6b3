"""Shared test fixtures: paths to the real datasets and a quiet, single-threaded torch."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATASETS = SHARED / "datasets"


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    if not DATASETS.exists():
        pytest.fail(f"expected the shared datasets beside the repository at {DATASETS}")
    return DATASETS


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    import torch

    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One real local Ray for the whole test session (ray.init ~3 s; every TorchTrainer reuses it)."""
    import ray

    os.environ["RAY_TRAIN_V2_ENABLED"] = "1"
    tmp = tmp_path_factory.mktemp("ray")  # short: Ray's socket paths must stay under ~100 characters
    ray.init(num_cpus=4, include_dashboard=False, _temp_dir=str(tmp), log_to_driver=False,
             configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def census_store_3k(tmp_path_factory) -> Path:
    """A small Census-shaped SOMA collection: 3,000 human cells x 300 genes, 3 datasets."""
    from loaders.synth import synthesize_census

    path = tmp_path_factory.mktemp("stores") / "census3k"
    synthesize_census(str(path), 3000, 300, seed=0, n_datasets=3)
    return path
