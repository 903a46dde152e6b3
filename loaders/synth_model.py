"""The generative model behind the synthetic atlases (used by `loaders.synth`).

A small `Design` (genes, cell types, datasets, donors, effects) is drawn from the seed; every
per-cell quantity (type, library size, counts) is a pure function of (seed, row) through a
counter-based hash, so any row range can be generated alone, in any chunking, with identical results.

Biology: cell types have lineage + type gene programs (so they are learnable, and same-lineage
types are confusable); datasets, assays and donors add multiplicative gene-wise batch shifts;
library sizes are log-normal; counts are negative binomial (exact inverse-CDF sampling).
Rows are grouped by dataset, donors are contiguous within a dataset, and a few "secondary"
datasets re-publish cells of a primary one (identical counts, `is_primary_data == False`).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from loaders.synth_vocab import ASSAYS, CELL_TYPES, DEV_STAGES, ETHNICITIES, RARE_TYPES, SEXES, TISSUES

PHI = (np.sqrt(5.0) - 1.0) / 2.0  # Weyl step: types follow dataset composition with low discrepancy
DEFAULT_RARE = (0.0004, 0.0008, 0.003, 0.006)  # two types < 0.1 %, two in 0.1-1 % (plus the power-law tail)
M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


@njit(inline="always")
def _mix(x):
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@njit(parallel=True, cache=True)
def _nb_counts(gen_ids, combo, lib, prof, theta, seed):
    """Dense (n, G) int32 negative-binomial counts; the uniform of entry (cell, gene) is hash(seed, gen_id, gene)."""
    n, g = len(gen_ids), prof.shape[1]
    out = np.zeros((n, g), dtype=np.int32)
    for i in prange(n):
        base = np.uint64(seed) + np.uint64(gen_ids[i]) * np.uint64(0x9E3779B97F4A7C15)
        for j in range(g):
            mu = lib[i] * prof[combo[i], j]
            if mu <= 0.0:
                continue
            u = (_mix(base + np.uint64(j) * np.uint64(0xD1B54A32D192ED03)) >> np.uint64(11)) * (1.0 / 9007199254740992.0)
            if u < 1.0 - mu:  # P(0) >= 1 - mu (Markov), so this is a zero without the NB pmf
                continue
            th = theta[j]
            q = mu / (th + mu)
            pmf = np.exp(th * np.log1p(-q))
            cdf = pmf
            k = 0
            while cdf <= u and k < 1_000_000:
                pmf *= (k + th) / (k + 1.0) * q
                k += 1
                cdf += pmf
                if pmf < 1e-300 and k > mu:
                    break
            out[i, j] = k
    return out


@njit(parallel=True, cache=True)
def _dense_to_csr(dense):
    """CSR arrays (indptr, indices, data float32) of an int32 dense block, in parallel over rows."""
    n, g = dense.shape
    nnz = np.zeros(n, np.int64)
    for i in prange(n):
        c = 0
        for j in range(g):
            if dense[i, j] != 0:
                c += 1
        nnz[i] = c
    indptr = np.zeros(n + 1, np.int64)
    indptr[1:] = np.cumsum(nnz)
    indices = np.empty(indptr[n], np.int32)
    data = np.empty(indptr[n], np.float32)
    for i in prange(n):
        p = indptr[i]
        for j in range(g):
            if dense[i, j] != 0:
                indices[p] = j
                data[p] = dense[i, j]
                p += 1
    return indptr, indices, data


def hash_uniform(seed: int, stream: int, idx: np.ndarray) -> np.ndarray:
    """Uniform(0,1) per index, a pure function of (seed, stream, idx)."""
    with np.errstate(over="ignore"):
        x = (np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(stream) * np.uint64(0xC2B2AE3D27D4EB4F)
             + idx.astype(np.uint64) * np.uint64(0xD1B54A32D192ED03)) & M64
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return ((x >> np.uint64(11)).astype(np.float64) + 0.5) / 9007199254740992.0


def hash_normal(seed: int, stream: int, idx: np.ndarray) -> np.ndarray:
    u1, u2 = hash_uniform(seed, stream, idx), hash_uniform(seed, stream + 1, idx)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def _split(total: int, weights: np.ndarray, minimum: int = 1) -> np.ndarray:
    """Integer sizes summing to `total`, proportional to weights, each >= minimum (largest remainder)."""
    n = len(weights)
    extra = total - minimum * n
    raw = weights / weights.sum() * extra
    sizes = np.floor(raw).astype(np.int64)
    sizes[np.argsort(raw - sizes)[::-1][: extra - sizes.sum()]] += 1
    return sizes + minimum


class Design:
    """Everything about a synthetic atlas except the per-cell draws."""

    def __init__(self, n_cells: int, n_genes: int, *, seed: int = 0, n_datasets: int | None = None,
                 n_cell_types: int | None = None, rare_fracs: tuple[float, ...] = DEFAULT_RARE,
                 donors_per_dataset: float = 4.0, batch_strength: float = 1.0, secondary: bool = True,
                 organism: str = "homo_sapiens", n_tissues: int | None = None,
                 rare_subtype_markers: float | None = None) -> None:
        if n_cells < 1 or n_genes < 10:
            raise ValueError("need at least 1 cell and 10 genes")
        rng = np.random.default_rng([seed, 0x5EED])
        self.seed, self.n_cells, self.n_genes, self.organism = seed, n_cells, n_genes, organism
        nd = n_datasets or max(3, min(60, int(round(np.sqrt(n_cells) / 25))))
        nd = max(1, min(nd, n_cells))
        n_sec = 0 if not secondary or nd < 3 or n_cells < 20 * nd else max(1, nd // 8)
        self._make_genes(rng)
        self._make_datasets(rng, nd, n_sec, donors_per_dataset, n_tissues)
        self._make_types(rng, n_cell_types, rare_fracs)
        self._make_effects(rng, batch_strength)
        self.rare_parent: dict[str, str] = {}
        if rare_subtype_markers is not None:
            self._make_rare_subtypes(rare_subtype_markers)

    # ---- design pieces -------------------------------------------------------------------------
    def _make_genes(self, rng) -> None:
        g = self.n_genes
        mouse = self.organism == "mus_musculus"
        ids = np.sort(rng.choice(max(300_000, 3 * g), size=g, replace=False)) + 3
        self.feature_id = np.array([f"{'ENSMUSG' if mouse else 'ENSG'}{i:011d}" for i in ids])
        prefixes = ["RPL", "CD", "IL", "KRT", "COL", "SLC", "ZNF", "TMEM", "CCL", "FAM", "HLA-", "MT", "LINC", "ATP"]
        counters = dict.fromkeys(prefixes, 0)
        names = []
        for p in rng.choice(prefixes, size=g):
            counters[p] += 1
            name = f"{p}{counters[p]}"
            names.append(name.capitalize() if mouse else name)
        self.feature_name = np.array(names)
        self.feature_length = np.round(np.exp(rng.normal(7.8, 0.7, size=g))).astype(np.int64)
        self.base = rng.normal(0.0, 1.6, size=g)  # log relative abundance
        self.theta = np.exp(rng.normal(np.log(2.0), 0.5, size=g))  # NB inverse dispersion

    def _make_datasets(self, rng, nd: int, n_sec: int, donors_per_dataset: float, n_tissues: int | None) -> None:
        """Datasets cycle over `n_tissues` tissues (default: as many as datasets, as in Census, where types are
        partly confounded with dataset; 1 = a multi-donor study of one tissue, every batch holds every type)."""
        n_prim = nd - n_sec
        sec_total = int(round(self.n_cells * min(0.2, 0.05 * n_sec))) if n_sec else 0
        prim_sizes = _split(self.n_cells - sec_total, rng.lognormal(0, 0.8, n_prim))
        tissue_names = list(TISSUES)[: max(1, min(len(TISSUES), n_prim, n_tissues or n_prim))]
        self.tissues = tissue_names
        prim_tissue = rng.permutation([tissue_names[i % len(tissue_names)] for i in range(n_prim)])
        kinds = rng.choice(len(ASSAYS), size=n_prim, p=np.array([a[2] for a in ASSAYS]) / sum(a[2] for a in ASSAYS))
        kinds = np.where(prim_tissue == "brain", len(ASSAYS) - 1, kinds)  # brain: single nuclei
        ds = [dict(kind=int(kinds[i]), tissue_general=str(prim_tissue[i]), size=int(prim_sizes[i]), source=-1)
              for i in range(n_prim)]
        if n_sec:
            shares = _split(sec_total, rng.lognormal(0, 0.5, n_sec), minimum=0)
            for s in shares:
                src = int(rng.integers(n_prim))
                size = int(min(s, int(0.8 * ds[src]["size"])))
                ds[int(np.argmax(prim_sizes))]["size"] += int(s) - size
                if size > 0:
                    ds.append(dict(ds[src], size=size, source=src))
        order = rng.permutation(len(ds))  # Census interleaves re-published datasets among the others
        self.datasets = [ds[i] for i in order]
        new_index = np.argsort(order)
        for d in self.datasets:
            d["source"] = int(new_index[d["source"]]) if d["source"] >= 0 else -1
        starts = np.concatenate([[0], np.cumsum([d["size"] for d in self.datasets])])
        self.ds_start = starts[:-1]
        self.donor_bounds, donors = {}, []
        for k, d in enumerate(self.datasets):
            d["start"], d["stop"] = int(starts[k]), int(starts[k + 1])
            d["dataset_id"] = str(_uuid(rng))
            d["tissue"] = str(rng.choice(TISSUES[d["tissue_general"]][1]))
            # libraries over n genes grow ~sqrt(n) (2,000 genes ~1k UMIs, Census' 60k genes ~5k)
            d["lib_median"] = ASSAYS[d["kind"]][3] * (self.n_genes / 2000) ** 0.5 * float(np.exp(rng.normal(0, 0.25)))
            d["measured"] = np.ones(self.n_genes, bool) if k == 0 else rng.random(self.n_genes) > rng.uniform(0, 0.03)
            if d["source"] >= 0:
                continue
            n_donors = int(np.clip(1 + rng.poisson(donors_per_dataset - 1), 1, d["size"]))
            sick = rng.random() < 0.25
            disease = "lung adenocarcinoma" if d["tissue_general"] == "lung" and rng.random() < 0.5 else "COVID-19"
            first = len(donors)
            for j in range(n_donors):
                donors.append(dict(donor_id=f"donor_{len(donors)}", sex=str(rng.choice(list(SEXES))),
                                   development_stage=str(rng.choice(DEV_STAGES)),
                                   ethnicity=str(rng.choice(list(ETHNICITIES))),
                                   disease=disease if sick and j % 2 else "normal"))
            sizes = _split(d["size"], rng.lognormal(0, 0.6, n_donors))
            d["donor_first"] = first
            d["donor_starts"] = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        for d in self.datasets:  # re-published datasets keep their source's donors and gene mask
            if d["source"] >= 0:
                src = self.datasets[d["source"]]
                d.update(kind=src["kind"], measured=src["measured"], lib_median=src["lib_median"])
        self.donors = donors

    def _make_types(self, rng, n_cell_types: int | None, rare_fracs) -> None:
        present = set(self.tissues)
        common = [t for t in CELL_TYPES if t[2] == "*" or present & set(t[2].split())]
        common = common[: n_cell_types or len(common)]
        rare = []
        for i, (name, lineage, pref) in enumerate(RARE_TYPES[: len(rare_fracs)]):
            rare.append((name, lineage, pref if pref in present else self.tissues[i % len(self.tissues)]))
        self.cell_types = [t[0] for t in common] + [t[0] for t in rare]
        self.n_rare = len(rare)
        self.lineage = [t[1] for t in common] + [t[1] for t in rare]
        k = len(self.cell_types)
        weights = (np.arange(len(common)) + 1.0) ** -1.0
        prim = [d for d in self.datasets if d["source"] < 0]
        n_prim = sum(d["size"] for d in prim)
        tissue_cells = {t: sum(d["size"] for d in prim if d["tissue_general"] == t) for t in self.tissues}
        for d in self.datasets:
            comp = np.zeros(k)
            if d["source"] < 0:
                home = [t[2] == "*" or d["tissue_general"] in t[2].split() for t in common]
                comp[: len(common)] = weights * np.array(home) * np.exp(rng.normal(0, 0.5, len(common)))
                comp /= comp.sum()
                for r, (frac, (_, _, tissue)) in enumerate(zip(rare_fracs, rare)):
                    if tissue == d["tissue_general"]:
                        comp[len(common) + r] = min(0.2, frac * n_prim / max(tissue_cells[tissue], 1))
                comp[: len(common)] *= 1.0 - comp[len(common):].sum()
            d["cdf"] = np.cumsum(comp)
            d["offset"] = float(rng.random())
        self.type_lib = rng.normal(0, 0.3, k)

    def _make_effects(self, rng, strength: float) -> None:
        g, k = self.n_genes, len(self.cell_types)
        lineages = sorted(set(self.lineage))
        lin_eff = np.zeros((len(lineages), g))
        for row in lin_eff:
            markers = rng.random(g) < 0.04
            row[markers] = rng.normal(1.0, 0.3, markers.sum())
        self.type_eff = np.zeros((k, g), dtype=np.float32)
        for t in range(k):
            up, down = rng.random(g) < 0.015, rng.random(g) < 0.01
            eff = lin_eff[lineages.index(self.lineage[t])] + rng.normal(0, 0.2, g)
            eff[up] += rng.normal(1.8, 0.5, up.sum())
            eff[down] -= np.abs(rng.normal(1.0, 0.3, down.sum()))
            self.type_eff[t] = eff
        self.assay_eff = rng.normal(0, 0.35 * strength, (len(ASSAYS), g)).astype(np.float32)
        self.ds_eff = rng.normal(0, 0.25 * strength, (len(self.datasets), g)).astype(np.float32)
        self.donor_eff = rng.normal(0, 0.1 * strength, (len(self.donors), g)).astype(np.float32)

    def _make_rare_subtypes(self, marker_frac: float) -> None:
        """Re-draw each planted rare type as a subtype of a common type: the parent's whole program plus a few
        private up-markers (`marker_frac` of genes, ~2.7x). Like pDCs among DCs or ILCs among NK cells, such a type
        is confusable with its parent, the regime where class imbalance hurts a classifier. Drawn from its own
        stream, so the rest of the design is unchanged."""
        rng = np.random.default_rng([self.seed, 0x5B7])
        n_common = len(self.cell_types) - self.n_rare
        for t in range(n_common, len(self.cell_types)):
            kin = [c for c in range(n_common) if self.lineage[c] == self.lineage[t]] or list(range(n_common))
            parent = kin[0]  # the most abundant common type of the lineage (types are listed by abundance)
            up = rng.random(self.n_genes) < marker_frac
            eff = self.type_eff[parent].copy()
            eff[up] += rng.normal(1.0, 0.2, up.sum())
            self.type_eff[t] = eff
            self.rare_parent[self.cell_types[t]] = self.cell_types[parent]

    # ---- per-cell draws ------------------------------------------------------------------------
    def cells(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Per-row dataset, donor, type, library size and generating id (the source row for re-published cells)."""
        rows = np.arange(start, stop, dtype=np.int64)
        ds = np.searchsorted(self.ds_start, rows, side="right") - 1
        src_row = rows.copy()
        for k in np.unique(ds):
            d = self.datasets[k]
            if d["source"] >= 0:
                m = ds == k
                s = self.datasets[d["source"]]
                src_row[m] = s["start"] + (rows[m] - d["start"]) * (s["stop"] - s["start"]) // d["size"]
        src_ds = np.searchsorted(self.ds_start, src_row, side="right") - 1
        donor, ctype = np.empty(len(rows), np.int64), np.empty(len(rows), np.int64)
        for k in np.unique(src_ds):
            d, m = self.datasets[k], src_ds == k
            local = src_row[m] - d["start"]
            donor[m] = d["donor_first"] + np.searchsorted(d["donor_starts"], local, side="right") - 1
            u = np.mod(d["offset"] + local * PHI, 1.0)
            ctype[m] = np.minimum(np.searchsorted(d["cdf"], u, side="right"), len(d["cdf"]) - 1)
        lib_med = np.array([d["lib_median"] for d in self.datasets])[src_ds]
        lib = np.exp(np.log(lib_med) + self.type_lib[ctype] + 0.45 * hash_normal(self.seed, 1, src_row))
        return dict(row=rows, dataset=ds, source_dataset=src_ds, donor=donor, cell_type=ctype, library=lib, gen_id=src_row)

    def counts_csr(self, cells: dict[str, np.ndarray]):
        """float32 CSR (n, G) counts for `cells()` output."""
        import scipy.sparse as sp

        indptr, indices, data = _dense_to_csr(self.counts(cells))
        return sp.csr_matrix((data, indices, indptr), shape=(len(cells["row"]), self.n_genes))

    def counts(self, cells: dict[str, np.ndarray]) -> np.ndarray:
        """Dense int32 (n, G) counts for `cells()` output."""
        k = len(self.cell_types)
        combo_key = cells["donor"] * k + cells["cell_type"]
        keys, combo = np.unique(combo_key, return_inverse=True)
        prof = np.empty((len(keys), self.n_genes))
        ds_of_donor = {}
        for k_ds, d in enumerate(self.datasets):
            if d["source"] < 0:
                for j in range(len(d["donor_starts"])):
                    ds_of_donor[d["donor_first"] + j] = k_ds
        for c, key in enumerate(keys):
            donor, t = divmod(int(key), k)
            d = ds_of_donor[donor]
            logp = (self.base + self.type_eff[t] + self.assay_eff[self.datasets[d]["kind"]] + self.ds_eff[d]
                    + self.donor_eff[donor])
            p = np.exp(logp - logp.max()) * self.datasets[d]["measured"]
            prof[c] = p / p.sum()
        return _nb_counts(cells["gen_id"], combo.astype(np.int64), cells["library"], prof, self.theta,
                          np.uint64(self.seed * 0x2545F4914F6CDD1D & 0xFFFFFFFFFFFFFFFF))


def _uuid(rng) -> str:
    import uuid

    return str(uuid.UUID(bytes=rng.bytes(16), version=4))
