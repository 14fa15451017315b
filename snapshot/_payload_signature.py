"""A payload's signatures, checked against the signer's certificate.

update_engine checks two signatures before it trusts a payload, both
``Signatures`` messages (one ``Signature`` per signing key, any one may
match):

* the **metadata signature**, stored right after the manifest
  (``metadata_signature_size`` bytes): it signs the SHA-256 of the header
  and the manifest;
* the **payload signature**, the blob at ``signatures_offset`` of the data
  area (``signatures_size`` bytes): it signs the SHA-256 of everything
  before that blob *except* the metadata signature (header, manifest, then
  the data blobs).

Each signature is PKCS#1 v1.5 over that digest (RSA, 2048 or 4096 bits), or
ECDSA for an EC key; ``unpadded_signature_size``, when set, says how many
bytes of ``data`` are the signature (the rest pads it to a fixed size).

The key comes from ``--cert``: the signer's X.509 certificate (PEM or DER,
what AOSP's ``otacert``/``releasekey.x509.pem`` is) or a PEM public key.
Without one nothing is checked, and ``dmuserd ota`` says so.
"""

from __future__ import annotations

import hashlib
from google.protobuf.message import DecodeError

from dmuserd.snapshot import _payload_proto as proto
from dmuserd.snapshot.payload import HEADER_SIZE, Payload, PayloadError

_CHUNK = 1 << 20


class PayloadSignatureError(PayloadError):
    """A signature that is missing, malformed or made with another key."""


def load_public_key(path):
    """The public key of a certificate (PEM/DER) or a PEM public key file."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise PayloadSignatureError(f"cannot read the certificate {path}: {exc.strerror}") from None
    loaders = (
        lambda d: x509.load_pem_x509_certificate(d).public_key(),
        lambda d: x509.load_der_x509_certificate(d).public_key(),
        serialization.load_pem_public_key,
        serialization.load_der_public_key,
    )
    for load in loaders:
        try:
            return load(data)
        except (ValueError, TypeError):
            continue
    raise PayloadSignatureError(f"{path} is neither an X.509 certificate nor a public key (PEM or DER)")


def parse_signatures(blob: bytes, what: str) -> list[bytes]:
    """The signature bytes of a ``Signatures`` message (unpadded)."""
    message = proto.Signatures()
    try:
        message.ParseFromString(blob)
    except (DecodeError, RecursionError) as exc:
        raise PayloadSignatureError(f"the {what} is not a Signatures message ({exc})") from None
    found = []
    for sig in message.signatures:
        data = sig.data
        if sig.HasField("unpadded_signature_size"):
            if sig.unpadded_signature_size > len(data):
                raise PayloadSignatureError(f"the {what}'s unpadded_signature_size {sig.unpadded_signature_size} "
                                            f"is over its {len(data)} bytes")
            data = data[: sig.unpadded_signature_size]
        found.append(data)
    if not found:
        raise PayloadSignatureError(f"the {what} holds no signature")
    return found


def _matches(key, signature: bytes, digest: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

    prehashed = utils.Prehashed(hashes.SHA256())
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, digest, padding.PKCS1v15(), prehashed)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, digest, ec.ECDSA(prehashed))
        else:
            raise PayloadSignatureError(f"the certificate's {type(key).__name__} is not an RSA or EC key")
    except (InvalidSignature, ValueError):
        return False
    return True


def metadata_digest(payload: Payload) -> bytes:
    return hashlib.sha256(payload.read(0, payload.metadata_size)).digest()


def payload_digest(payload: Payload, *, bar=None) -> bytes:
    """SHA-256 of header, manifest and the data blobs before the payload signature."""
    h = hashlib.sha256(payload.read(0, payload.metadata_size))
    start = payload.header.data_offset
    end = start + payload.manifest.signatures_offset
    for pos in range(start, end, _CHUNK):
        data = payload.read(pos, min(_CHUNK, end - pos))
        h.update(data)
        if bar is not None:
            bar.update(len(data))
    return h.digest()


def verify(payload: Payload, cert_path, *, bar=None) -> None:
    """Check both signatures of ``payload`` against the key of ``cert_path``; raise if one does not match."""
    key = load_public_key(cert_path)
    where = f"payload {payload.path}"
    if not payload.header.metadata_signature_size:
        raise PayloadSignatureError(f"{where} has no metadata signature: it is not signed")
    blob = payload.read(HEADER_SIZE + payload.header.manifest_size, payload.header.metadata_signature_size)
    digest = metadata_digest(payload)
    if not any(_matches(key, sig, digest) for sig in parse_signatures(blob, "metadata signature")):
        raise PayloadSignatureError(f"{where}: the metadata signature was not made with the key of {cert_path}: "
                                    "the payload is not from this signer, or was changed")
    m = payload.manifest
    if not m.HasField("signatures_size") or not m.signatures_size:
        raise PayloadSignatureError(f"{where} has no payload signature (signatures_offset/size): it is not signed")
    blob = payload.read(payload.header.data_offset + m.signatures_offset, m.signatures_size)
    digest = payload_digest(payload, bar=bar)
    if not any(_matches(key, sig, digest) for sig in parse_signatures(blob, "payload signature")):
        raise PayloadSignatureError(f"{where}: the payload signature was not made with the key of {cert_path}: "
                                    "the payload was changed after signing, or is from another signer")
