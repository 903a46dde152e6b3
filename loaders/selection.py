"""What part of an atlas to use: a cell filter, a gene list, a label column and a batch definition.

Every source resolves a `CellSelection` against its own obs/var with the helpers below, so an h5ad,
a SOMA Experiment and Census all produce the same standardised obs (`label`, `batch`) and gene order.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from loaders.errors import DataError

LABEL_COL = "label"  # standardised obs column: cell type (categorical of str), <NA> when unlabelled
BATCH_COL = "batch"  # standardised obs column: combined batch id (categorical of str)
# Categorical, not object strings: obs of 10^8 cells must stay small in every worker.
# Label values that mean "no label" (matched case-insensitively, surrounding spaces ignored); missing values too.
UNLABELED_DEFAULTS = ("unknown", "unlabeled", "unlabelled", "nan", "na", "n/a", "none", "")
CHUNK_CELLS = 1 << 18  # cells per vectorised step: temporaries stay ~2 MB whatever the number of cells
PAIR_TABLE_MAX = 1 << 24  # batch-key pairs up to this many possible combinations use a lookup table, not a hash


@dataclass(frozen=True)
class CellSelection:
    """A picklable description of the cells, genes and annotations to read."""

    obs_value_filter: str | None = None
    label_key: str | None = None
    batch_keys: tuple[str, ...] = ()
    unlabeled_values: tuple[str, ...] = UNLABELED_DEFAULTS  # the full list (replaces the defaults)
    genes: tuple[str, ...] | None = None  # feature_id or feature_name; None = all genes
    obs_columns: tuple[str, ...] = field(default_factory=tuple)  # extra obs columns to carry

    @property
    def obs_columns_needed(self) -> list[str]:
        cols = [c for c in (self.label_key, *self.batch_keys, *self.obs_columns) if c]
        return list(dict.fromkeys(cols))


def standardize_obs(obs: pd.DataFrame, selection: CellSelection, where: str) -> pd.DataFrame:
    """Add `label` and `batch` columns from the selection's keys, with clear errors for missing ones.

    Both are categoricals built on the source columns' codes: at 10^8 cells one Python string per
    cell would cost gigabytes, so strings are only ever made per category or per batch combination.
    """
    missing = [c for c in selection.obs_columns_needed if c not in obs.columns]
    if missing:
        raise DataError(
            f"{where}: obs has no column(s) {missing}. Available columns: {sorted(map(str, obs.columns))[:40]}. "
            "Pass an existing column as the label/batch key."
        )
    out = obs.copy(deep=False)  # new columns only: the caller's obs is untouched, its columns not duplicated
    out[LABEL_COL] = _label_column(obs, selection)
    out[BATCH_COL] = _batch_column(obs, selection)
    return out


def _label_column(obs: pd.DataFrame, selection: CellSelection) -> pd.Categorical:
    """Cell types as strings; missing and `unlabeled_values` (any case) become <NA>."""
    if not selection.label_key:
        return as_categorical([], np.full(len(obs), -1, dtype=np.int8))
    return as_categorical(*string_codes(obs[selection.label_key], drop=selection.unlabeled_values))


def _batch_column(obs: pd.DataFrame, selection: CellSelection) -> pd.Categorical:
    """The batch keys joined as "a+b+c" ("NA" for a missing value), combined on codes."""
    if not selection.batch_keys:
        return as_categorical(["all"] if len(obs) else [], np.zeros(len(obs), dtype=np.int8))
    names, codes = string_codes(obs[selection.batch_keys[0]], missing="NA")
    for key in selection.batch_keys[1:]:
        names, codes = _join(names, codes, *string_codes(obs[key], missing="NA"))
    return as_categorical(names, codes)


def as_categorical(names: list[str], codes: np.ndarray) -> pd.Categorical:
    """A categorical over string categories (as `astype("string").astype("category")` gives), without copies."""
    return pd.Categorical.from_codes(codes, categories=pd.Index(names, dtype="string"))


def string_codes(col: pd.Series, missing: str | None = None,
                 drop: tuple[str, ...] = ()) -> tuple[list[str], np.ndarray]:
    """Sorted distinct values of `col` as strings and each cell's code into them (-1 = missing).

    Values are turned into strings (as `astype("string")` does) once per category or distinct value,
    never per cell. `missing` names missing values (as `fillna` would); values in `drop` become -1.
    Only values that occur are kept; codes have the smallest dtype pandas would pick. `drop` matches
    case-insensitively, ignoring surrounding spaces ("Unknown " drops with "unknown").
    """
    values, codes = _raw_codes(col)
    strings = [missing if pd.isna(s) else str(s) for s in pd.Series(values).astype("string")]
    return _sorted_unique([*strings, missing], codes, drop)


def recode(table: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """`table[codes]` in bounded steps (code -1 reads `table[-1]`), so no int64 copy of all codes is made."""
    out = np.empty(len(codes), dtype=table.dtype)
    for lo in range(0, len(codes), CHUNK_CELLS):
        out[lo:lo + CHUNK_CELLS] = table[codes[lo:lo + CHUNK_CELLS]]
    return out


def _raw_codes(col: pd.Series) -> tuple[pd.Index | np.ndarray, np.ndarray]:
    """(distinct values, code per cell, -1 = missing): a categorical's own, else a factorisation."""
    if isinstance(col.dtype, pd.CategoricalDtype):
        return col.cat.categories, col.array.codes
    codes, uniques = pd.factorize(col, use_na_sentinel=True)
    return uniques, codes


def _sorted_unique(strings: list[str | None], codes: np.ndarray,
                   drop: tuple[str, ...] = ()) -> tuple[list[str], np.ndarray]:
    """Merge categories with equal strings, drop unused/None/`drop` ones, sort, and recode.

    `strings` has one entry per code plus a last one for code -1 (None = stays missing).
    """
    seen = _present(codes, len(strings))
    dropped = {_fold(d) for d in drop}
    names = sorted({s for s, used in zip(strings, seen) if used and s is not None and _fold(s) not in dropped})
    pos = {s: i for i, s in enumerate(names)}
    table = np.array([pos.get(s, -1) for s in strings], dtype=_code_dtype(len(names)))
    if table.dtype == codes.dtype and table[-1] == -1 and np.array_equal(table[:-1], np.arange(len(table) - 1)):
        return names, codes  # already sorted, unique and all used (e.g. anndata's categoricals): no copy
    return names, recode(table, codes)


def _fold(value: str) -> str:
    return str(value).strip().casefold()


def _present(codes: np.ndarray, n_slots: int) -> np.ndarray:
    """Which of `n_slots` codes occur (code -1 marks the last slot), in bounded steps."""
    seen = np.zeros(n_slots, dtype=bool)
    for lo in range(0, len(codes), CHUNK_CELLS):
        seen[codes[lo:lo + CHUNK_CELLS]] = True
    return seen


def _code_dtype(n_categories: int) -> type:
    """The integer width pandas uses for the codes of `n_categories` categories."""
    for dtype in (np.int8, np.int16, np.int32):
        if n_categories < np.iinfo(dtype).max:
            return dtype
    return np.int64


def _join(names_a: list[str], codes_a: np.ndarray, names_b: list[str],
          codes_b: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Two coded columns (codes >= 0) as one "a+b" column: strings only for the pairs that occur."""
    pairs, codes = _pair_codes(codes_a, codes_b, len(names_b), len(names_a) * len(names_b))
    strings = [f"{names_a[k // len(names_b)]}+{names_b[k % len(names_b)]}" for k in pairs.tolist()]
    return _sorted_unique([*strings, None], codes)


def _pair_codes(codes_a: np.ndarray, codes_b: np.ndarray, n_b: int,
                n_pairs: int) -> tuple[np.ndarray, np.ndarray]:
    """(distinct pair keys a*n_b+b that occur, ascending; each cell's position among them)."""
    def keys(lo: int) -> np.ndarray:
        return codes_a[lo:lo + CHUNK_CELLS].astype(np.int64) * n_b + codes_b[lo:lo + CHUNK_CELLS]

    if n_pairs > PAIR_TABLE_MAX:  # rare: many donors x many datasets; one int64 key per cell
        key = np.concatenate([keys(lo) for lo in range(0, len(codes_a), CHUNK_CELLS)] or [np.empty(0, np.int64)])
        codes, pairs = pd.factorize(key, sort=True)
        return np.asarray(pairs), codes.astype(_code_dtype(len(pairs)))
    seen = np.zeros(n_pairs, dtype=bool)
    for lo in range(0, len(codes_a), CHUNK_CELLS):
        seen[keys(lo)] = True
    pairs = np.flatnonzero(seen)
    lookup = np.full(n_pairs, -1, dtype=_code_dtype(len(pairs)))
    lookup[pairs] = np.arange(len(pairs))
    out = np.empty(len(codes_a), dtype=lookup.dtype)
    for lo in range(0, len(codes_a), CHUNK_CELLS):
        out[lo:lo + CHUNK_CELLS] = lookup[keys(lo)]
    return pairs, out


def resolve_genes(var: pd.DataFrame, genes: tuple[str, ...] | None, where: str) -> np.ndarray:
    """Positions (into `var`) of the requested genes, matched by feature_id or else feature_name.

    `var` must have `feature_id` and `feature_name` columns. Genes absent from the atlas are an error
    (the model's input layout would silently change otherwise).
    """
    if genes is None:
        return np.arange(len(var))
    by_id = pd.Index(var["feature_id"].astype(str))
    by_name = pd.Index(var["feature_name"].astype(str))
    wanted = pd.Index([str(g) for g in genes])
    if wanted.has_duplicates:
        raise DataError(f"{where}: the gene list has duplicates: {list(wanted[wanted.duplicated()][:10])}")
    n_id, n_name = wanted.isin(by_id).sum(), wanted.isin(by_name).sum()
    index = by_id if n_id >= n_name else by_name
    if not index.is_unique:
        index = index.where(~index.duplicated(), None)
    pos = index.get_indexer(wanted)
    absent = wanted[pos < 0]
    if len(absent):
        raise DataError(
            f"{where}: {len(absent)} of {len(wanted)} requested genes are not in the atlas "
            f"(e.g. {list(absent[:10])}). Genes are matched by feature_id (Ensembl) or feature_name (symbol)."
        )
    return pos.astype(np.int64)
