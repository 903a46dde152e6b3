"""Query adaptation (the authors' scArches-style fine-tune): the query's batches become new DANN classes.

A copy of the reference's network gets its batch discriminator's output layer extended with one row per query
batch (the old rows kept), then trains a few epochs on the query's cells shuffled with a replay sample of
reference cells stored in the checkpoint (`extras["replay"]`, written by `sample_replay` at training end):

- reconstruction (every cell reconstructs itself: the query has no labels to pick partners from);
- the adversary (the reference's DANN objective, gradient reversal by default) over old + new batches;
- an anchor: each replay cell's latent is pulled to its latent before fine-tuning (a frozen copy of the
  encoder), so the adversary moves the query onto the reference rather than the reference off its classes.
The classifier is frozen (weights and BatchNorm statistics); the encoder, the decoder (it must reconstruct the
new batches too) and the discriminator train. The reference object and its files are never changed: the
result is a new `Reference` (saved elsewhere), whose latent-space extras (neighbour sample, unknown rule's
distances) are re-fitted for the adapted encoder.

Measured on Kang ctrl -> stim (evaluation/finetune_check.py): without the anchor the frozen classifier loses
the reference (balanced accuracy 0.88 -> 0.33); the replay cells' focal loss through the frozen classifier
instead tightens the reference's types away from the query (mixing 0.68 -> 0.17); anchoring the dropout-free
latent, or freezing the encoder's BatchNorm statistics, moves the reference less but mixes and classifies
worse; a consistency loss on the query's old predictions gave nothing at 0.1 and undid the mixing at 1.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from loaders.batch import PairedBatch
from loaders.errors import DataError
from loaders.normalize import Normalization
from scpermut_dist.errors import UsageError
from scpermut_dist.mapping.reference import Reference
from scpermut_dist.model.losses import LossWeights, total_loss
from scpermut_dist.model.module import ScPermutModule

log = logging.getLogger(__name__)
REPLAY_KEY = "replay"  # Reference.extras key
REPLAY_MAX_CELLS = 5000
QUERY_BATCH_PREFIX = "query:"
REPLAY_FIELDS = ("data", "indices", "indptr", "shape", "label", "batch", "totals")


# ----- replay sample (written at training end, read here) ----------------------------------------------------
def sample_replay(source, cells: np.ndarray, label_codes: np.ndarray, batch_codes: np.ndarray,
                  totals: np.ndarray | None = None, max_cells: int = REPLAY_MAX_CELLS, seed: int = 0
                  ) -> dict[str, np.ndarray]:
    """A type-stratified sample of reference cells' raw counts over the model genes, for `extras["replay"]`.

    `source` reads counts over the model genes (`read_counts(rows)`, e.g. `PreparedReference.source`);
    `cells` are the eligible positions (QC'd cells); `label_codes`/`batch_codes`/`totals` are indexed by source
    position (label -1 = unlabelled, its own stratum). `totals` are each cell's total counts over *all* genes
    (what normalisation divides by); None stores the totals over the model genes. Every type gets an equal
    share of `max_cells`, a type smaller than its share gives the rest to the others (rare types stay whole).
    Returns CSR arrays (data float32, indices int32, indptr int64, shape int64[2]) and per-cell `label`,
    `batch` (int64 codes), `totals` (float64) and `cell` (the source position), rows sorted by source position.
    """
    cells = np.asarray(cells, dtype=np.int64)
    if len(cells) == 0:
        raise DataError("replay sample: no reference cell to sample from")
    rng = np.random.default_rng(seed)
    strata = np.asarray(label_codes)[cells]
    names, inverse = np.unique(strata, return_inverse=True)
    quota = _water_fill(np.bincount(inverse, minlength=len(names)), max_cells)
    picked = [rng.choice(cells[inverse == s], size=q, replace=False) for s, q in enumerate(quota) if q > 0]
    rows = np.sort(np.concatenate(picked))
    x = sp.csr_matrix(source.read_counts(rows), dtype=np.float32)
    lib = np.asarray(x.sum(axis=1), dtype=np.float64).ravel() if totals is None \
        else np.asarray(totals, dtype=np.float64)[rows]
    return {"data": x.data.astype(np.float32), "indices": x.indices.astype(np.int32),
            "indptr": x.indptr.astype(np.int64), "shape": np.asarray(x.shape, dtype=np.int64),
            "label": np.asarray(label_codes, dtype=np.int64)[rows], "batch": np.asarray(batch_codes, np.int64)[rows],
            "totals": lib, "cell": rows}


def _water_fill(sizes: np.ndarray, budget: int) -> np.ndarray:
    """Equal shares of `budget` per stratum, capped by its size, the surplus shared among the larger ones."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if sizes.sum() <= budget:
        return sizes
    quota = np.zeros_like(sizes)
    left, open_ = int(budget), np.ones(len(sizes), dtype=bool)
    while left > 0 and open_.any():
        share = max(left // int(open_.sum()), 1)
        for s in np.flatnonzero(open_):
            take = min(share, sizes[s] - quota[s], left)
            quota[s] += take
            left -= take
            if quota[s] >= sizes[s]:
                open_[s] = False
            if left == 0:
                break
    return quota


def replay_from_anndata(adata: ad.AnnData, ref: Reference, label_key: str, batch_key: str | list[str] | None = None,
                        layer: str | None = None, max_cells: int = REPLAY_MAX_CELLS, seed: int = 0
                        ) -> dict[str, np.ndarray]:
    """`sample_replay` on the AnnData `ref` was trained on (codes from `ref.classes`/`ref.batches`): for tests and
    evaluation; training writes the replay from its prepared source directly."""
    from loaders.selection import CellSelection
    from loaders.sources import AnnDataSource
    from loaders.sources.anndata_source import counts_and_var

    keys = tuple(batch_key.split("+")) if isinstance(batch_key, str) else tuple(batch_key or ())
    sel = CellSelection(label_key=label_key, batch_keys=keys,
                        genes=tuple(ref.genes["feature_id"].astype(str)))
    source = AnnDataSource(adata, sel, layer, where="replay reference")
    labels = pd.Index(ref.classes).get_indexer(source.obs["label"].astype(object))  # unlabelled (NA): -1
    batches = pd.Index(ref.batches).get_indexer(source.obs["batch"].astype(str))
    batches[batches < 0] = 0
    matrix, _ = counts_and_var(adata, layer, "replay reference")
    totals = np.asarray(matrix.sum(axis=1), dtype=np.float64).ravel()
    return sample_replay(source, np.arange(source.n_cells), labels.astype(np.int64), batches, totals,
                         max_cells=max_cells, seed=seed)


def replay_matrix(replay: dict[str, np.ndarray], n_genes: int) -> sp.csr_matrix:
    missing = [k for k in REPLAY_FIELDS if k not in replay]
    if missing:
        raise UsageError(f"the checkpoint's replay sample lacks {missing}; retrain the reference")
    shape = tuple(int(s) for s in replay["shape"])
    if shape[1] != n_genes:
        raise UsageError(f"the checkpoint's replay sample has {shape[1]} genes, the model {n_genes}")
    return sp.csr_matrix((replay["data"], replay["indices"], replay["indptr"]), shape=shape, dtype=np.float32)


def normalize(norm: Normalization, counts: sp.csr_matrix, totals: np.ndarray) -> sp.csr_matrix:
    """Normalise as training did (by each cell's total over all genes when the checkpoint's normalisation says so)."""
    return norm.apply_csr(counts, totals=np.asarray(totals, dtype=np.float64))


# ----- settings and the network with extra batches ---------------------------------------------------------------
@dataclass
class FinetuneSettings:
    """How the adaptation runs; None values come from the reference's training config."""

    epochs: int = 10
    lr: float | None = None  # default: the reference's train.lr
    batch_size: int | None = None  # default: the reference's train.batch_size
    trains: tuple[str, ...] = ("encoder", "decoder", "dann")
    anchor_w: float = 3.0  # weight of the replay cells' latent anchor (MSE to their latent before fine-tuning)
    dann_objective: str | None = None  # default: the reference's model.dann_objective ("reversal" / "confusion")
    replay_ratio: float = 1.0  # replay cells per query cell in an epoch (at least the whole sample)
    dann_w: float | None = None  # default: the reference's loss.dann_w
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise UsageError(f"--finetune-epochs must be >= 1, got {self.epochs}")
        if "classifier" in self.trains:
            raise UsageError("fine-tuning keeps the classifier frozen; drop 'classifier' from the trained modules")


def with_new_batches(module: ScPermutModule, n_new: int) -> ScPermutModule:
    """A copy of `module` whose DANN head has `n_new` more output rows (old rows and every other weight kept)."""
    dims = dict(module.dims)
    n_old = module.dann.head.out.out_features
    dims["n_batches"] = n_old + n_new
    with torch.random.fork_rng(devices=[]):
        new = ScPermutModule(**dims)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    for name in ("weight", "bias"):
        key = f"dann.head.out.{name}"
        fresh = new.state_dict()[key].clone()
        fresh[:n_old] = state[key]
        state[key] = fresh
    new.load_state_dict(state)
    return new.eval()


# ----- the data: query + replay, shuffled together ---------------------------------------------------------------
@dataclass
class _Cells:
    x: sp.csr_matrix  # normalised
    label: np.ndarray
    batch: np.ndarray


class _MixedLoader:
    """Each epoch: every query cell once and `replay_ratio` x as many replay cells (at least each once), shuffled."""

    def __init__(self, query: _Cells, replay: _Cells, batch_size: int, replay_ratio: float, seed: int) -> None:
        self.query, self.replay, self.batch_size, self.seed = query, replay, batch_size, seed
        self.n_replay = max(replay.x.shape[0], int(round(replay_ratio * query.x.shape[0])))
        self._epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def __len__(self) -> int:
        return -(-(self.query.x.shape[0] + self.n_replay) // self.batch_size)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self._epoch])
        n_q, n_r = self.query.x.shape[0], self.replay.x.shape[0]
        extra = rng.integers(0, n_r, size=self.n_replay - n_r)
        rows = np.concatenate([np.arange(n_q), n_q + np.concatenate([np.arange(n_r), extra])])
        rng.shuffle(rows)
        for start in range(0, len(rows), self.batch_size):
            yield self._batch(rows[start:start + self.batch_size])

    def _batch(self, rows: np.ndarray) -> PairedBatch:
        n_q = self.query.x.shape[0]
        q, r = rows[rows < n_q], rows[rows >= n_q] - n_q
        x = sp.vstack([self.query.x[q], self.replay.x[r]]).toarray()
        x_ng = torch.from_numpy(x)
        return PairedBatch(x_ng=x_ng, x_partner_ng=x_ng, label_n=torch.from_numpy(
            np.concatenate([self.query.label[q], self.replay.label[r]])),
            batch_n=torch.from_numpy(np.concatenate([self.query.batch[q], self.replay.batch[r]])),
            cell_n=torch.from_numpy(np.concatenate([q, n_q + r]).astype(np.int64)))


# ----- the query ------------------------------------------------------------------------------------------------
def query_batches(adata: ad.AnnData, batch_key: str | None, where: str = "query") -> tuple[list[str], np.ndarray]:
    """The query's batch names (prefixed, so they never merge with a reference batch) and each cell's index."""
    if batch_key is None:
        return [QUERY_BATCH_PREFIX.rstrip(":")], np.zeros(adata.n_obs, dtype=np.int64)
    if batch_key not in adata.obs.columns:
        raise DataError(f"{where}: --query-batch-key {batch_key!r} is not an obs column; columns are "
                        f"{sorted(map(str, adata.obs.columns))[:40]}. Omit it to treat the query as one batch.")
    col = adata.obs[batch_key]
    if col.isna().any():
        raise DataError(f"{where}: obs[{batch_key!r}] has {int(col.isna().sum())} missing values; fill them or "
                        "choose another --query-batch-key")
    names, codes = np.unique(col.astype(str).to_numpy(), return_inverse=True)
    return [f"{QUERY_BATCH_PREFIX}{n}" for n in names], codes.astype(np.int64)


def _unique_names(names: list[str], taken: set[str]) -> list[str]:
    out = []
    for name in names:
        new, i = name, 2
        while new in taken:
            new, i = f"{name}#{i}", i + 1
        taken.add(new)
        out.append(new)
    return out


def normalized_query(ref: Reference, adata: ad.AnnData, layer: str | None, where: str, gene_key: str | None = None,
                     min_gene_fraction: float | None = None) -> sp.csr_matrix:
    """The query as `map` feeds it to the model (same gene alignment and normalisation), kept sparse."""
    from scpermut_dist.mapping.align import (CHUNK_CELLS, plan_query, prepare_query_chunk, query_matrix,
                                             suggest_raw)

    matrix, var = query_matrix(adata, layer, where)
    kw = {} if min_gene_fraction is None else {"min_gene_fraction": min_gene_fraction}
    with suggest_raw(adata, layer):
        plan = plan_query(var, ref.genes, ref.normalization, gene_key=gene_key, where=where, **kw)
        return sp.vstack([sp.csr_matrix(prepare_query_chunk(matrix[start:start + CHUNK_CELLS], plan))
                          for start in range(0, adata.n_obs, CHUNK_CELLS)], format="csr", dtype=np.float32)


# ----- the fine-tune --------------------------------------------------------------------------------------------
@dataclass
class FinetuneOutcome:
    reference: Reference
    history: list[dict] = field(default_factory=list)
    replay_accuracy: dict = field(default_factory=dict)  # balanced accuracy of replay cells, before / after


def finetune_reference(ref: Reference, adata: ad.AnnData, batch_key: str | None = None, layer: str | None = None,
                       settings: FinetuneSettings | None = None, where: str = "query", quiet: bool = True,
                       gene_key: str | None = None, min_gene_fraction: float | None = None) -> FinetuneOutcome:
    """Adapt a copy of `ref` to the query's batches; `ref` itself (and its files) stay as they were."""
    settings = settings or FinetuneSettings()
    replay_raw = (getattr(ref, "extras", None) or {}).get(REPLAY_KEY)
    if not replay_raw:
        raise UsageError(f"the reference {ref.path or ''} has no replay sample of reference cells "
                         "(extras['replay']); fine-tuning needs it to keep the query aligned with the reference. "
                         "Retrain the reference with this version, or map without --finetune.")
    names, codes = query_batches(adata, batch_key, where)
    names = _unique_names(names, set(ref.batches))  # a fine-tuned reference fine-tuned again keeps its batches
    n_old = len(ref.batches)
    query = _Cells(normalized_query(ref, adata, layer, where, gene_key, min_gene_fraction), np.full(adata.n_obs, -1, dtype=np.int64),
                   codes + n_old)
    rx = replay_matrix(replay_raw, len(ref.genes))
    replay_labels = np.asarray(replay_raw["label"], dtype=np.int64)
    replay = _Cells(normalize(ref.normalization, rx, replay_raw["totals"]), replay_labels,
                    np.asarray(replay_raw["batch"], dtype=np.int64))
    cfg = ref.config
    weights = LossWeights.from_config(cfg.loss)
    if settings.dann_w is not None:
        weights.dann_w = settings.dann_w
    batch_size = settings.batch_size or cfg.train.batch_size
    members, history, acc, shift = [], [], {"before": [], "after": []}, []
    for k, member in enumerate(ref.members):
        module = with_new_batches(member, len(names))
        if settings.dann_objective is not None:
            module.dann.objective = settings.dann_objective
        acc["before"].append(_replay_balanced_accuracy(module, replay.x, replay_labels))
        z_before = _latent(module, replay.x)
        loader = _MixedLoader(query, replay, batch_size, settings.replay_ratio, settings.seed + k)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed + k)
            records = _train(module, loader, settings, weights, settings.lr or cfg.train.lr,
                             cfg.train.dann_lr_mult, n_old, quiet)
        module.dann.objective = member.dann.objective
        module.cpu().eval()
        acc["after"].append(_replay_balanced_accuracy(module, replay.x, replay_labels))
        shift.append(float(np.sqrt(((_latent(module, replay.x) - z_before) ** 2).sum(axis=1).mean()
                                   / max((z_before ** 2).sum(axis=1).mean(), 1e-12))))
        history += [{**r, **({"member": k} if len(ref.members) > 1 else {})} for r in records]
        members.append(module)
    replay_accuracy = {k: float(np.mean(v)) for k, v in acc.items()}
    info = {"query": where, "query_batch_key": batch_key, "new_batches": names, "n_query_cells": int(adata.n_obs),
            "n_replay_cells": int(rx.shape[0]), "base_model": ref.path or "",
            "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()},
            "replay_balanced_accuracy": replay_accuracy,
            # How far the reference cells' latents moved (RMS shift / RMS norm): the stored neighbour sample,
            # calibration and unknown thresholds were fitted on the old latents and stay valid while it is small.
            "replay_latent_relative_shift": float(np.mean(shift))}
    adapted = Reference(members[0], cfg, ref.genes.copy(), list(ref.classes), [*ref.batches, *names],
                        ref.normalization, {**copy.deepcopy(ref.training_data), "finetune": info},
                        copy.deepcopy(ref.metrics), {**copy.deepcopy(ref.summary), "finetune": info},
                        [*ref.history, *history], path=None, extra_members=members[1:])
    adapted.extras = copy.deepcopy(getattr(ref, "extras", {}) or {})
    info["refreshed"] = refresh_latent_extras(ref, adapted, replay.x, replay_labels, replay.batch,
                                              np.asarray(replay_raw.get("cell", np.arange(len(replay_labels)))))
    return FinetuneOutcome(adapted, history, replay_accuracy)


def refresh_latent_extras(old: Reference, new: Reference, x_replay: sp.csr_matrix, labels: np.ndarray,
                          batches: np.ndarray, cells: np.ndarray) -> list[str]:
    """Re-fit what lives in the latent space (the neighbour sample, the unknown rule's distances) for `new`.

    The stored neighbour sample holds latents only (no counts), so the adapted model's sample is the labelled
    replay cells, embedded by its encoder; the unknown rule's class means and shared covariance are re-fitted
    on them. The validation distances behind the "unknown" distance threshold are carried over by quantile
    matching: each replay cell's distance to the nearest class under the old model and statistics vs the new
    ones maps old distances to new. Calibration stays: the classifier is frozen and the anchor keeps the
    reference's latents (their shift is in summary["finetune"]).
    """
    from scpermut_dist.mapping.neighbors import EXTRA as NEIGHBORS
    from scpermut_dist.mapping.neighbors import neighbor_extra
    from scpermut_dist.mapping.unknown import DEFAULT_QUANTILE, ClassGaussians, rule_from_extra
    from scpermut_dist.mapping.unknown import EXTRA as UNKNOWN

    if NEIGHBORS not in new.extras:
        return []
    keep = np.flatnonzero(labels >= 0)
    if len(keep) < 2:
        log.warning("fewer than 2 labelled replay cells: the adapted model keeps the old neighbour sample")
        return []
    x = x_replay[keep]
    z_new = _latent(new.module, x)
    new.extras[NEIGHBORS] = neighbor_extra(z_new, labels[keep], batches[keep], cells[keep])
    new.metrics["neighbors"] = {**(new.metrics.get("neighbors") or {}), "n_cells": int(len(keep)),
                                "refreshed_by": "finetune (replay cells)"}
    done = [NEIGHBORS]
    fitted = (new.metrics or {}).get("unknown") or {}
    stored = new.extras.get(UNKNOWN) or {}
    old_gauss = ClassGaussians.from_extra(stored)
    if old_gauss is not None and "val_distance" in stored:
        new_gauss = ClassGaussians.fit(z_new, labels[keep])
        d_old = np.sort(old_gauss.distance(_latent(old.module, x)))
        d_new = np.sort(new_gauss.distance(z_new))
        moved = np.interp(stored["val_distance"], d_old, d_new)  # monotone: the quantiles keep their rank
        new.extras[UNKNOWN] = {**stored, **new_gauss.to_extra(), "val_distance": np.sort(moved).astype(np.float32)}
        if "distance" in fitted:
            rule = rule_from_extra(new.extras[UNKNOWN], fitted.get("quantile", DEFAULT_QUANTILE),
                                   confidence=fitted.get("confidence"))
            new.metrics["unknown"] = {**fitted, "distance": rule.distance}
        done.append(UNKNOWN)
    return done


def _train(module: ScPermutModule, loader: _MixedLoader, settings: FinetuneSettings, weights: LossWeights,
           lr: float, dann_lr_mult: float, n_old: int, quiet: bool) -> list[dict]:
    """The adaptation loop: reconstruction + adversary + the replay cells' latent anchor.

    The anchor (MSE of a reference cell's new latent to its latent before fine-tuning, from a frozen copy of
    the encoder) keeps the reference's embedding, hence the frozen classifier's decisions, where they were: the
    adversary can then only move the query onto the reference, not the reference away from its classes.
    """
    device = torch.device(settings.device)
    teacher = copy.deepcopy(module.encoder).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    module.to(device)
    params = module.set_trainable(list(settings.trains))
    dann_ids = {id(p) for p in module.dann.parameters()}
    groups = [{"params": [p for p in params if id(p) not in dann_ids], "lr": lr},
              {"params": [p for p in params if id(p) in dann_ids], "lr": lr * dann_lr_mult}]
    optimizer = torch.optim.Adam([g for g in groups if g["params"]])
    terms, heads = ["rec", "dann"], ["decoder", "dann"]
    records = []
    for epoch in range(settings.epochs):
        loader.set_epoch(epoch)
        sums: dict[str, float] = {}
        steps = 0
        for batch in loader:
            if len(batch) < 2:  # BatchNorm cannot train on one cell
                continue
            batch = batch.to(device)
            out = module(batch.x_ng, heads=heads)
            loss, parts = total_loss(out, batch.x_partner_ng, batch.label_n, batch.batch_n, terms, weights)
            ref_rows = batch.batch_n < n_old
            if settings.anchor_w > 0 and bool(ref_rows.any()):
                with torch.no_grad():
                    target = teacher(batch.x_ng[ref_rows])
                anchor = torch.nn.functional.mse_loss(out.latent[ref_rows], target)
                loss = loss + settings.anchor_w * anchor
                parts["anchor"] = anchor.detach()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            for key, v in parts.items():
                sums[key] = sums.get(key, 0.0) + float(v)
        record = {"stage": "finetune", "epoch": epoch + 1, "steps": steps,
                  **{f"loss_{k}": v / max(steps, 1) for k, v in sums.items()}}
        records.append(record)
        if not quiet:
            log.info("finetune epoch %d: %s", epoch + 1,
                     " ".join(f"{k[5:]}={v:.4g}" for k, v in record.items() if k.startswith("loss_")))
    module.set_trainable([])
    return records


def _latent(module: ScPermutModule, x: sp.csr_matrix) -> np.ndarray:
    from scpermut_dist.mapping.predict import predict_proba

    return predict_proba(module, torch.from_numpy(x.toarray()))[0]


def _replay_balanced_accuracy(module: ScPermutModule, x: sp.csr_matrix, labels: np.ndarray) -> float:
    """Balanced accuracy of the replay cells: how much of the reference's classification the fine-tune kept."""
    from sklearn.metrics import balanced_accuracy_score

    from scpermut_dist.mapping.predict import predict_proba

    keep = labels >= 0
    if not keep.any():
        return float("nan")
    _, proba = predict_proba(module, torch.from_numpy(x[np.flatnonzero(keep)].toarray()))
    return float(balanced_accuracy_score(labels[keep], proba.argmax(axis=1)))


# ----- `scpermut map --finetune` ----------------------------------------------------------------------------------
def default_finetune_out(out: str | Path) -> Path:
    """Next to the mapped h5ad: `mapped.h5ad` -> `mapped.finetuned_model/`."""
    out = Path(out)
    return out.parent / f"{out.stem}.finetuned_model"


def check_finetune_out(path: str | Path, model: str | Path) -> Path:
    """The new checkpoint's folder; never the reference's folder, inside it, or around it."""
    dst, src = Path(path).absolute().resolve(), Path(model).absolute().resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise UsageError(f"--finetune-out {path}: overlaps the reference checkpoint {model}, which fine-tuning "
                         "never changes; give another folder")
    if dst.exists() and (not dst.is_dir() or (any(dst.iterdir()) and not (dst / "manifest.json").exists())):
        raise UsageError(f"--finetune-out {path}: exists and is not a scpermut checkpoint folder; give a new folder")
    return dst


def finetune_for_map(ref: Reference, adata: ad.AnnData, out_dir: str | Path, batch_key: str | None = None,
                     epochs: int | None = None, layer: str | None = None, where: str = "query",
                     quiet: bool = True, gene_key: str | None = None, min_gene_fraction: float | None = None
                     ) -> Reference:
    """Fine-tune, save the adapted reference (atomically) at `out_dir`, and return it for mapping."""
    settings = FinetuneSettings(**({} if epochs is None else {"epochs": epochs}))
    outcome = finetune_reference(ref, adata, batch_key, layer, settings, where, quiet, gene_key, min_gene_fraction)
    saved = outcome.reference.save(out_dir)
    if not quiet:
        acc = outcome.replay_accuracy
        print(f"fine-tuned on {adata.n_obs} query cells + {outcome.reference.summary['finetune']['n_replay_cells']} "
              f"replay cells, {settings.epochs} epochs (replay balanced accuracy {acc['before']:.3f} -> "
              f"{acc['after']:.3f}); wrote {saved}")
    return outcome.reference
