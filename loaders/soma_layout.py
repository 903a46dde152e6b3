"""How this project lays out the SOMA arrays it writes (synthetic atlases and ingested h5ad files)."""
from __future__ import annotations


def x_platform_config(zstd_level: int = 5) -> dict:
    """Census X create options: 2048 x 2048 tiles, capacity 2**16, row-major, zstd.

    Census uses zstd level 9; 5 writes noticeably faster on small machines for a few % more disk.
    """
    z = {"_type": "ZstdFilter", "level": zstd_level}
    return {"tiledb": {"create": {
        "capacity": 2**16,
        "dims": {"soma_dim_0": {"tile": 2048, "filters": [z]},
                 "soma_dim_1": {"tile": 2048, "filters": ["ByteShuffleFilter", z]}},
        "attrs": {"soma_data": {"filters": ["ByteShuffleFilter", z]}},
        "cell_order": "row-major", "tile_order": "row-major", "allows_duplicates": True,
    }}}


def reopen_for_write(handle, enumerations: dict | None = None):
    """Close a handle made through a Collection and reopen it for writing at a later timestamp,
    optionally declaring every category of dictionary columns up front.

    tiledbsoma records a schema evolution (at the write handle's timestamp) each time a write adds
    category values; several evolutions with the same timestamp make readers pick one arbitrarily
    (seen as "Index N out of bounds" when reading). Declaring all categories once avoids that, and
    waiting for the clock to pass the creation timestamp keeps the evolution strictly newer.
    """
    import time

    import pyarrow as pa
    import tiledbsoma as soma

    uri, cls, created_ms = handle.uri, type(handle), handle.tiledb_timestamp_ms
    handle.close()
    while time.time_ns() // 1_000_000 <= created_ms:
        time.sleep(0.001)
    out = soma.open(uri, "w", soma_type=cls)
    if enumerations:
        out.extend_enumeration_values({k: pa.array(list(v), pa.large_string()) for k, v in enumerations.items()},
                                      deduplicate=True)
        out.close()  # reopen so writes run at a timestamp after the (single) evolution
        while time.time_ns() // 1_000_000 <= out.tiledb_timestamp_ms:
            time.sleep(0.001)
        out = soma.open(uri, "w", soma_type=cls)
    return out


TILE = 2048
WRITE_SORTED = {"tiledb": {"write": {"sort_coords": False}}}  # coords already in global order: no re-sort


def coo_table_global_order(x, row_offset: int, tile: int = TILE):
    """A CSR block as a SOMA COO table in the array's global order (row-major tiles of `tile` x `tile`,
    row-major cells), so it can be written with `WRITE_SORTED`; TileDB's own sort is ~6x slower."""
    import numpy as np
    import pyarrow as pa

    if not x.has_sorted_indices:
        x = x.copy()
        x.sort_indices()
    rows = np.repeat(np.arange(row_offset, row_offset + x.shape[0], dtype=np.int64), np.diff(x.indptr))
    cols = x.indices.astype(np.int64)
    data = x.data.astype(np.float32, copy=False)
    if x.shape[1] > tile:  # several column tiles: order by (row tile, column tile, row, column)
        order = np.lexsort((cols, rows, cols // tile, rows // tile))
        rows, cols, data = rows[order], cols[order], data[order]
    return pa.Table.from_pydict({"soma_dim_0": rows, "soma_dim_1": cols, "soma_data": data})
