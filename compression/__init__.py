"""fedge wire format: sparsification, quantization, frames and the MQTT protocol.

This package is pure: it takes numpy arrays and bytes and returns numpy arrays and
bytes. It does no file, network or clock I/O, so that the agent and the coordinator
can share it and so that every byte on the wire is decided here.
"""

from compression.codec import CodecConfig, ErrorFeedback, apply_delta, compress_dense, compress_update, state_digest
from compression.errors import CodecError, FrameError, LimitError, ProtocolError
from compression.frame import (
    FORMAT_VERSION,
    Frame,
    FrameKind,
    FrameLimits,
    decode_frame,
    encode_frame,
)

__all__ = [
    "FORMAT_VERSION",
    "CodecConfig",
    "CodecError",
    "ErrorFeedback",
    "Frame",
    "FrameError",
    "FrameKind",
    "FrameLimits",
    "LimitError",
    "ProtocolError",
    "apply_delta",
    "state_digest",
    "compress_dense",
    "compress_update",
    "decode_frame",
    "encode_frame",
]
