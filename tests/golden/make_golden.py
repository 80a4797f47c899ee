"""Writes the golden wire vectors. Run by hand only when adding a NEW format version:
existing files must never change, since they prove that old frames still decode.

    python -m tests.golden.make_golden
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from compression import FrameKind, encode_frame, protocol
from compression.frame import SparseTensor
from compression.indices import IndexCoding
from compression.protocol import UpdateHeader
from compression.quantize import ValueType

HERE = Path(__file__).parent


def _as_version_1(frame: bytes) -> bytes:
    """Version 1 frames (u32 indices, fp32/fp16/int8 values) differ from version 2 only in the version byte."""
    import struct
    import zlib

    body = frame[:4] + bytes([1]) + frame[5:-4]
    return body + struct.pack("<I", zlib.crc32(body))


def cases() -> dict[str, tuple[bytes, dict[str, list]]]:
    dense = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    sparse = SparseTensor(shape=(5, 6), values=np.array([0.5, -0.25, 2.0], np.float32), indices=np.array([1, 7, 29]))
    tensors = {"layer.lora_A.weight": SparseTensor(shape=(3, 4), values=dense.reshape(-1)), "layer.lora_B.weight": sparse}
    out = {}
    for name, vtype in (("update_v1_fp32", ValueType.FP32), ("update_v1_fp16", ValueType.FP16), ("update_v1_int8", ValueType.INT8)):
        frame = encode_frame(FrameKind.UPDATE, tensors, values=vtype, int8_block=4, zstd_level=3, index_coding=IndexCoding.U32)
        out[name] = (_as_version_1(frame), {})
    for name, vtype, coding in (
        ("update_v2_int8_bitpack", ValueType.INT8, IndexCoding.BITPACK),
        ("update_v2_fp16_varint", ValueType.FP16, IndexCoding.VARINT),
        ("update_v2_sign_bitpack", ValueType.SIGN, IndexCoding.BITPACK),
        ("update_v3_int4_varint", ValueType.INT4, IndexCoding.VARINT),
    ):
        out[name] = (encode_frame(FrameKind.UPDATE, tensors, values=vtype, int8_block=4, index_coding=coding), {})
    # Rotating selection (indices in arithmetic progression, rescaled values) and a full
    # fraction over a mostly-zero tensor (sparse record of every non-zero): no new layout,
    # but the encodings the rotating codec and the lossless-support downlink produce.
    from compression import CodecConfig, compress_update

    grid = {"layer.lora_A.weight": np.linspace(-1, 1, 24, dtype=np.float32).reshape(4, 6), "layer.lora_B.weight": dense}
    rotating = CodecConfig(topk_fraction=0.25, values="sign", selection="rotating", rescale=True, int8_block=4)
    out["update_v2_sign_varint_rotating"] = (compress_update(grid, rotating, phase=1).frame, {})
    mostly_zero = np.zeros((5, 6), np.float32)
    mostly_zero.reshape(-1)[[2, 3, 17]] = [0.75, -0.5, 1.25]
    support = CodecConfig(topk_fraction=1.0, values="int8", int8_block=4)
    out["update_v2_int8_varint_support"] = (compress_update({"layer.lora_B.weight": mostly_zero}, support).frame, {})
    snap = _as_version_1(encode_frame(FrameKind.SNAPSHOT, {"w": SparseTensor(shape=(2, 2), values=np.array([1, 2, 3, 4], np.float32))}))
    out["snapshot_v1_fp32"] = (snap, {})
    header = UpdateHeader(
        device="pi-1",
        seq=7,
        update_id="pi-1-7",
        base_version=3,
        num_samples=16,
        timestamp=1700000000.0,
        frame_sha256=hashlib.sha256(out["update_v1_int8"][0]).hexdigest(),
        train_loss=2.5,
    )
    out["envelope_v1"] = (protocol.encode_envelope(header, out["update_v1_int8"][0]), {})
    # Ed25519 signatures are deterministic: a fixed key gives a fixed vector.
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    out["envelope_v2_signed"] = (protocol.encode_envelope(header, out["update_v1_int8"][0], signer=key.sign), {})
    # The header declares the base it trained on (the content hash of its weights).
    with_base = replace(header, base_sha256=hashlib.sha256(b"base weights").hexdigest())
    out["envelope_v2_signed_base"] = (protocol.encode_envelope(with_base, out["update_v1_int8"][0], signer=key.sign), {})
    # A site's partial aggregate: two groups by base version, each a lossless weighted sum.
    from compression import compress_dense
    from compression.partial import Group, Partial

    g1 = compress_dense({"layer.lora_A.weight": dense}, FrameKind.UPDATE)
    g2 = compress_dense({"layer.lora_A.weight": -2 * dense}, FrameKind.UPDATE)
    partial = Partial("site-a", 3, 1700000000.0, (Group(4, 32.0, 2, ("pi-1-7", "pi-2-9"), g1), Group(5, 16.0, 1, ("pi-3-1",), g2)))
    out["partial_v1"] = (partial.encode(key.sign), {})
    return out


def main() -> None:
    from compression import decode_frame

    for name, (data, _) in cases().items():
        path = HERE / f"{name}.bin"
        if path.exists():
            print(f"keep {path.name} (golden files are never rewritten)")
            continue
        path.write_bytes(data)
        if name.startswith("partial"):
            from compression.partial import decode as decode_partial

            p = decode_partial(data, lambda site: lambda sig, msg: True)
            tensors = {f"group{i}/{k}": v.tolist() for i, g in enumerate(p.groups) for k, v in decode_frame(g.frame).dense().items()}
            expected = {"sha256": hashlib.sha256(data).hexdigest(), "tensors": tensors}
            (HERE / f"{name}.json").write_text(json.dumps(expected, indent=1))
            print(f"wrote {path.name}")
            continue
        frame_bytes = protocol.decode_envelope(data)[1] if name.startswith("envelope") else data
        decoded = decode_frame(frame_bytes).dense()
        expected = {"sha256": hashlib.sha256(data).hexdigest(), "tensors": {k: v.tolist() for k, v in decoded.items()}}
        (HERE / f"{name}.json").write_text(json.dumps(expected, indent=1))
        print(f"wrote {path.name}")


if __name__ == "__main__":
    main()
