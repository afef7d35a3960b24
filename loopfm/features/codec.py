"""int4 packing of FM codes: round(8z) clamped to [-8, 7], two codes per byte.

NumPy only: the FM logger packs with it and the server unpacks with it.
"""

from __future__ import annotations

import numpy as np


def quantize_int4(z: np.ndarray) -> np.ndarray:
    """tanh-bounded float codes in [-1, 1] -> int8 levels in [-8, 7]."""
    return np.clip(np.round(8 * z), -8, 7).astype(np.int8)


def pack_int4(levels: np.ndarray) -> np.ndarray:
    """[..., d] int8 levels (d even) -> [..., d/2] uint8, high nibble first."""
    u = (levels.astype(np.int16) + 8).astype(np.uint8)
    return (u[..., 0::2] << 4) | u[..., 1::2]


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """[..., d/2] uint8 -> [..., d] float32 codes, each a multiple of 1/8 in [-1, 7/8]."""
    high = (packed >> 4).astype(np.int8) - 8
    low = (packed & 0x0F).astype(np.int8) - 8
    out = np.stack([high, low], axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    return out.astype(np.float32) / 8.0
