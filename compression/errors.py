"""Exception hierarchy of the wire package.

Every problem found in bytes that came off the wire is raised as a subclass of
:class:`CodecError`, so that a daemon can catch exactly one type at its boundary
and turn it into a counted rejection reason.
"""

from compression.reasons import Reason


class CodecError(ValueError):
    """Base class: the bytes or arrays given to the codec are not acceptable."""

    reason = Reason.MALFORMED.value


class FrameError(CodecError):
    """A frame is malformed: bad magic, version, lengths, counts, dtypes or indices."""

    reason = Reason.MALFORMED_FRAME.value


class ChecksumError(FrameError):
    """A frame's checksum does not match its content."""

    reason = Reason.BAD_CHECKSUM.value


class LimitError(CodecError):
    """A frame or message is larger than the configured limits allow."""

    reason = Reason.TOO_LARGE.value


class ProtocolError(CodecError):
    """An MQTT payload (envelope, meta or status JSON) or topic is malformed."""

    reason = Reason.MALFORMED_MESSAGE.value
