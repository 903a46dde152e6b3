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


def reopen_for_write(handle):
    """Close a handle made through a Collection and reopen it for writing at the current time.

    Handles created through a Collection carry the collection's open timestamp; enumeration
    (categorical) extensions written through them are not visible to later readers (tiledbsoma 2.3).
    """
    import tiledbsoma as soma

    uri, cls = handle.uri, type(handle)
    handle.close()
    return soma.open(uri, "w", soma_type=cls)
