"""The payload manifest's protobuf schema, built at import (no protoc step).

These are the fields of AOSP's ``update_metadata.proto`` (package
``chromeos_update_engine``, proto2) that dmuserd reads, with AOSP's field
numbers (``../shared/specs/ota-payload.md``). Fields we do not declare are
kept by protobuf as unknown fields and ignored, so a newer payload still
parses. The schema reads like the ``.proto`` it stands for::

    message Extent { optional uint64 start_block = 1; optional uint64 num_blocks = 2; }

Two deliberate differences from AOSP's text, both wire-compatible:

* enum-typed fields (``InstallOperation.type``, ``CowMergeOperation.type``)
  are declared ``uint32``. proto2 enums are closed: an unknown value would
  vanish into the unknown fields and the field would read as its default
  (``REPLACE``), silently turning, say, a future diff op into a replace.
  As a plain integer the reader sees the real number and refuses it.
* ``required`` fields are ``optional``; the reader checks them itself so
  the error names the partition and operation instead of protobuf's
  generic "missing required fields".

Building the descriptor in Python instead of shipping protoc's output keeps
one source of truth and no generated file to regenerate.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_PACKAGE = "chromeos_update_engine"
_F = descriptor_pb2.FieldDescriptorProto

#: message name -> [(field name, number, type, label, message type or None, default or None)]
_OPT, _REP = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED
_U32, _U64, _I64 = _F.TYPE_UINT32, _F.TYPE_UINT64, _F.TYPE_INT64
_BYTES, _STR, _BOOL, _MSG = _F.TYPE_BYTES, _F.TYPE_STRING, _F.TYPE_BOOL, _F.TYPE_MESSAGE
_FIXED32 = _F.TYPE_FIXED32

SCHEMA: dict[str, list[tuple]] = {
    "Extent": [
        ("start_block", 1, _U64, _OPT, None, None),
        ("num_blocks", 2, _U64, _OPT, None, None),
    ],
    # Signatures.Signature in AOSP (a nested message there: the wire format is the same)
    "Signature": [
        ("version", 1, _U32, _OPT, None, None),
        ("data", 2, _BYTES, _OPT, None, None),
        ("unpadded_signature_size", 3, _FIXED32, _OPT, None, None),
    ],
    "Signatures": [
        ("signatures", 1, _MSG, _REP, "Signature", None),
    ],
    "PartitionInfo": [
        ("size", 1, _U64, _OPT, None, None),
        ("hash", 2, _BYTES, _OPT, None, None),
    ],
    "InstallOperation": [
        ("type", 1, _U32, _OPT, None, None),  # enum Type in AOSP (see the module doc)
        ("data_offset", 2, _U64, _OPT, None, None),
        ("data_length", 3, _U64, _OPT, None, None),
        ("src_extents", 4, _MSG, _REP, "Extent", None),
        ("src_length", 5, _U64, _OPT, None, None),
        ("dst_extents", 6, _MSG, _REP, "Extent", None),
        ("dst_length", 7, _U64, _OPT, None, None),
        ("data_sha256_hash", 8, _BYTES, _OPT, None, None),
        ("src_sha256_hash", 9, _BYTES, _OPT, None, None),
    ],
    "CowMergeOperation": [
        ("type", 1, _U32, _OPT, None, None),  # enum Type in AOSP
        ("src_extent", 2, _MSG, _OPT, "Extent", None),
        ("dst_extent", 3, _MSG, _OPT, "Extent", None),
        ("src_offset", 4, _U32, _OPT, None, None),
    ],
    "PartitionUpdate": [
        ("partition_name", 1, _STR, _OPT, None, None),
        ("old_partition_info", 6, _MSG, _OPT, "PartitionInfo", None),
        ("new_partition_info", 7, _MSG, _OPT, "PartitionInfo", None),
        ("operations", 8, _MSG, _REP, "InstallOperation", None),
        ("hash_tree_data_extent", 10, _MSG, _OPT, "Extent", None),
        ("hash_tree_extent", 11, _MSG, _OPT, "Extent", None),
        ("hash_tree_algorithm", 12, _STR, _OPT, None, None),
        ("hash_tree_salt", 13, _BYTES, _OPT, None, None),
        ("fec_data_extent", 14, _MSG, _OPT, "Extent", None),
        ("fec_extent", 15, _MSG, _OPT, "Extent", None),
        ("fec_roots", 16, _U32, _OPT, None, "2"),
        ("merge_operations", 18, _MSG, _REP, "CowMergeOperation", None),
        ("estimate_cow_size", 19, _U64, _OPT, None, None),
        ("estimate_op_count_max", 20, _U64, _OPT, None, None),
    ],
    "DynamicPartitionMetadata": [
        ("vabc_enabled", 3, _BOOL, _OPT, None, None),
        ("vabc_compression_param", 4, _STR, _OPT, None, None),
        ("cow_version", 5, _U32, _OPT, None, None),
        ("compression_factor", 7, _U64, _OPT, None, None),
    ],
    "DeltaArchiveManifest": [
        ("block_size", 3, _U32, _OPT, None, "4096"),
        ("signatures_offset", 4, _U64, _OPT, None, None),
        ("signatures_size", 5, _U64, _OPT, None, None),
        ("minor_version", 12, _U32, _OPT, None, "0"),
        ("partitions", 13, _MSG, _REP, "PartitionUpdate", None),
        ("max_timestamp", 14, _I64, _OPT, None, None),
        ("dynamic_partition_metadata", 15, _MSG, _OPT, "DynamicPartitionMetadata", None),
        ("partial_update", 16, _BOOL, _OPT, None, None),
    ],
}


def _build() -> dict[str, type]:
    file = descriptor_pb2.FileDescriptorProto(
        name="dmuserd/update_metadata.proto", package=_PACKAGE, syntax="proto2"
    )
    for name, fields in SCHEMA.items():
        message = file.message_type.add(name=name)
        for field_name, number, ftype, label, type_name, default in fields:
            field = message.field.add(name=field_name, number=number, type=ftype, label=label)
            if type_name:
                field.type_name = f".{_PACKAGE}.{type_name}"
            if default is not None:
                field.default_value = default
    # a private pool: no clash with another copy of AOSP's schema in the process
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.{name}"))
            for name in SCHEMA}


_CLASSES = _build()
Extent = _CLASSES["Extent"]
PartitionInfo = _CLASSES["PartitionInfo"]
InstallOperation = _CLASSES["InstallOperation"]
CowMergeOperation = _CLASSES["CowMergeOperation"]
PartitionUpdate = _CLASSES["PartitionUpdate"]
DynamicPartitionMetadata = _CLASSES["DynamicPartitionMetadata"]
DeltaArchiveManifest = _CLASSES["DeltaArchiveManifest"]
Signature = _CLASSES["Signature"]
Signatures = _CLASSES["Signatures"]
