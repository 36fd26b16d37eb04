"""The one table per enum (omnigate.enums): every plain member maps to its proto value and back, in both
protocols, and a table that would leave a value unmapped fails when it is built."""

from __future__ import annotations

import enum

import pytest

from omnigate import enums
from omnigate.conversation import FinishReason, GenerationMode, Modality
from omnigate.gateway.v1 import gateway_pb2 as gw
from omnigate.worker.v1 import worker_pb2 as wk

TABLES = [
    (enums.PUBLIC_MODES, GenerationMode, gw.GenerationMode, "GENERATION_MODE"),
    (enums.PUBLIC_MODALITIES, Modality, gw.Modality, "MODALITY"),
    (enums.PUBLIC_FINISH_REASONS, FinishReason, gw.FinishReason, "FINISH_REASON"),
    (enums.WORKER_MODES, GenerationMode, wk.GenerationMode, "GENERATION_MODE"),
    (enums.WORKER_MODALITIES, Modality, wk.Modality, "MODALITY"),
    (enums.WORKER_FINISH_REASONS, FinishReason, wk.FinishReason, "FINISH_REASON"),
]


@pytest.mark.parametrize(("table", "plain", "proto", "prefix"), TABLES)
def test_every_member_maps_to_the_value_of_its_name_and_back(table, plain, proto, prefix):
    for member in plain:
        number = table.to_proto(member)
        assert proto.Name(number) == f"{prefix}_{member.name}"
        assert table[number] is member and table.get(number) is member and number in table
    assert table.get(table.unspecified) is None and table.unspecified not in table
    assert proto.Name(table.unspecified) == f"{prefix}_UNSPECIFIED"
    assert table.get(max(proto.values()) + 1) is None  # a value from a newer protocol version


def test_a_proto_value_without_a_plain_member_fails_the_table():
    class TwoModes(enum.StrEnum):
        TEXT = "text"
        AUDIO = "audio"

    with pytest.raises(ValueError, match="GENERATION_MODE_IMAGE"):
        enums.ProtoEnum(TwoModes, gw.GenerationMode, "GENERATION_MODE")


def test_a_plain_member_without_a_proto_value_fails_the_table():
    class MoreModes(enum.StrEnum):
        TEXT = "text"
        AUDIO = "audio"
        IMAGE = "image"
        VIDEO = "video"

    with pytest.raises(ValueError, match="GENERATION_MODE_VIDEO"):
        enums.ProtoEnum(MoreModes, gw.GenerationMode, "GENERATION_MODE")


def test_a_mode_generates_its_modality():
    assert {mode: mode.output for mode in GenerationMode} == {
        GenerationMode.TEXT: Modality.TEXT,
        GenerationMode.AUDIO: Modality.AUDIO,
        GenerationMode.IMAGE: Modality.IMAGE,
    }
