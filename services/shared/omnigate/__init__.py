"""Omnigate shared package: plain request/media types, errors and settings helpers.

The generated protobuf/grpc code lives in the sub-packages ``omnigate.gateway.v1`` and
``omnigate.worker.v1`` (built by ``make protos``; never edited by hand).
"""
