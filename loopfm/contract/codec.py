"""Storage formats of FM codes: int4 (round(8z) clamped to [-8, 7], two codes per byte) or fp32.

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


CODE_FORMATS = ("int4", "fp32")


def code_bytes(code_dim: int, code_format: str) -> int:
    """Stored bytes of one code: int4 packs two dims per byte, fp32 keeps four bytes per dim."""
    return code_dim // 2 if code_format == "int4" else 4 * code_dim


def encode_codes(z: np.ndarray, code_format: str) -> np.ndarray:
    """[n, d] float codes -> [n, code_bytes] uint8, the bytes one code takes in the log and store."""
    if code_format == "int4":
        return pack_int4(quantize_int4(z))
    return np.ascontiguousarray(z, dtype="<f4").view(np.uint8)


def decode_codes(stored: np.ndarray, code_format: str) -> np.ndarray:
    """[..., code_bytes] uint8 -> [..., d] float32 (the inverse of encode_codes, up to int4 rounding)."""
    if code_format == "int4":
        return unpack_int4(stored)
    return np.ascontiguousarray(stored).view("<f4").astype(np.float32)
