"""Field encryption, blind indexes, content envelopes, masking and SM algorithms (issue 8)."""

from __future__ import annotations

import base64
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gmssl_pyx
import pytest
from cryptography.hazmat.primitives import hashes, hmac

from services.shared.protection.envelope import new_content_key, open_content_key, rewrap
from services.shared.protection.fields import BlindIndex, FieldCipher, TamperedCiphertextError
from services.shared.protection.keyring import DataKeyring, KeyringError, KeyringFile, UnknownKeyError, load_or_create
from services.shared.protection.masking import MaskingPolicy, default_policy, mask_name, mask_phone
from services.shared.protection.sm2 import Sm2SigningKey

SUITES = ["aes", "sm"]
NATIONAL_ID = "11010519491231002X"
CONTEXT = "mpi.identifier.value|rec-1"


def _flip(token: str, position: int = -5) -> str:
    prefix, key_id, body = token.split(":", 2)
    raw = bytearray(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    raw[position] ^= 0x01
    return f"{prefix}:{key_id}:{base64.urlsafe_b64encode(bytes(raw)).rstrip(b'=').decode()}"


@pytest.mark.parametrize("suite", SUITES)
def test_field_round_trip_with_chinese_text_and_no_plaintext_in_ciphertext(suite: str) -> None:
    cipher = FieldCipher(DataKeyring.generate(suite))
    for value in [NATIONAL_ID, "13812345678", "北京市东城区东华门街道王府井大街1号", ""]:
        token = cipher.encrypt(value, context=CONTEXT)
        assert value.encode() not in token.encode() or value == ""
        assert cipher.decrypt(token, context=CONTEXT) == value
    # Random nonces: the same value never gives the same ciphertext (no frequency analysis).
    assert cipher.encrypt(NATIONAL_ID, context=CONTEXT) != cipher.encrypt(NATIONAL_ID, context=CONTEXT)


@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize("position", [0, 12, -1, -17])
def test_tampered_ciphertext_is_rejected_not_returned(suite: str, position: int) -> None:
    cipher = FieldCipher(DataKeyring.generate(suite))
    token = cipher.encrypt(NATIONAL_ID, context=CONTEXT)
    with pytest.raises(TamperedCiphertextError):
        cipher.decrypt(_flip(token, position), context=CONTEXT)


@pytest.mark.parametrize("suite", SUITES)
def test_ciphertext_moved_to_another_row_or_column_fails(suite: str) -> None:
    cipher = FieldCipher(DataKeyring.generate(suite))
    token = cipher.encrypt(NATIONAL_ID, context="mpi.identifier.value|rec-1")
    for other in ["mpi.identifier.value|rec-2", "mpi.patient.phone|rec-1"]:
        with pytest.raises(TamperedCiphertextError):
            cipher.decrypt(token, context=other)


@pytest.mark.parametrize("garbage", ["", "plain text", "e1:dk:!!!", "e2:dk-x:AAAA", "e1:x:" + "A" * 10])
def test_values_that_are_not_ciphertexts_are_refused(garbage: str) -> None:
    cipher = FieldCipher(DataKeyring.generate())
    with pytest.raises((TamperedCiphertextError, UnknownKeyError)):
        cipher.decrypt(garbage, context=CONTEXT)


def test_rotation_keeps_old_values_readable_and_marks_them_for_re_encryption() -> None:
    old = DataKeyring.generate("aes")
    token = FieldCipher(old).encrypt(NATIONAL_ID, context=CONTEXT)
    new = old.rotated()
    cipher = FieldCipher(new)
    assert cipher.needs_rotation(token)
    assert cipher.decrypt(token, context=CONTEXT) == NATIONAL_ID
    fresh = cipher.encrypt(NATIONAL_ID, context=CONTEXT)
    assert not cipher.needs_rotation(fresh)
    assert fresh.startswith(cipher.active_prefix())
    # A key is only dropped once nothing uses it; then its ciphertexts are unknown, not garbage.
    with pytest.raises(UnknownKeyError):
        FieldCipher(new.without({old.active.id})).decrypt(token, context=CONTEXT)
    with pytest.raises(KeyringError):
        new.without({new.active.id})


def test_rotation_can_move_the_region_to_the_national_algorithms() -> None:
    keyring = DataKeyring.generate("aes")
    token = FieldCipher(keyring).encrypt("13812345678", context=CONTEXT)
    sm = keyring.rotated("sm")
    assert sm.active.suite.cipher == "SM4-GCM"
    cipher = FieldCipher(sm)
    assert cipher.decrypt(cipher.encrypt(cipher.decrypt(token, context=CONTEXT), context=CONTEXT), context=CONTEXT) == (
        "13812345678"
    )


def test_sm4_gcm_ciphertexts_are_standard_gmssl_reads_them() -> None:
    """Our SM4-GCM (OpenSSL through cryptography) interoperates with GmSSL: same algorithm, same mode."""
    keyring = DataKeyring.generate("sm")
    token = FieldCipher(keyring).encrypt("张伟", context=CONTEXT)
    _, key_id, body = token.split(":", 2)
    raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    nonce, sealed = raw[:12], raw[12:]
    aad = f"e1:{key_id}|{CONTEXT}".encode()
    plain = gmssl_pyx.sm4_gcm_decrypt(keyring.active.material, nonce, aad, sealed[:-16], sealed[-16:])
    assert plain.decode() == "张伟"


@pytest.mark.parametrize("suite", SUITES)
def test_blind_index_is_deterministic_keyed_and_separates_kinds(suite: str) -> None:
    keyring = DataKeyring.generate(suite)
    index = BlindIndex(keyring)
    assert index.digest("national_id", NATIONAL_ID) == index.digest("national_id", NATIONAL_ID)
    assert index.digest("national_id", NATIONAL_ID) != index.digest("phone", NATIONAL_ID)
    assert index.matches("phone", "13812345678", index.digest("phone", "13812345678"))
    assert BlindIndex(DataKeyring.generate(suite)).digest("national_id", NATIONAL_ID) != index.digest(
        "national_id", NATIONAL_ID
    )
    # A rotation keeps the index key: lookups keep working across it.
    assert BlindIndex(keyring.rotated()).digest("phone", "13812345678") == index.digest("phone", "13812345678")
    assert len(index.digest("phone", "1")) == 32


def test_blind_index_under_the_sm_suite_is_hmac_sm3() -> None:
    keyring = DataKeyring.generate("sm")
    expected = gmssl_pyx.sm3_hmac(keyring.index_key.material, b"phone\x0013812345678")[:16].hex()
    assert BlindIndex(keyring).digest("phone", "13812345678") == expected
    mac = hmac.HMAC(keyring.index_key.material, hashes.SM3())
    mac.update(b"phone\x0013812345678")
    assert mac.finalize()[:16].hex() == expected


@pytest.mark.parametrize("suite", SUITES)
def test_content_envelope_round_trip_and_integrity(suite: str) -> None:
    keyring = DataKeyring.generate(suite)
    chunks = [os.urandom(1024), "出院小结：患者恢复良好".encode(), b"</ClinicalDocument>"]
    key = new_content_key(keyring, document_id="doc-1", suite=suite)
    sealed = [key.seal_chunk(i, c, final=i == len(chunks) - 1) for i, c in enumerate(chunks)]
    assert all(c not in s for c, s in zip(chunks, sealed, strict=True))

    reader = open_content_key(keyring, document_id="doc-1", wrapped=key.wrapped)
    assert [reader.open_chunk(i, s, final=i == 2) for i, s in enumerate(sealed)] == chunks
    with pytest.raises(TamperedCiphertextError):  # reordered
        reader.open_chunk(0, sealed[1], final=False)
    with pytest.raises(TamperedCiphertextError):  # cut short: chunk 1 was not the last one
        reader.open_chunk(1, sealed[1], final=True)
    with pytest.raises(TamperedCiphertextError):  # a wrapped key moved to another document
        open_content_key(keyring, document_id="doc-2", wrapped=key.wrapped)


def test_rewrapping_a_document_key_after_rotation_leaves_content_readable() -> None:
    keyring = DataKeyring.generate()
    key = new_content_key(keyring, document_id="doc-1", suite="aes")
    sealed = key.seal_chunk(0, b"content", final=True)
    rotated = keyring.rotated()
    rewrapped = rewrap(rotated, document_id="doc-1", wrapped=key.wrapped)
    survivor = rotated.without({keyring.active.id})
    assert open_content_key(survivor, document_id="doc-1", wrapped=rewrapped).open_chunk(0, sealed, final=True) == (
        b"content"
    )


def test_key_file_is_private_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "data-keys.json"
    keyring = load_or_create(path, environ={})
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_or_create(path, environ={}).active.id == keyring.active.id
    assert "material" not in repr(keyring.active)
    path.chmod(0o644)
    with pytest.raises(KeyringError):
        DataKeyring.load(path)
    inline = load_or_create(tmp_path / "none.json", environ={"HIE_DATA_KEYS": json.dumps(keyring.to_json())})
    assert inline.active.material == keyring.active.material
    with pytest.raises(KeyringError):
        DataKeyring.from_json({"format": "hie-data-keys/1", "active": "x", "keys": []})


def test_processes_starting_together_share_one_key_file(tmp_path: Path) -> None:
    path = tmp_path / "data-keys.json"
    with ThreadPoolExecutor(max_workers=8) as pool:
        keyrings = list(pool.map(lambda _: load_or_create(path, environ={}), range(16)))
    assert len({k.active.id for k in keyrings}) == 1
    assert DataKeyring.load(path).active.id == keyrings[0].active.id
    assert list(tmp_path.iterdir()) == [path]  # no temporary files left behind


def test_running_processes_follow_a_rotation_written_to_the_key_file(tmp_path: Path) -> None:
    path = tmp_path / "data-keys.json"
    keyring = load_or_create(path, environ={})
    follower = FieldCipher(keyring, source=KeyringFile(path, keyring, check_seconds=3600))
    rotated = keyring.rotated()
    rotated.save(path)
    os.utime(path, ns=(1, 1))  # a distinct mtime even on coarse file systems
    token = FieldCipher(rotated).encrypt("13812345678", context=CONTEXT)
    # The follower has not checked the file yet, but meeting the unknown key makes it reload.
    assert follower.decrypt(token, context=CONTEXT) == "13812345678"
    assert follower.keyring.active.id == rotated.active.id


POLICY = default_policy({})
ADDRESS = {
    "province": "北京市",
    "city": "北京市",
    "district": "东城区",
    "street": "王府井大街1号",
    "postcode": "100006",
}


@pytest.mark.parametrize(
    ("role", "purpose", "national_id", "phone", "address", "name", "birth_date"),
    [
        ("doctor", "treatment", "110105********002X", "13812345678", ADDRESS, "张伟", "1949-12-31"),
        ("nurse", "emergency", "110105********002X", "13812345678", ADDRESS, "张伟", "1949-12-31"),
        ("doctor", "operations", "110105********002X", "138****5678", "district", "张伟", "1949-12-31"),
        ("pharmacist", "treatment", "110105********002X", "138****5678", "district", "张伟", "1949-12-31"),
        ("data-steward", "operations", NATIONAL_ID, "13812345678", ADDRESS, "张伟", "1949-12-31"),
        ("auditor", "audit", "110105********002X", "138****5678", "district", "张伟", "1949-12-31"),
        ("doctor", "research", None, None, "city", None, "1949"),
        ("data-steward", "research", None, None, "city", None, "1949"),
        ("technician", "public-health", None, None, "city", None, "1949"),
    ],
)
def test_masking_policy_per_role_and_purpose(
    role: str,
    purpose: str,
    national_id: str | None,
    phone: str | None,
    address: object,
    name: str | None,
    birth_date: str,
) -> None:
    assert POLICY.national_id(NATIONAL_ID, role=role, purpose=purpose) == national_id
    assert POLICY.phone("13812345678", role=role, purpose=purpose) == phone
    assert POLICY.name("张伟", role=role, purpose=purpose) == name
    assert POLICY.birth_date("1949-12-31", role=role, purpose=purpose) == birth_date
    shown = POLICY.address(ADDRESS, role=role, purpose=purpose)
    if address == "district":
        assert shown == {"province": "北京市", "city": "北京市", "district": "东城区"}
    elif address == "city":
        assert shown == {"province": "北京市", "city": "北京市"}
    else:
        assert shown == address


def test_masking_helpers_and_policy_validation() -> None:
    assert mask_phone("138 1234 5678") == "138****5678"
    assert mask_phone("010-6512345") == "******2345"
    assert mask_name("欧阳娜娜") == "欧***"
    assert mask_name("Zhang Wei") == "Z**** W**"
    with pytest.raises(ValueError, match="unconditional default"):
        MaskingPolicy.from_json({"rules": [{"name": "only", "roles": ["doctor"], "fields": {"phone": "clear"}}]})
    with pytest.raises(ValueError, match="cover every field"):
        MaskingPolicy.from_json({"rules": [{"name": "default", "fields": {"phone": "sometimes"}}]})


def test_sm2_signature_round_trip_and_forgery_refused() -> None:
    key = Sm2SigningKey.generate()
    message = "审计检查点 checkpoint 1000".encode()
    signature = key.sign(message)
    assert key.public.verify(message, signature)
    assert not key.public.verify(message + b"!", signature)
    assert not Sm2SigningKey.generate().public.verify(message, signature)
    assert "secret" not in repr(key)
