"""The native certificate path (edgeproxy/edge/tlsnative.py): every key encoding we
may hold is served with its whole chain, a client that verifies against the root
accepts it, bad material is refused with a clear error and leaves OpenSSL's error
queue clean, and the path turns itself off where its checks fail."""

from __future__ import annotations

import datetime as dt
import gc
import ssl
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from edgeproxy.edge import tlsnative
from edgeproxy.edge.certstore import CertStore, build_context, load_native, make_fallback_pair
from edgeproxy.storage.sqlite import SqliteStorage

NOW = dt.datetime.now(dt.timezone.utc)
Key = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key: Key, issuer: str, issuer_key: Key, ca: bool) -> x509.Certificate:
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(NOW - dt.timedelta(days=1)).not_valid_after(NOW + dt.timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


ROOT_KEY = ec.generate_private_key(ec.SECP256R1())
ROOT = _cert("native test root", ROOT_KEY, "native test root", ROOT_KEY, ca=True)
INTER_KEY = ec.generate_private_key(ec.SECP256R1())
INTER = _cert("native test intermediate", INTER_KEY, "native test root", ROOT_KEY, ca=True)
INTER_PEM = INTER.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def native() -> tlsnative.NativeTLS:
    found = load_native()
    assert found is not None, "the native path must load on this machine (CPython + its own OpenSSL)"
    assert found.ec_keys  # OpenSSL 3.0 still ships EC_KEY: the fast path for EC keys is the one tested
    return found


def _leaf(host: str, key: Key) -> x509.Certificate:
    return _cert(host, key, "native test intermediate", INTER_KEY, ca=False)


def _serve(native: tlsnative.NativeTLS, cert: tlsnative.Certificate, host: str,
           client: ssl.SSLContext | None = None) -> bytes | None:
    """Handshake in memory on a listener holding another (fallback) certificate,
    installing ``cert`` from the SNI callback; the leaf DER the client received.
    The default client verifies the chain against ROOT: it needs the intermediate."""
    chain, key = make_fallback_pair(NOW)
    server = build_context(chain, key)
    server.sni_callback = lambda obj, _name, _ctx: native.install(obj, cert)
    if client is None:
        client = ssl.create_default_context(cadata=ROOT.public_bytes(serialization.Encoding.PEM).decode())
    return tlsnative.handshake(server, client, host)


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


KEYS = {
    "ec-p256-pkcs8": (lambda: ec.generate_private_key(ec.SECP256R1()), serialization.PrivateFormat.PKCS8),
    "ec-p256-sec1": (lambda: ec.generate_private_key(ec.SECP256R1()), serialization.PrivateFormat.TraditionalOpenSSL),
    "ec-p384-pkcs8": (lambda: ec.generate_private_key(ec.SECP384R1()), serialization.PrivateFormat.PKCS8),
    "rsa-pkcs8": (lambda: rsa.generate_private_key(65537, 2048), serialization.PrivateFormat.PKCS8),
    "rsa-pkcs1": (lambda: rsa.generate_private_key(65537, 2048), serialization.PrivateFormat.TraditionalOpenSSL),
}


@pytest.mark.parametrize("keyless", [True, False], ids=["keyless-leaf", "general-path"])
@pytest.mark.parametrize("kind", list(KEYS))
def test_each_key_encoding_is_served_with_a_chain_that_verifies(native: tlsnative.NativeTLS, kind: str,
                                                                keyless: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not keyless:  # as on an OpenSSL without library contexts: every leaf decodes its own key
        monkeypatch.setattr(native, "_keyless", None)
    make_key, fmt = KEYS[kind]
    key = make_key()
    leaf = _leaf(f"{kind}.example.test", key)
    key_der = key.private_bytes(serialization.Encoding.DER, fmt, serialization.NoEncryption())
    cert = native.certificate(_der(leaf), key_der, False, native.chain(INTER_PEM))
    # create_default_context checks the name and the chain up to ROOT: the leaf
    # alone (no intermediate) or the fallback would fail the handshake.
    assert _serve(native, cert, f"{kind}.example.test") == _der(leaf)


@pytest.mark.parametrize("kind", [k for k in KEYS if k.startswith("ec-")])
def test_ec_leaves_are_parsed_without_decoding_their_key_and_sign_under_tls_1_2_and_1_3(
        native: tlsnative.NativeTLS, kind: str) -> None:
    """The fast path: the leaf's public key is the private key we parsed (no decoder
    set-up), the bytes served are the issued ones, and our copy of OpenSSL's EC
    method signs the handshake in both TLS versions (a verifying client checks it)."""
    make_key, fmt = KEYS[kind]
    key = make_key()
    leaf = _leaf(f"fast-{kind}.example.test", key)
    key_der = key.private_bytes(serialization.Encoding.DER, fmt, serialization.NoEncryption())
    assert native._keyless is not None
    fast = native._leaf_from_key(_der(leaf), key_der)
    assert fast is not None
    x509_ptr, pkey = fast
    assert native.lib.X509_get0_pubkey(x509_ptr) == pkey  # set from the private key, not decoded
    tlsnative.Certificate(x509_ptr, pkey, native.chain(b""), native.lib)  # frees both
    cert = native.certificate(_der(leaf), key_der, False, native.chain(INTER_PEM))
    assert native.lib.X509_get0_pubkey(cert.x509) == cert.pkey
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        client = ssl.create_default_context(cadata=ROOT.public_bytes(serialization.Encoding.PEM).decode())
        client.minimum_version = client.maximum_version = version
        if version is ssl.TLSVersion.TLSv1_2:
            client.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")  # the server must sign with the host key
        assert _serve(native, cert, f"fast-{kind}.example.test", client) == _der(leaf)


def test_the_keyless_parse_refuses_a_key_that_does_not_match(native: tlsnative.NativeTLS) -> None:
    """Another key on the same curve, and a key on another curve:
    never taken as the leaf's key (the general path then reports the mismatch)."""
    leaf = _der(_leaf("other-key.example.test", ec.generate_private_key(ec.SECP256R1())))
    for other in (ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP384R1())):
        key_der = other.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())
        native.lib.ERR_set_mark()
        try:
            assert native._leaf_from_key(leaf, key_der) is None
        finally:
            native.lib.ERR_pop_to_mark()


def test_a_key_kept_as_pem_is_parsed_as_pem(native: tlsnative.NativeTLS) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = _leaf("pem.example.test", key)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    cert = native.certificate(_der(leaf), key_pem, True, native.chain(INTER_PEM))
    assert _serve(native, cert, "pem.example.test") == _der(leaf)


def test_an_rsa_certificate_replaces_the_ec_fallback_for_every_client(native: tlsnative.NativeTLS) -> None:
    """The listener's fallback key is EC; a client that prefers ECDSA would get the
    fallback if it were left beside the host's RSA certificate."""
    key = rsa.generate_private_key(65537, 2048)
    leaf = _leaf("rsa.example.test", key)
    key_der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    cert = native.certificate(_der(leaf), key_der, False, native.chain(INTER_PEM))
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
        client.minimum_version = client.maximum_version = version
        if version is ssl.TLSVersion.TLSv1_2:
            client.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256")
        assert _serve(native, cert, "rsa.example.test", client) == _der(leaf)


def test_a_certificate_dropped_by_the_cache_stays_valid_on_its_connection(native: tlsnative.NativeTLS) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = _leaf("evicted.example.test", key)
    key_der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    chain, fallback_key = make_fallback_pair(NOW)
    server = build_context(chain, fallback_key)

    def install_and_forget(obj: Any, _name: str | None, _ctx: ssl.SSLContext) -> None:
        cert = native.certificate(_der(leaf), key_der, False, native.chain(INTER_PEM))
        native.install(obj, cert)
        del cert  # the only Python reference: freed now, mid-handshake
        gc.collect()

    server.sni_callback = install_and_forget
    client = ssl.create_default_context(cadata=ROOT.public_bytes(serialization.Encoding.PEM).decode())
    assert tlsnative.handshake(server, client, "evicted.example.test") == _der(leaf)


def test_bad_material_gets_a_clear_error_and_leaves_no_openssl_errors(native: tlsnative.NativeTLS) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = _der(_leaf("bad.example.test", key))
    key_der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    chain = native.chain(INTER_PEM)
    with pytest.raises(tlsnative.NativeError, match="cannot parse the leaf certificate"):
        native.certificate(b"\x30\x03garbage", key_der, False, chain)
    with pytest.raises(tlsnative.NativeError, match="cannot parse the private key"):
        native.certificate(leaf, b"\x30\x03garbage", False, chain)
    with pytest.raises(tlsnative.NativeError, match="cannot parse the private key"):
        native.certificate(leaf, b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", True, chain)
    broken = INTER_PEM + b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    with pytest.raises(tlsnative.NativeError, match="certificate OpenSSL cannot read"):
        native.chain(broken)
    assert native.lib.ERR_peek_last_error() == 0  # nothing left for the next TLS operation to trip on


def test_a_key_that_does_not_match_is_refused_at_install(native: tlsnative.NativeTLS) -> None:
    leaf = _leaf("mismatch.example.test", ec.generate_private_key(ec.SECP256R1()))
    other = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    cert = native.certificate(_der(leaf), other, False, native.chain(INTER_PEM))
    errors: list[Exception] = []
    chain, key = make_fallback_pair(NOW)
    server = build_context(chain, key)

    def install(obj: Any, _name: str | None, _ctx: ssl.SSLContext) -> None:
        try:
            native.install(obj, cert)
        except tlsnative.NativeError as exc:
            errors.append(exc)

    server.sni_callback = install
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    with pytest.raises(ssl.SSLError):  # no certificate left to serve: the handshake fails, nothing wrong is served
        tlsnative.handshake(server, client, "mismatch.example.test")
    assert len(errors) == 1 and "does not match" in str(errors[0])


def test_the_path_turns_itself_off_when_its_checks_fail(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(tlsnative, "_SOCKET_CONTEXT", tlsnative._SOCKET_CONTEXT + 8)  # another CPython layout
    assert load_native() is None
    assert "laid out differently" in caplog.text
    monkeypatch.undo()
    monkeypatch.setattr(ssl, "OPENSSL_VERSION_NUMBER", ssl.OPENSSL_VERSION_NUMBER + 1)  # another OpenSSL
    assert load_native() is None
    assert "another OpenSSL" in caplog.text
    # The CertStore then builds contexts, and still serves the right certificate.
    storage = SqliteStorage(str(tmp_path / "edge.db"))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = _leaf("off.example.test", key)
    storage.add_domain("off.example.test", "active", NOW)
    store = CertStore(storage, native=True)
    assert store.native is None
    store.save("off.example.test", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()),
               leaf.public_bytes(serialization.Encoding.PEM) + INTER_PEM, NOW)
    assert isinstance(store.certificate_for("off.example.test"), ssl.SSLContext)
    client = ssl.create_default_context(cadata=ROOT.public_bytes(serialization.Encoding.PEM).decode())
    assert tlsnative.handshake(store.server_context(), client, "off.example.test") == _der(leaf)


def test_the_default_is_the_public_api_path_and_config_opts_in_to_native(tmp_path: Any) -> None:
    from edgeproxy.config import load_settings
    storage = SqliteStorage(str(tmp_path / "edge.db"))
    assert CertStore(storage).native is None
    assert CertStore(storage, native=True).native is not None
    config = tmp_path / "edge.toml"
    config.write_text("")
    assert load_settings(str(config)).proxy.tls_native is False
    config.write_text("[proxy]\ntls_native = true\n")
    assert load_settings(str(config)).proxy.tls_native is True
