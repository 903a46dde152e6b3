"""Match a query's genes to a model's, gene by gene, whatever naming each query gene uses.

Each query gene offers names: its var_name and the known id/symbol columns of var (or only `gene_key`).
A name that looks like an Ensembl gene id is matched (version stripped: ENSG….12 -> ENSG…) against the
model's feature_id; any other name against the model's feature_name, exactly, and failing that
case-insensitively where that is unambiguous (one model symbol and one remaining query gene fold to it).
So a query that mixes ids and symbols matches both. Several query genes on one model gene (duplicated
rows, or one gene present under both namings) are summed or refused, never silently dropped.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from loaders.errors import DataError
from scpermut_dist.errors import UsageError

log = logging.getLogger(__name__)
MIN_GENE_FRACTION = 0.5
ID_COLUMNS = ("feature_id", "gene_ids", "gene_id", "ensembl_id", "ensembl_gene_id", "gene_ensembl")
SYMBOL_COLUMNS = ("feature_name", "gene_symbols", "gene_symbol", "symbol", "gene_name", "gene_names", "gene")
ENSEMBL_ID = r"^ENS[A-Z]{0,6}G\d{6,}"  # human ENSG…, mouse ENSMUSG…, other species ENS<xxx>G…
_VERSION = r"^(ENS[A-Z]{0,6}G\d{6,})\.\d+"
# how a model gene was found; the first two are the model's naming columns
NAMINGS = ("feature_id", "feature_name", "feature_name_case_insensitive")
Duplicates = Literal["sum", "error"]


@dataclass(frozen=True)
class GeneAlignment:
    """Which query column feeds which model gene: `query_cols[k]` adds into `model_cols[k]`."""

    n_query_genes: int
    n_model_genes: int
    query_cols: np.ndarray  # int64, matched query columns (ascending)
    model_cols: np.ndarray  # int64, the model gene each of them feeds (repeats = summed duplicates)
    counts: dict[str, int]  # model genes found per naming (NAMINGS), plus "duplicates_summed"
    _order: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def n_found(self) -> int:
        return len(np.unique(self.model_cols))

    @property
    def matched_by(self) -> str:
        """The namings that found genes, e.g. "feature_id+feature_name" (a string: h5ad/JSON-storable)."""
        used = [n for n in NAMINGS if self.counts.get(n)]
        return "+".join(used) if used else "none"

    def first_positions(self) -> np.ndarray:
        """Query column of each model gene (-1 if absent; the first one when several are summed)."""
        pos = np.full(self.n_model_genes, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(pos, self.model_cols, self.query_cols)
        pos[pos == np.iinfo(np.int64).max] = -1
        return pos

    def aligned(self, x_cg: sp.csr_matrix) -> sp.csr_matrix:
        """Counts of the query genes (cells x all query genes) as counts of the model genes (absent: no stored
        value), duplicates summed. A row's columns may come unsorted, which scipy handles."""
        if x_cg.shape[1] != self.n_query_genes:
            raise DataError(f"the matrix has {x_cg.shape[1]} genes but the gene alignment was made for "
                            f"{self.n_query_genes}")
        order = self._model_order
        sub = x_cg[:, self.query_cols[order]]  # scipy's CSR column selection, columns in model order
        out = sp.csr_matrix((sub.data, self.model_cols[order][sub.indices], sub.indptr),
                            shape=(x_cg.shape[0], self.n_model_genes))
        if self.counts.get("duplicates_summed"):
            out.sum_duplicates()
        return out

    @property
    def _model_order(self) -> np.ndarray:
        if self._order is None:
            object.__setattr__(self, "_order", np.argsort(self.model_cols, kind="stable"))
        return self._order


def query_names(var: pd.DataFrame, gene_key: str | None = None, where: str = "query") -> list[tuple[str, np.ndarray]]:
    """The (source, names) the query's genes offer: `gene_key` alone, else var_names and known columns."""
    if gene_key is not None:
        if gene_key in ("var_names", "index"):
            return [("var_names", var.index.astype(str).to_numpy())]
        if gene_key not in var.columns:
            raise DataError(f"{where}: --gene-key {gene_key!r} is not a var column; var columns are "
                            f"{[str(c) for c in var.columns][:30]} (or 'var_names').")
        return [(gene_key, _strings(var[gene_key]))]
    out = [("var_names", var.index.astype(str).to_numpy())]
    out += [(c, _strings(var[c])) for c in (*ID_COLUMNS, *SYMBOL_COLUMNS) if c in var.columns]
    return out


def align_genes(query_var: pd.DataFrame, model_genes: pd.DataFrame, gene_key: str | None = None,
                min_gene_fraction: float = MIN_GENE_FRACTION, duplicates: Duplicates = "sum",
                where: str = "query") -> GeneAlignment:
    """Match every query gene to at most one model gene; refuse below `min_gene_fraction` of the model's genes."""
    if not 0.0 <= float(min_gene_fraction) <= 1.0:
        raise UsageError(f"--min-gene-fraction {min_gene_fraction}: give a fraction between 0 and 1 (default 0.5)")
    if duplicates not in ("sum", "error"):
        raise UsageError(f"duplicates={duplicates!r}: use 'sum' or 'error'")
    n_model = len(model_genes)
    names = query_names(query_var, gene_key, where)
    n_query = len(query_var)
    model_ids = _Names(strip_versions(_strings(model_genes["feature_id"])))
    model_symbols = _Names(_strings(model_genes["feature_name"]))
    looks_id = [pd.Series(v).str.match(ENSEMBL_ID).to_numpy(dtype=bool) for _, v in names]
    hit = np.full(n_query, -1, dtype=np.int64)
    how = np.full(n_query, -1, dtype=np.int8)  # index into NAMINGS
    for kind in (0, 1):  # by id over all of a gene's names, then by exact symbol
        for (_, values), is_id in zip(names, looks_id):
            pos = model_ids.find(strip_versions(values)) if kind == 0 else model_symbols.find(values)
            pos[is_id != (kind == 0)] = -1
            new = (hit < 0) & (pos >= 0)
            hit[new], how[new] = pos[new], kind
    _case_insensitive(hit, how, names, looks_id, model_genes)
    q = np.flatnonzero(hit >= 0)
    n_dup = _check_duplicates(q, hit[q], n_model, query_var, model_genes, duplicates, where)
    counts = {n: len(np.unique(hit[how == k])) for k, n in enumerate(NAMINGS)}
    alignment = GeneAlignment(n_query, n_model, q.astype(np.int64), hit[q], {**counts, "duplicates_summed": n_dup})
    n_found = alignment.n_found
    if n_found < min_gene_fraction * n_model or n_found == 0:
        raise DataError(_refusal(n_found, n_model, min_gene_fraction, names, model_genes, where))
    detail = ", ".join(f"{n.replace('_', ' ')} {c}" for n, c in counts.items() if c)
    log.info("%s: %d of %d model genes found (%s)", where, n_found, n_model, detail)
    if n_found < n_model:
        log.warning("%s: %d of %d model genes are missing from the query and are filled with zeros",
                    where, n_model - n_found, n_model)
    return alignment


def strip_versions(values) -> np.ndarray:
    """Ensembl ids without their version suffix (ENSG00000141510.12 -> ENSG00000141510); other names unchanged."""
    return pd.Series(values, dtype=object).astype(str).str.replace(_VERSION, r"\1", regex=True).to_numpy()


def _strings(col) -> np.ndarray:
    return pd.Series(col).astype(str).to_numpy()


class _Names:
    """Model genes by name; a name several model genes share matches none (not an arbitrary one)."""

    def __init__(self, values: np.ndarray, usable: np.ndarray | None = None) -> None:
        s = pd.Series(values, dtype=object)
        keep = ~s.duplicated(keep=False).to_numpy()
        if usable is not None:
            keep &= usable
        self._index, self._pos = pd.Index(s[keep].to_numpy()), np.flatnonzero(keep)

    def find(self, values) -> np.ndarray:
        ix = self._index.get_indexer(pd.Index(values, dtype=object))
        return np.where(ix >= 0, self._pos[np.maximum(ix, 0)] if len(self._pos) else -1, -1).astype(np.int64)


def _case_insensitive(hit: np.ndarray, how: np.ndarray, names, looks_id, model_genes: pd.DataFrame) -> None:
    """Match still-unmatched query symbols to still-unmatched model genes by case-folded symbol, where one
    model gene and one query gene fold to it (exact matches were taken first)."""
    unmatched_model = np.ones(len(model_genes), dtype=bool)
    unmatched_model[hit[hit >= 0]] = False
    folded = pd.Series(_strings(model_genes["feature_name"])).str.casefold().to_numpy()
    model = _Names(folded, usable=unmatched_model)  # a fold shared by two model symbols is ambiguous: none
    candidate = np.full(len(hit), -1, dtype=np.int64)
    for (_, values), is_id in zip(names, looks_id):
        pos = model.find(pd.Series(values).str.casefold().to_numpy())
        pos[is_id] = -1
        new = (candidate < 0) & (pos >= 0)
        candidate[new] = pos[new]
    candidate[hit >= 0] = -1
    targets = candidate[candidate >= 0]
    once = np.bincount(targets, minlength=len(model_genes)) == 1 if len(targets) else np.zeros(0, bool)
    take = (candidate >= 0) & once[np.maximum(candidate, 0)] if len(targets) else np.zeros(len(hit), bool)
    hit[take], how[take] = candidate[take], 2


def _check_duplicates(query_cols: np.ndarray, model_cols: np.ndarray, n_model: int, query_var: pd.DataFrame,
                      model_genes: pd.DataFrame, duplicates: Duplicates, where: str) -> int:
    """Model genes fed by several query genes: refused, or summed with a warning that names them."""
    per_model = np.bincount(model_cols, minlength=n_model)
    dup = np.flatnonzero(per_model > 1)
    if len(dup) == 0:
        return 0
    names = query_var.index.astype(str)
    examples = []
    for m in dup[:3]:
        rows = query_cols[model_cols == m]
        examples.append(f"{model_genes['feature_name'].iloc[m]} ({', '.join(names[rows][:4])})")
    text = f"{len(dup)} model genes appear more than once in the query, e.g. {'; '.join(examples)}"
    if duplicates == "error":
        raise DataError(f"{where}: {text}. Sum or remove the duplicated genes (e.g. by Ensembl id), or map with "
                        "duplicates summed (the default).")
    log.warning("%s: %s; their counts are summed", where, text)
    return len(dup)


def _refusal(n_found: int, n_model: int, fraction: float, names, model_genes: pd.DataFrame, where: str) -> str:
    ids = _strings(model_genes["feature_id"])
    symbols = _strings(model_genes["feature_name"])
    has_ids = bool(pd.Series(ids).str.match(ENSEMBL_ID).mean() > 0.5)
    has_symbols = bool(pd.Series(symbols).str.match(ENSEMBL_ID).mean() <= 0.5) or not has_ids
    expects = []
    if has_ids:
        expects.append(f"Ensembl gene ids (feature_id, e.g. {', '.join(ids[:3])})")
    if has_symbols:
        expects.append(f"gene symbols (feature_name, e.g. {', '.join(symbols[:3])})")
    seen = "; ".join(f"{src}: {', '.join(v[:3])}" for src, v in names[:3])
    return (f"{where}: only {n_found} of the model's {n_model} genes are in the query (need at least {fraction:.0%}; "
            f"--min-gene-fraction). The model expects {' or '.join(expects)}; the query's genes look like {seen}. "
            "Pass --gene-key COLUMN if another var column holds gene ids or symbols, and check the organism.")
