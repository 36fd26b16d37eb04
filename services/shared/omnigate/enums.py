"""The one table between each plain enum (``omnigate.conversation``) and its protobuf enums.

The protos name enum values ``<ENUM>_<MEMBER>`` (buf's STANDARD rules), so each table is derived from the
names, once: ``GenerationMode.AUDIO`` is ``GENERATION_MODE_AUDIO`` in both the public and the worker
protocol. Building a table checks both directions at import: a plain member the proto lacks, or a proto
value (other than ``_UNSPECIFIED``) with no plain member, fails at start-up instead of mapping to nothing.
"""

from __future__ import annotations

import enum
from typing import Any, Generic, TypeVar

from omnigate.conversation import FinishReason, GenerationMode, Modality
from omnigate.gateway.v1 import gateway_pb2 as gw
from omnigate.worker.v1 import worker_pb2 as wk

E = TypeVar("E", bound=enum.Enum)
P = TypeVar("P", bound=int)  # the generated enum class (e.g. gateway_pb2.GenerationMode)


class ProtoEnum(Generic[E, P]):
    """A plain enum and one protobuf enum: ``to_proto(member)``, ``get(number)``, ``number in table``."""

    def __init__(self, plain: type[E], proto: Any, prefix: str) -> None:
        # proto: the generated EnumTypeWrapper (e.g. gateway_pb2.GenerationMode)
        self.unspecified: P = proto.Value(f"{prefix}_UNSPECIFIED")
        self._to_proto: dict[E, P] = {member: proto.Value(f"{prefix}_{member.name}") for member in plain}
        self._from_proto: dict[P, E] = {number: member for member, number in self._to_proto.items()}
        extra = [
            name
            for name, number in proto.items()
            if number not in self._from_proto and number != self.unspecified
        ]
        if extra:
            raise ValueError(
                f"{proto.DESCRIPTOR.full_name} has {', '.join(extra)}, which {plain.__name__} lacks"
            )
        self.names = ", ".join(f"{prefix}_{member.name}" for member in plain)  # for error messages

    def to_proto(self, member: E) -> P:
        return self._to_proto[member]

    def get(self, number: P) -> E | None:
        """The plain member of a proto number; None for _UNSPECIFIED and numbers this version does not know."""
        return self._from_proto.get(number)

    def __getitem__(self, number: P) -> E:
        return self._from_proto[number]

    def __contains__(self, number: object) -> bool:
        return number in self._from_proto


PUBLIC_MODES: ProtoEnum[GenerationMode, gw.GenerationMode] = ProtoEnum(
    GenerationMode, gw.GenerationMode, "GENERATION_MODE"
)
PUBLIC_MODALITIES: ProtoEnum[Modality, gw.Modality] = ProtoEnum(Modality, gw.Modality, "MODALITY")
PUBLIC_FINISH_REASONS: ProtoEnum[FinishReason, gw.FinishReason] = ProtoEnum(
    FinishReason, gw.FinishReason, "FINISH_REASON"
)
WORKER_MODES: ProtoEnum[GenerationMode, wk.GenerationMode] = ProtoEnum(
    GenerationMode, wk.GenerationMode, "GENERATION_MODE"
)
WORKER_MODALITIES: ProtoEnum[Modality, wk.Modality] = ProtoEnum(Modality, wk.Modality, "MODALITY")
WORKER_FINISH_REASONS: ProtoEnum[FinishReason, wk.FinishReason] = ProtoEnum(
    FinishReason, wk.FinishReason, "FINISH_REASON"
)
