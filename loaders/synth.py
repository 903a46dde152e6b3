"""Synthetic atlases that behave like real ones: a Census-shaped SOMA store on disk, or an AnnData.

`synthesize_census` writes chunk by chunk (memory bounded whatever `n_cells`) into a temporary
sibling and renames it at the end. X uses the Census X layout: 2048 x 2048 tiles, capacity 2**16,
row-major, zstd. See `synth_model` for the biology.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp

from loaders.atomic import atomic_directory, check_new_directory
from loaders.errors import DataError
from loaders.soma_layout import x_platform_config
from loaders.synth_model import DEFAULT_RARE, Design
from loaders.synth_vocab import ASSAYS, CELL_TYPES, DEV_STAGES, DISEASES, ETHNICITIES, RARE_TYPES, SEXES, TISSUES

GEN_VALUES = 16_000_000  # dense int32 values per generation block (64 MB), whatever n_genes


def gen_rows(n_genes: int) -> int:
    """Rows per generation block; results do not depend on it (draws are hashed by row and gene)."""
    return int(max(64, min(8192, GEN_VALUES // n_genes)))
ALL_TYPES = [t[0] for t in CELL_TYPES] + [t[0] for t in RARE_TYPES]
ALL_TISSUES = sorted(t for _, specific in TISSUES.values() for t in specific)


def _levels(design: Design) -> dict[str, tuple[np.ndarray, list[str], str]]:
    """obs column -> (code per entity, categories, entity kind in 'dataset'|'donor'|'type')."""
    mouse = design.organism == "mus_musculus"
    ds, dn = design.datasets, design.donors
    per = {
        "dataset_id": ("dataset", [d["dataset_id"] for d in ds]),
        "assay": ("dataset", [ASSAYS[d["kind"]][0] for d in ds]),
        "assay_ontology_term_id": ("dataset", [ASSAYS[d["kind"]][1] for d in ds]),
        "suspension_type": ("dataset", [ASSAYS[d["kind"]][4] for d in ds]),
        "tissue": ("dataset", [d["tissue"] for d in ds]),
        "tissue_ontology_term_id": ("dataset", [f"UBERON:99{ALL_TISSUES.index(d['tissue']):05d}" for d in ds]),
        "tissue_type": ("dataset", ["tissue" for _ in ds]),
        "tissue_general": ("dataset", [d["tissue_general"] for d in ds]),
        "tissue_general_ontology_term_id": ("dataset", [TISSUES[d["tissue_general"]][0] for d in ds]),
        "cell_type": ("type", list(design.cell_types)),
        "cell_type_ontology_term_id": ("type", [f"CL:99{ALL_TYPES.index(t):05d}" for t in design.cell_types]),
        "donor_id": ("donor", [d["donor_id"] for d in dn]),
        "sex": ("donor", [d["sex"] for d in dn]),
        "sex_ontology_term_id": ("donor", [SEXES[d["sex"]] for d in dn]),
        "development_stage": ("donor", [d["development_stage"] for d in dn]),
        "development_stage_ontology_term_id": (
            "donor", [f"{'MmusDv' if mouse else 'HsapDv'}:99{DEV_STAGES.index(d['development_stage']):05d}" for d in dn]),
        "disease": ("donor", [d["disease"] for d in dn]),
        "disease_ontology_term_id": ("donor", [DISEASES[d["disease"]] for d in dn]),
        "self_reported_ethnicity": ("donor", ["na" if mouse else d["ethnicity"] for d in dn]),
        "self_reported_ethnicity_ontology_term_id": ("donor", ["na" if mouse else ETHNICITIES[d["ethnicity"]] for d in dn]),
    }
    out = {}
    for col, (kind, values) in per.items():
        codes, cats = pd.factorize(pd.Series(values, dtype=object), sort=True)
        out[col] = (codes.astype(np.int32), [str(c) for c in cats], kind)
    return out


def obs_columns(design: Design, levels: dict, cells: dict, x: sp.csr_matrix) -> dict[str, object]:
    """Census obs columns for one block: categorical ones as (codes, categories), the rest as arrays."""
    entity = {"dataset": cells["dataset"], "donor": cells["donor"], "type": cells["cell_type"]}
    cols: dict[str, object] = {"soma_joinid": cells["row"]}
    for col, (codes, cats, kind) in levels.items():
        cols[col] = (codes[entity[kind]], cats)
    is_primary = np.array([d["source"] < 0 for d in design.datasets])
    cols["is_primary_data"] = is_primary[cells["dataset"]]
    cols["observation_joinid"] = np.array([f"{g * 2654435761 % 2**40:010x}" for g in cells["gen_id"]], dtype=object)
    nnz = np.diff(x.indptr).astype(np.int64)
    row_of_value = np.repeat(np.arange(x.shape[0]), nnz)
    values = x.data.astype(np.float64)
    raw_sum = np.bincount(row_of_value, weights=values, minlength=x.shape[0])
    sq = np.bincount(row_of_value, weights=values * values, minlength=x.shape[0])
    mean_nnz = np.divide(raw_sum, nnz, out=np.zeros_like(raw_sum), where=nnz > 0)
    var_nnz = np.divide(sq - nnz * mean_nnz**2, nnz - 1, out=np.zeros_like(raw_sum), where=nnz > 1)
    measured = np.array([int(d["measured"].sum()) for d in design.datasets], dtype=np.int64)
    cols.update(raw_sum=raw_sum, nnz=nnz, raw_mean_nnz=mean_nnz, raw_variance_nnz=np.clip(var_nnz, 0, None),
                n_measured_vars=measured[cells["dataset"]])
    return cols


def generate_block(design: Design, start: int, stop: int) -> tuple[dict, sp.csr_matrix]:
    cells = design.cells(start, stop)
    return cells, design.counts_csr(cells)


def synthesize_anndata(n_cells: int, n_genes: int, *, seed: int = 0, n_batches: int | None = None,
                       rare_fracs: tuple[float, ...] = DEFAULT_RARE, n_cell_types: int | None = None,
                       batch_strength: float = 1.0, donors_per_batch: float = 2.0, n_tissues: int | None = None,
                       rare_subtype_markers: float | None = None):
    """In-memory AnnData from the same model (no re-published duplicates): X = CSR float32 counts,
    obs `cell_type`, `batch` (= dataset), `dataset_id`, `donor_id`, `assay`, `tissue_general`."""
    import anndata as ad

    design = Design(n_cells, n_genes, seed=seed, n_datasets=n_batches, n_cell_types=n_cell_types,
                    rare_fracs=rare_fracs, batch_strength=batch_strength, secondary=False,
                    donors_per_dataset=donors_per_batch, n_tissues=n_tissues, rare_subtype_markers=rare_subtype_markers)
    levels = _levels(design)
    parts, obs_parts = [], []
    step = gen_rows(n_genes)
    for start in range(0, n_cells, step):
        cells, x = generate_block(design, start, min(start + step, n_cells))
        cols = obs_columns(design, levels, cells, x)
        obs_parts.append(pd.DataFrame({k: pd.Categorical.from_codes(cols[k][0], cols[k][1])
                                       for k in ("cell_type", "dataset_id", "donor_id", "assay", "tissue_general")}))
        obs_parts[-1]["batch"] = pd.Categorical.from_codes(cells["dataset"], [f"batch_{k}" for k in
                                                                               range(len(design.datasets))])
        parts.append(x)
    obs = pd.concat(obs_parts, ignore_index=True)
    obs.index = [f"cell_{i}" for i in range(n_cells)]
    var = pd.DataFrame({"feature_id": design.feature_id}, index=pd.Index(design.feature_name, name=None))
    return ad.AnnData(X=sp.vstack(parts, format="csr"), obs=obs, var=var)


def synthesize_census(uri: str | os.PathLike, n_cells: int, n_genes: int, *, seed: int = 0,
                      n_datasets: int | None = None, n_cell_types: int | None = None,
                      rare_fracs: tuple[float, ...] = DEFAULT_RARE, mouse_cells: int | None = None,
                      chunk_cells: int = 65536, normalized: bool = False, zstd_level: int = 5,
                      progress: bool = False) -> dict:
    """Write a Census-shaped SOMA Collection at `uri` (a local path); returns a summary dict.

    `mouse_cells` (default ~1 % of n_cells, 100..2000) adds a small `mus_musculus` Experiment.
    """
    import tiledbsoma as soma

    from loaders.synth_census import write_census_info, write_experiment

    path = Path(uri)
    check_new_directory(path)
    if n_cells < 1 or n_genes < 10:
        raise DataError(f"need n_cells >= 1 and n_genes >= 10 (got {n_cells}, {n_genes}).")
    t0 = time.perf_counter()
    with atomic_directory(path) as tmp:
        human = Design(n_cells, n_genes, seed=seed, n_datasets=n_datasets, n_cell_types=n_cell_types,
                       rare_fracs=rare_fracs)
        n_mouse = min(2000, max(100, n_cells // 100)) if mouse_cells is None else int(mouse_cells)
        designs = {"homo_sapiens": human}
        if n_mouse > 0:
            designs["mus_musculus"] = Design(n_mouse, n_genes, seed=seed + 1, n_datasets=2, rare_fracs=(),
                                             organism="mus_musculus")
        offset = 0
        for design in designs.values():  # presence-matrix rows index census_info/datasets across organisms
            design.dataset_offset, offset = offset, offset + len(design.datasets)
        for design in designs.values():
            design.n_datasets_total = offset
        with soma.Collection.create(str(tmp)) as root:
            data = root.add_new_collection("census_data")
            counts = {}
            for key, design in designs.items():
                counts[key] = write_experiment(data, key, design, chunk_cells=chunk_cells, normalized=normalized,
                                               x_config=x_platform_config(zstd_level), progress=progress)
            write_census_info(root.add_new_collection("census_info"), designs, counts)
    hs = counts["homo_sapiens"]
    return dict(uri=str(path), n_cells=n_cells, n_genes=n_genes, nnz=hs["nnz"], seconds=time.perf_counter() - t0,
                n_datasets=len(human.datasets), n_cell_types=len(human.cell_types), mouse_cells=n_mouse,
                bytes_on_disk=sum(f.stat().st_size for f in path.rglob("*") if f.is_file()))


def to_arrow(cols: dict, schema: pa.Schema) -> pa.Table:
    arrays = []
    for field in schema:
        v = cols[field.name]
        if isinstance(v, tuple):
            arrays.append(pa.DictionaryArray.from_arrays(pa.array(v[0], pa.int32()), pa.array(v[1], pa.large_string())))
        else:
            arrays.append(pa.array(v, type=field.type))
    return pa.Table.from_arrays(arrays, schema=schema)
