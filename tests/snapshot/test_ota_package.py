"""OTA zips and signatures: ``dmuserd ota`` reads payload.bin in place from an
OTA package, checks payload_properties.txt, shows the package's metadata,
and checks both payload signatures against a certificate (issue #18, item 5)."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ota_vectors import ota_zip, signing_key, synthetic_payload

from dmuserd.snapshot._ota_zip import OtaPackageError, locate_payload
from dmuserd.snapshot.ota import apply_payload, check_payload
from dmuserd.snapshot.payload import Payload, PayloadError

DMUSERD = [sys.executable, "-m", "dmuserd"]


def cli(*args, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(DMUSERD + [str(a) for a in args], capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture
def signed(tmp_path):
    """(ota.zip, cert, old image dir, new image) for a signed delta payload of one partition."""
    key, cert = signing_key(tmp_path)
    old, new = synthetic_payload(tmp_path / "payload.bin", key=key)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "system.img").write_bytes(old)
    return ota_zip(tmp_path / "ota.zip", tmp_path / "payload.bin"), cert, tmp_path / "old", new


def test_payload_is_read_in_place_from_the_zip(signed, tmp_path):
    package, _cert, old, new = signed
    location = locate_payload(package)
    with zipfile.ZipFile(package) as z:
        assert z.read("payload.bin") == package.read_bytes()[location.offset : location.offset + location.size]
    assert location.package.metadata["ota-type"] == "AB"
    results = apply_payload(package, cow_dir=tmp_path / "cow", source_dir=old)
    assert results[0].sha256 == __import__("hashlib").sha256(new).hexdigest()


def test_cli_inspect_apply_verify_a_signed_zip(signed, tmp_path):
    package, cert, old, _new = signed
    text = cli("ota", "inspect", package).stdout
    assert "OTA type: AB" in text and "Post-build: dmuserd/test/new" in text and "FILE_HASH=" in text
    info = json.loads(cli("ota", "inspect", package, "--json").stdout)
    assert info["package"]["metadata"]["pre-device"] == "test" and info["signatures"]["size"] > 0
    out = cli("ota", "apply", package, "--cow-dir", tmp_path / "cow", "--source-dir", old, "--cert", cert).stdout
    assert "METADATA_SIZE, METADATA_HASH, FILE_SIZE, FILE_HASH match" in out
    assert f"signatures: metadata and payload signatures verified against {cert}" in out
    out = cli("ota", "verify", package, "--cow-dir", tmp_path / "cow", "--source-dir", old).stdout
    assert "signatures: not checked (pass --cert" in out and "system OK" in out


def test_a_payload_from_another_signer_is_refused(signed, tmp_path):
    package, _cert, old, _new = signed
    (tmp_path / "other").mkdir()
    _key, other = signing_key(tmp_path / "other")
    result = cli("ota", "apply", package, "--cow-dir", tmp_path / "cow", "--source-dir", old, "--cert", other,
                 check=False)
    assert result.returncode != 0 and "metadata signature was not made with the key" in result.stderr
    assert not (tmp_path / "cow").exists()  # refused before anything was written


def test_a_changed_blob_fails_the_payload_signature(signed, tmp_path):
    package, cert, _old, _new = signed
    payload = bytearray((tmp_path / "payload.bin").read_bytes())
    payload[-300] ^= 1  # inside the data blobs, before the payload signature
    (tmp_path / "changed.bin").write_bytes(payload)
    with pytest.raises(PayloadError, match="payload signature was not made with the key"):
        check_payload(tmp_path / "changed.bin", cert=cert)
    with pytest.raises(PayloadError, match="not signed"):
        synthetic_payload(tmp_path / "unsigned.bin")
        check_payload(tmp_path / "unsigned.bin", cert=cert)


@pytest.mark.parametrize("properties, error", [
    ({"FILE_HASH": "AAAA" * 10 + "AAA="}, "FILE_HASH"),
    ({"FILE_SIZE": "12"}, "says the payload is 12 bytes"),
    ({"METADATA_HASH": "B" * 43 + "="}, "METADATA_HASH"),
    ({"METADATA_SIZE": "7"}, "metadata is 7 bytes"),
    ({"FILE_HASH": "not base64!"}, "is not a base64 SHA-256"),
])
def test_a_package_inconsistent_with_its_properties_is_refused(tmp_path, properties, error):
    synthetic_payload(tmp_path / "payload.bin")
    package = ota_zip(tmp_path / "ota.zip", tmp_path / "payload.bin", properties=properties)
    with pytest.raises(OtaPackageError, match=error):
        check_payload(package)


def test_a_compressed_payload_entry_is_read_too(tmp_path):
    """Repackaged zips may deflate payload.bin: it is decompressed once to a temporary file, not refused."""
    old, new = synthetic_payload(tmp_path / "payload.bin")
    with zipfile.ZipFile(tmp_path / "ota.zip", "w") as z:
        z.write(tmp_path / "payload.bin", "payload.bin", compress_type=zipfile.ZIP_DEFLATED)
    assert "decompressed to a temporary file" in cli("ota", "inspect", tmp_path / "ota.zip").stdout
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "system.img").write_bytes(old)
    results = apply_payload(tmp_path / "ota.zip", cow_dir=tmp_path / "cow", source_dir=tmp_path / "old")
    assert results[0].sha256 == __import__("hashlib").sha256(new).hexdigest()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=400), st.integers(0, 399), st.binary(min_size=1, max_size=8))
def test_hostile_zips_are_typed_errors(tmp_path, tail, cut, garbage):
    """A damaged package: every failure is a PayloadError, never another exception."""
    if not (tmp_path / "ota.zip").exists():
        synthetic_payload(tmp_path / "payload.bin")
        ota_zip(tmp_path / "ota.zip", tmp_path / "payload.bin")
    good = (tmp_path / "ota.zip").read_bytes()
    for damaged in (b"PK\x03\x04" + tail, good[: len(good) - cut], good[:cut] + garbage + good[cut + len(garbage):],
                    good[: len(good) - 22 - cut % 40] + garbage + good[len(good) - 22 - cut % 40 + len(garbage):]):
        (tmp_path / "bad.zip").write_bytes(damaged)
        try:
            with Payload(tmp_path / "bad.zip") as payload:
                check_payload(tmp_path / "bad.zip")
                assert payload.partitions
        except PayloadError:
            pass
