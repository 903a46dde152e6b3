"""Writers for the Census-shaped store (`loaders.synth.synthesize_census`): one organism's Experiment,
streamed in row chunks, and the `census_info` tables computed from what was written."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp

from loaders.soma_layout import WRITE_SORTED, coo_table_global_order, reopen_for_write
from loaders.synth import _levels, gen_rows, generate_block, obs_columns, to_arrow

MAX_CHUNK_NNZ = 16_000_000  # stored values per write: bounds memory (~1-2 GB peak) whatever n_genes
SUMMARY_CATEGORIES = ("assay", "cell_type", "disease", "self_reported_ethnicity", "sex", "suspension_type", "tissue",
                      "tissue_general")
ORGANISMS = {"homo_sapiens": ("Homo sapiens", "NCBITaxon:9606"), "mus_musculus": ("Mus musculus", "NCBITaxon:10090")}
NUMERIC_OBS = {"soma_joinid": pa.int64(), "is_primary_data": pa.bool_(), "observation_joinid": pa.large_string(),
               "raw_sum": pa.float64(), "nnz": pa.int64(), "raw_mean_nnz": pa.float64(),
               "raw_variance_nnz": pa.float64(), "n_measured_vars": pa.int64()}
OBS_ORDER = ["soma_joinid", "dataset_id", "assay", "assay_ontology_term_id", "cell_type", "cell_type_ontology_term_id",
             "development_stage", "development_stage_ontology_term_id", "disease", "disease_ontology_term_id",
             "donor_id", "is_primary_data", "observation_joinid", "self_reported_ethnicity",
             "self_reported_ethnicity_ontology_term_id", "sex", "sex_ontology_term_id", "suspension_type", "tissue",
             "tissue_ontology_term_id", "tissue_type", "tissue_general", "tissue_general_ontology_term_id", "raw_sum",
             "nnz", "raw_mean_nnz", "raw_variance_nnz", "n_measured_vars"]


def obs_schema() -> pa.Schema:
    return pa.schema([(c, NUMERIC_OBS.get(c, pa.dictionary(pa.int32(), pa.large_string()))) for c in OBS_ORDER])


def write_experiment(data, key: str, design, *, chunk_cells: int, normalized: bool, x_config: dict,
                     progress: bool) -> dict:
    """Write census_data/<key>; returns nnz, per-gene nnz and per-category cell counts for census_info."""
    import tiledbsoma as soma

    n, g = design.n_cells, design.n_genes
    levels = _levels(design)
    schema = obs_schema()
    exp = data.add_new_collection(key, soma.Experiment)
    obs = exp.add_new_dataframe("obs", schema=schema, index_column_names=["soma_joinid"], domain=[(0, n - 1)])
    rna = exp.add_new_collection("ms").add_new_collection("RNA", soma.Measurement)
    xs = rna.add_new_collection("X")
    names = ["raw", "normalized"] if normalized else ["raw"]
    layers = {name: xs.add_new_sparse_ndarray(name, type=pa.float32(), shape=(n, g), platform_config=x_config)
              for name in names}
    obs = reopen_for_write(obs, {col: cats for col, (_, cats, _) in levels.items()})
    layers = {name: reopen_for_write(arr) for name, arr in layers.items()}
    gene_nnz = np.zeros(g, dtype=np.int64)
    cat_counts = {c: (np.zeros(len(levels[c][1]), np.int64), np.zeros(len(levels[c][1]), np.int64))
                  for c in SUMMARY_CATEGORIES}
    from tqdm.auto import tqdm

    bar = tqdm(total=n, desc=f"synth {key}", unit="cells", unit_scale=True, disable=not progress)
    with ThreadPoolExecutor(max_workers=1) as writer:  # write chunk k while chunk k+1 is generated
        pending = None
        for start, cols, x in _chunks(design, levels, chunk_cells):
            bar.update(x.shape[0])
            gene_nnz += np.bincount(x.indices, minlength=g)
            for c in SUMMARY_CATEGORIES:
                codes = cols[c][0]
                cat_counts[c][0][:] += np.bincount(codes, minlength=len(cat_counts[c][0]))
                cat_counts[c][1][:] += np.bincount(codes[cols["is_primary_data"]], minlength=len(cat_counts[c][1]))
            if pending is not None:
                pending.result()
            pending = writer.submit(_write_chunk, obs, layers, to_arrow(cols, schema), x, start, cols["raw_sum"])
        if pending is not None:
            pending.result()
    bar.close()
    obs.close()
    for arr in layers.values():
        arr.close()
    _write_var(rna, design, gene_nnz)
    _write_presence(rna, design)
    exp.close()
    return dict(nnz=int(gene_nnz.sum()), cat_counts=cat_counts, levels=levels)


def _chunks(design, levels: dict, chunk_cells: int, max_nnz: int = MAX_CHUNK_NNZ):
    """Yield (start, obs columns, CSR counts) per write chunk: `chunk_cells` rows or `max_nnz` values,
    whichever comes first, generated in blocks of `gen_rows(n_genes)` rows."""
    step = gen_rows(design.n_genes)
    start, blocks, nnz = 0, [], 0
    for s in range(0, design.n_cells, step):
        cells, xb = generate_block(design, s, min(s + step, design.n_cells))
        blocks.append((cells, xb, obs_columns(design, levels, cells, xb)))
        nnz += xb.nnz
        stop = min(s + step, design.n_cells)
        if stop - start >= chunk_cells or nnz >= max_nnz or stop == design.n_cells:
            x = blocks[0][1] if len(blocks) == 1 else sp.vstack([b[1] for b in blocks], format="csr")
            merged = {}
            for k, v in blocks[0][2].items():
                merged[k] = ((np.concatenate([b[2][k][0] for b in blocks]), v[1]) if isinstance(v, tuple)
                             else np.concatenate([b[2][k] for b in blocks]))
            yield start, merged, x
            start, blocks, nnz = stop, [], 0


def _write_chunk(obs, layers: dict, obs_table: pa.Table, x: sp.csr_matrix, start: int, raw_sum: np.ndarray) -> None:
    obs.write(obs_table)
    layers["raw"].write(coo_table_global_order(x, start), platform_config=WRITE_SORTED)
    if "normalized" in layers:
        scale = np.divide(1.0, raw_sum, out=np.zeros_like(raw_sum), where=raw_sum > 0)
        xn = sp.csr_matrix((x.data * np.repeat(scale, np.diff(x.indptr)).astype(np.float32), x.indices, x.indptr),
                           shape=x.shape)
        layers["normalized"].write(coo_table_global_order(xn, start), platform_config=WRITE_SORTED)


def _write_var(rna, design, gene_nnz: np.ndarray) -> None:
    measured_obs = sum(d["measured"].astype(np.int64) * d["size"] for d in design.datasets)
    var = pd.DataFrame({"soma_joinid": np.arange(design.n_genes, dtype=np.int64), "feature_id": design.feature_id,
                        "feature_name": design.feature_name, "feature_length": design.feature_length,
                        "nnz": gene_nnz, "n_measured_obs": measured_obs})
    write_small_df(rna, "var", var)


def _write_presence(rna, design) -> None:
    """datasets x genes: which genes each dataset measured (rows = census_info/datasets soma_joinid)."""
    rows, cols = [], []
    for k, d in enumerate(design.datasets):
        genes = np.flatnonzero(d["measured"])
        rows.append(np.full(len(genes), k + design.dataset_offset, np.int64))
        cols.append(genes.astype(np.int64))
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    arr = rna.add_new_sparse_ndarray("feature_dataset_presence_matrix", type=pa.bool_(),
                                     shape=(design.n_datasets_total, design.n_genes))
    arr.write(pa.Table.from_pydict({"soma_dim_0": rows, "soma_dim_1": cols, "soma_data": np.ones(len(rows), bool)}))


def write_small_df(coll, key: str, df: pd.DataFrame) -> None:
    """A small in-memory table as a SOMA DataFrame indexed by soma_joinid (strings as large_string)."""
    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.cast(pa.schema([pa.field(f.name, pa.large_string() if pa.types.is_string(f.type) else f.type)
                                  for f in table.schema]))
    sdf = coll.add_new_dataframe(key, schema=table.schema, index_column_names=["soma_joinid"],
                                 domain=[(0, max(len(df) - 1, 0))])
    sdf.write(table)


def write_census_info(info, designs: dict, counts: dict) -> None:
    datasets, org_rows, cell_rows = [], [], []
    for key, design in designs.items():
        for d in design.datasets:
            datasets.append(dict(citation=f"Synthetic atlas ({key}), seed {design.seed}",
                                 collection_id=f"synthetic-{key}", collection_name=f"Synthetic {key} atlas",
                                 collection_doi="", collection_doi_label="", dataset_id=d["dataset_id"],
                                 dataset_version_id=d["dataset_id"], dataset_title=f"{d['tissue_general']} dataset",
                                 dataset_h5ad_path=f"{d['dataset_id']}.h5ad", dataset_total_cell_count=d["size"]))
        label, taxon = ORGANISMS[key]
        org_rows.append(dict(organism_ontology_term_id=taxon, organism_label=label, organism=key))
        n_unique = sum(d["size"] for d in design.datasets if d["source"] < 0)
        cell_rows.append(dict(organism=label, category="all", ontology_term_id="na", unique_cell_count=n_unique,
                              total_cell_count=design.n_cells, label="na"))
        for cat, (total, unique) in counts[key]["cat_counts"].items():
            levels = counts[key]["levels"]
            names = levels[cat][1]
            term = levels.get(f"{cat}_ontology_term_id")
            ids = ["na"] * len(names)
            if term is not None:  # same entities, separately factorised: map name code -> id code
                for name_code, id_code in zip(levels[cat][0], term[0]):
                    ids[name_code] = term[1][id_code]
            for j, name in enumerate(names):
                cell_rows.append(dict(organism=label, category=cat, ontology_term_id=ids[j],
                                      unique_cell_count=int(unique[j]), total_cell_count=int(total[j]), label=name))
    total = sum(d.n_cells for d in designs.values())
    unique = sum(r["unique_cell_count"] for r in cell_rows if r["category"] == "all")
    summary = [("census_schema_version", "2.1.0"), ("census_build_date", "synthetic"),
               ("dataset_schema_version", "5.2.0"), ("total_cell_count", str(total)),
               ("unique_cell_count", str(unique))]
    summary += [(f"number_donors_{k}", str(len(d.donors))) for k, d in designs.items()]
    for key, rows in (("datasets", datasets), ("organisms", org_rows), ("summary_cell_counts", cell_rows),
                      ("summary", [dict(label=a, value=b) for a, b in summary])):
        df = pd.DataFrame(rows)
        df.insert(0, "soma_joinid", np.arange(len(df), dtype=np.int64))
        write_small_df(info, key, df)
