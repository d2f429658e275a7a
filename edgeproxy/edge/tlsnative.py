"""A host's certificate set on one TLS connection, through the libssl of Python's ``ssl``.

Why: with 100,000 names, most new handshakes ask for a name that no
bounded cache still holds. Python's ``ssl`` can serve such a name only by
building an ``SSLContext``, and ``load_cert_chain`` parses PEM files through
OpenSSL 3.0's decoder framework: ~0.65 ms per build on the bench machine
(SSL_CTX_new 0.09 ms, leaf 0.10, intermediate 0.10, private key 0.31). This
module parses the leaf and the key from the DER bytes the CertStore already
holds with OpenSSL's direct ``d2i_*`` functions, parses each distinct
intermediate chain once, and installs the three on the connection's own ``SSL``
object from the SNI callback (``SSL_use_certificate``, as servers that pick
certificates per connection do). No ``SSLContext`` is built per host.

For EC keys (what our ACME client issues) a miss costs ~0.03 ms: the key is
parsed with the EC_KEY functions, the leaf without decoding its own public key
(``_keyless_context``; the private key's public half, checked against the
leaf's, takes its place), and the key carries a copy of OpenSSL's EC method so
that signing does not first copy it into a provider. Other keys, and leaves
that do not match their key, take the general path (~0.12 ms).

How: ctypes calls into the very libssl that CPython's ``_ssl`` module is linked
against (symbols are looked up through ``_ssl``'s own handle, so a second OpenSSL
in the process, such as the one inside ``cryptography``, is never used), and the
``SSL *`` is read from CPython's ``_ssl._SSLSocket`` object. That layout is a
CPython detail, so ``load()`` checks it against values it can read in two
independent ways, then runs a full in-memory handshake; if anything disagrees it
returns None and the CertStore keeps building contexts with ``load_cert_chain``.

Opt-in only (``proxy.tls_native = true``; the default is ``false``): this module
relies on CPython's private object layout and on raw pointers, in the process that
holds every private key, so a mistake here is a crash or memory corruption, not
an exception. The default path uses Python's public ``ssl`` API alone.

Ownership: a ``Certificate`` or ``Chain`` owns its OpenSSL objects and frees them
when the last Python reference goes. ``SSL_use_certificate``,
``SSL_use_PrivateKey`` and ``SSL_add1_chain_cert`` take their own references, so
a connection keeps its certificate even after the cache has dropped it.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import logging
import ssl
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["Certificate", "Chain", "NativeError", "NativeTLS", "load"]

log = logging.getLogger("edgeproxy.tlsnative")

_P = ctypes.c_void_p
_SSL_CTRL_CHAIN_CERT = 89  # SSL_add1_chain_cert(s, x) is SSL_ctrl(s, SSL_CTRL_CHAIN_CERT, 1, x)
_EVP_PKEY_EC = 408  # NID_X9_62_id_ecPublicKey
_V_ASN1_OBJECT = 6
_PTR = ctypes.sizeof(ctypes.c_void_p)
# CPython's _ssl.c: PySSLContext is {PyObject_HEAD; SSL_CTX *ctx; ...} and
# PySSLSocket is {PyObject_HEAD; PyObject *Socket; SSL *ssl; PySSLContext *ctx; ...}.
_HEAD = 2 * _PTR
_CONTEXT_CTX = _HEAD
_SOCKET_SSL = _HEAD + _PTR
_SOCKET_CONTEXT = _HEAD + 2 * _PTR


def _encoded(i2d: Callable[..., int], obj: int | None) -> bytes | None:
    """What an OpenSSL ``i2d_*`` function writes for ``obj`` (None if it cannot)."""
    size = i2d(obj, None) if obj else -1
    if size <= 0:
        return None
    out = ctypes.create_string_buffer(size)
    i2d(obj, ctypes.byref(ctypes.c_char_p(ctypes.addressof(out))))
    return out.raw


class NativeError(Exception):
    """OpenSSL refused a certificate, a key or an install; the message says which."""


def _word(address: int) -> int:
    return ctypes.c_void_p.from_address(address).value or 0


class Chain:
    """The parsed intermediates of one CA chain, shared by every host it issued."""

    __slots__ = ("certs", "_free")

    def __init__(self, certs: tuple[int, ...], free: Callable[[int], None]) -> None:
        self.certs = certs
        self._free = free

    def __del__(self) -> None:
        for cert in self.certs:
            self._free(cert)


class Certificate:
    """A host's parsed leaf (``X509 *``) and private key (``EVP_PKEY *``) and its chain."""

    __slots__ = ("x509", "pkey", "chain", "_lib")

    def __init__(self, x509: int, pkey: int, chain: Chain, lib: Any) -> None:
        self.x509, self.pkey, self.chain, self._lib = x509, pkey, chain, lib

    def __del__(self) -> None:
        self._lib.X509_free(self.x509)
        self._lib.EVP_PKEY_free(self.pkey)


class NativeTLS:
    """The libssl functions we call, bound to the library ``_ssl`` uses."""

    def __init__(self, lib: Any) -> None:
        self.lib = lib
        signatures: dict[str, tuple[Any, list[Any]]] = {
            "OpenSSL_version_num": (ctypes.c_ulong, []),
            "ERR_peek_last_error": (ctypes.c_ulong, []),
            "ERR_error_string_n": (None, [ctypes.c_ulong, ctypes.c_char_p, ctypes.c_size_t]),
            "ERR_set_mark": (ctypes.c_int, []),
            "ERR_pop_to_mark": (ctypes.c_int, []),
            "d2i_X509": (_P, [_P, ctypes.POINTER(ctypes.c_char_p), ctypes.c_long]),
            "X509_free": (None, [_P]),
            "X509_get0_pubkey": (_P, [_P]),
            "EVP_PKEY_get_base_id": (ctypes.c_int, [_P]),
            "d2i_PrivateKey": (_P, [ctypes.c_int, _P, ctypes.POINTER(ctypes.c_char_p), ctypes.c_long]),
            "d2i_AutoPrivateKey": (_P, [_P, ctypes.POINTER(ctypes.c_char_p), ctypes.c_long]),
            "EVP_PKEY_free": (None, [_P]),
            "BIO_new_mem_buf": (_P, [ctypes.c_char_p, ctypes.c_int]),
            "BIO_free": (ctypes.c_int, [_P]),
            "PEM_read_bio_X509": (_P, [_P, _P, _P, _P]),
            "PEM_read_bio_PrivateKey": (_P, [_P, _P, _P, _P]),
            "SSL_certs_clear": (None, [_P]),
            "SSL_use_certificate": (ctypes.c_int, [_P, _P]),
            "SSL_use_PrivateKey": (ctypes.c_int, [_P, _P]),
            "SSL_ctrl": (ctypes.c_long, [_P, ctypes.c_int, ctypes.c_long, _P]),
            "SSL_get_SSL_CTX": (_P, [_P]),
            "SSL_CTX_get_options": (ctypes.c_uint64, [_P]),
        }
        for name, (restype, argtypes) in signatures.items():
            fn = getattr(lib, name)  # AttributeError: this OpenSSL lacks it (load() catches)
            fn.restype, fn.argtypes = restype, argtypes
        # EC keys through OpenSSL's EC_KEY functions (deprecated in 3.0, still
        # shipped): 14 us a key instead of d2i_PrivateKey's 90, which runs the
        # decoder framework first. Without them, every key takes d2i_PrivateKey.
        ec_signatures: dict[str, tuple[Any, list[Any]]] = {
            "d2i_PKCS8_PRIV_KEY_INFO": (_P, [_P, ctypes.POINTER(ctypes.c_char_p), ctypes.c_long]),
            "PKCS8_PRIV_KEY_INFO_free": (None, [_P]),
            "PKCS8_pkey_get0": (ctypes.c_int, [ctypes.POINTER(_P), ctypes.POINTER(_P), ctypes.POINTER(ctypes.c_int),
                                               ctypes.POINTER(_P), _P]),
            "X509_ALGOR_get0": (None, [ctypes.POINTER(_P), ctypes.POINTER(ctypes.c_int), ctypes.POINTER(_P), _P]),
            "OBJ_obj2nid": (ctypes.c_int, [_P]),
            "EC_KEY_new": (_P, []),
            "EC_KEY_set_group": (ctypes.c_int, [_P, _P]),
            "EC_GROUP_new_by_curve_name": (_P, [ctypes.c_int]),
            "EC_KEY_OpenSSL": (_P, []),
            "EC_KEY_METHOD_new": (_P, [_P]),
            "EC_KEY_set_method": (ctypes.c_int, [_P, _P]),
            "d2i_ECPrivateKey": (_P, [ctypes.POINTER(_P), ctypes.POINTER(ctypes.c_char_p), ctypes.c_long]),
            "EC_KEY_free": (None, [_P]),
            "EVP_PKEY_new": (_P, []),
            "EVP_PKEY_assign": (ctypes.c_int, [_P, ctypes.c_int, _P]),
        }
        try:
            for name, (restype, argtypes) in ec_signatures.items():
                fn = getattr(lib, name)
                fn.restype, fn.argtypes = restype, argtypes
            # A copy of OpenSSL's own EC_KEY_METHOD, on every EC key we parse:
            # OpenSSL 3.0 then signs with the key as it is (the same ECDSA code)
            # instead of first copying it into the provider (~17 us at the first
            # handshake of every key, so at every cache miss). The copy lives as
            # long as the process.
            self._ec_method = int(lib.EC_KEY_METHOD_new(lib.EC_KEY_OpenSSL()) or 0)
            self.ec_keys = bool(self._ec_method)
        except AttributeError:
            self.ec_keys = False
        self._groups: dict[int, int] = {}  # curve NID -> EC_GROUP, built once (8 us), copied into each key (1 us)
        self._keyless = self._keyless_context() if self.ec_keys else None

    def _keyless_context(self) -> int | None:
        """A library context holding only OpenSSL's "null" provider, or None.

        ``d2i_X509`` decodes the leaf's public key as it parses, and in OpenSSL
        3.0 that means setting up a decoder context each time: ~85 us of the
        ~95 a leaf costs (openssl/openssl#15199; cached only since 3.2). A
        leaf created in this context fails that decode at once and is parsed
        without its key, as OpenSSL parses any key type it does not know;
        ``_leaf_from_key`` then sets the key from the private key we hold.
        """
        signatures: dict[str, tuple[Any, list[Any]]] = {
            "OSSL_LIB_CTX_new": (_P, []),
            "OSSL_PROVIDER_load": (_P, [_P, ctypes.c_char_p]),
            "X509_new_ex": (_P, [_P, ctypes.c_char_p]),
            "X509_set_pubkey": (ctypes.c_int, [_P, _P]),
            "i2d_X509": (ctypes.c_int, [_P, ctypes.POINTER(ctypes.c_char_p)]),
            "X509_get_X509_PUBKEY": (_P, [_P]),
            "i2d_X509_PUBKEY": (ctypes.c_int, [_P, ctypes.POINTER(ctypes.c_char_p)]),
        }
        try:
            for name, (restype, argtypes) in signatures.items():
                fn = getattr(self.lib, name)
                fn.restype, fn.argtypes = restype, argtypes
        except AttributeError:  # before OpenSSL 3.0: no library contexts, and no decoder cost either
            return None
        context = self.lib.OSSL_LIB_CTX_new()
        # Loading "null" also stops OpenSSL from loading the default provider
        # into this context on first use. The context lives as long as the process.
        if not context or not self.lib.OSSL_PROVIDER_load(context, b"null"):
            return None
        return int(context)

    def _error(self, what: str) -> NativeError:
        """``what`` and OpenSSL's reason. Every public method sets an error-queue
        mark first and pops back to it at the end, so that nothing we leave there
        is mistaken for an error of the connection's own later operations."""
        code = self.lib.ERR_peek_last_error()
        if not code:
            return NativeError(what)
        buf = ctypes.create_string_buffer(256)
        self.lib.ERR_error_string_n(code, buf, len(buf))
        return NativeError(f"{what}: {buf.value.decode(errors='replace')}")

    # -- parsing (at a cache miss) ---------------------------------------------------
    def chain(self, pem: bytes) -> Chain:
        """Every certificate in ``pem`` (the intermediates after the leaf), in order."""
        certs: list[int] = []
        self.lib.ERR_set_mark()
        try:
            if pem.strip():
                bio = self.lib.BIO_new_mem_buf(pem, len(pem))
                if not bio:
                    raise self._error("cannot read the chain")
                try:
                    while cert := self.lib.PEM_read_bio_X509(bio, None, None, None):
                        certs.append(cert)
                finally:
                    self.lib.BIO_free(bio)
        finally:
            self.lib.ERR_pop_to_mark()  # also the "no start line" that ends every read
        chain = Chain(tuple(certs), self.lib.X509_free)
        if pem.count(b"-----BEGIN CERTIFICATE-----") != len(certs):
            raise NativeError("the chain holds a certificate OpenSSL cannot read")
        return chain

    def certificate(self, leaf_der: bytes, key: bytes, key_is_pem: bool, chain: Chain) -> Certificate:
        """Parse a leaf (DER) and its private key (DER, or PEM when ``key_is_pem``)."""
        self.lib.ERR_set_mark()
        try:
            if self._keyless is not None and not key_is_pem:
                fast = self._leaf_from_key(leaf_der, key)
                if fast is not None:
                    return Certificate(fast[0], fast[1], chain, self.lib)
            p = ctypes.c_char_p(leaf_der)
            x509 = self.lib.d2i_X509(None, ctypes.byref(p), len(leaf_der))
            if not x509:
                raise self._error("cannot parse the leaf certificate")
            try:
                pkey = self._private_key(key, key_is_pem, self.lib.X509_get0_pubkey(x509))
            except BaseException:
                self.lib.X509_free(x509)
                raise
        finally:
            self.lib.ERR_pop_to_mark()
        return Certificate(x509, pkey, chain, self.lib)

    def _leaf_from_key(self, leaf_der: bytes, key: bytes) -> tuple[int, int] | None:
        """(X509, EVP_PKEY) for an EC key without decoding the leaf's own key, or None.

        The leaf is parsed in the keyless context and the private key becomes
        its public key, kept only if the SubjectPublicKeyInfo it encodes to is
        byte for byte the one the leaf was issued with (so the key matches the
        certificate). The leaf keeps the encoding it was parsed from, so
        clients get exactly what the CA signed; the last check makes sure of
        that too. Anything else (another key type, a key that does not match)
        returns None and takes the general path, which explains the failure.
        """
        lib = self.lib
        pkey = self._ec_private_key(key)  # a keyless context exists only with the EC functions
        if not pkey:
            return None
        x509 = _P(lib.X509_new_ex(self._keyless, None))
        p = ctypes.c_char_p(leaf_der)
        if x509 and lib.d2i_X509(ctypes.byref(x509), ctypes.byref(p), len(leaf_der)):
            issued = _encoded(lib.i2d_X509_PUBKEY, lib.X509_get_X509_PUBKEY(x509))
            if issued is not None and lib.X509_set_pubkey(x509, pkey) == 1 \
                    and _encoded(lib.i2d_X509_PUBKEY, lib.X509_get_X509_PUBKEY(x509)) == issued \
                    and _encoded(lib.i2d_X509, x509.value) == leaf_der:  # X509_set_pubkey took its own reference
                return int(x509.value or 0), pkey
        lib.X509_free(x509)  # NULL (a no-op) when d2i_X509 failed: it frees the object itself then
        lib.EVP_PKEY_free(pkey)
        return None

    def _private_key(self, key: bytes, key_is_pem: bool, public: int) -> int:
        if key_is_pem:
            bio = self.lib.BIO_new_mem_buf(key, len(key))
            pkey = self.lib.PEM_read_bio_PrivateKey(bio, None, None, None) if bio else None
            if bio:
                self.lib.BIO_free(bio)
        else:
            # Naming the key type (the leaf's) takes OpenSSL's direct decoder; the
            # generic one tries every format and is 3x slower in OpenSSL 3.0.
            kind = self.lib.EVP_PKEY_get_base_id(public) if public else 0
            pkey = self._ec_private_key(key) if kind == _EVP_PKEY_EC and self.ec_keys else None
            if not pkey and kind:
                p = ctypes.c_char_p(key)
                pkey = self.lib.d2i_PrivateKey(kind, None, ctypes.byref(p), len(key))
            if not pkey:
                p = ctypes.c_char_p(key)
                pkey = self.lib.d2i_AutoPrivateKey(None, ctypes.byref(p), len(key))
        if not pkey:
            raise self._error("cannot parse the private key")
        return int(pkey)

    def _ec_private_key(self, der: bytes) -> int | None:
        """An EC key from PKCS#8 (curve in the algorithm's parameters) or SEC1 DER, or None."""
        lib = self.lib
        p = ctypes.c_char_p(der)
        info = lib.d2i_PKCS8_PRIV_KEY_INFO(None, ctypes.byref(p), len(der))
        if not info:  # not PKCS#8: SEC1 ("EC PRIVATE KEY"), which names its curve itself
            eckey = self._ec_key(None)
            p = ctypes.c_char_p(der)
            if eckey and not lib.d2i_ECPrivateKey(ctypes.byref(eckey), ctypes.byref(p), len(der)):
                lib.EC_KEY_free(eckey)  # a key passed in is ours to free on failure
                return None
        else:
            try:
                algorithm, inner, inner_len, params = _P(), _P(), ctypes.c_int(), _P()
                if lib.PKCS8_pkey_get0(ctypes.byref(algorithm), ctypes.byref(inner), ctypes.byref(inner_len),
                                       ctypes.byref(params), info) != 1 or lib.OBJ_obj2nid(algorithm) != _EVP_PKEY_EC:
                    return None
                param_type, curve = ctypes.c_int(), _P()
                lib.X509_ALGOR_get0(None, ctypes.byref(param_type), ctypes.byref(curve), params)
                if param_type.value != _V_ASN1_OBJECT:
                    return None  # explicit curve parameters: leave them to d2i_PrivateKey
                eckey = self._ec_key(lib.OBJ_obj2nid(curve))
                q = ctypes.c_char_p(inner.value)  # points into info, which lives until the finally
                if eckey and not lib.d2i_ECPrivateKey(ctypes.byref(eckey), ctypes.byref(q), inner_len.value):
                    lib.EC_KEY_free(eckey)
                    return None
            finally:
                lib.PKCS8_PRIV_KEY_INFO_free(info)
        if not eckey:
            return None
        pkey = lib.EVP_PKEY_new()
        if not pkey or lib.EVP_PKEY_assign(pkey, _EVP_PKEY_EC, eckey) != 1:  # takes eckey on success
            lib.EC_KEY_free(eckey)
            lib.EVP_PKEY_free(pkey)
            return None
        return int(pkey)

    def _ec_key(self, curve: int | None) -> ctypes.c_void_p:
        """An empty EC_KEY with our method, on the named curve (else d2i sets it from the DER)."""
        lib = self.lib
        eckey = _P(lib.EC_KEY_new())
        if not eckey:
            return eckey
        if lib.EC_KEY_set_method(eckey, self._ec_method) != 1:
            lib.EC_KEY_free(eckey)
            return _P()
        if curve is not None:
            group = self._groups.get(curve)
            if group is None:
                group = self._groups[curve] = int(lib.EC_GROUP_new_by_curve_name(curve) or 0)
            if not group or lib.EC_KEY_set_group(eckey, group) != 1:  # copies the group
                lib.EC_KEY_free(eckey)
                return _P()
        return eckey

    # -- the handshake path ----------------------------------------------------------
    @staticmethod
    def ssl_pointer(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> int:
        """The ``SSL *`` under a Python SSL object (layout checked by ``load()``)."""
        return _word(id(ssl_object._sslobj) + _SOCKET_SSL)  # type: ignore[union-attr]

    def install(self, ssl_object: ssl.SSLObject | ssl.SSLSocket, cert: Certificate) -> None:
        """Serve ``cert`` on this connection instead of the listener's fallback.

        The fallback's certificate and key are removed first: otherwise a client
        whose signature algorithms suit only the fallback's key type would get it.
        """
        ssl_ptr = self.ssl_pointer(ssl_object)
        lib = self.lib
        lib.ERR_set_mark()
        try:
            lib.SSL_certs_clear(ssl_ptr)
            if lib.SSL_use_certificate(ssl_ptr, cert.x509) != 1:
                raise self._error("SSL_use_certificate failed")
            if lib.SSL_use_PrivateKey(ssl_ptr, cert.pkey) != 1:
                raise self._error("the private key does not match the certificate")
            for extra in cert.chain.certs:
                if lib.SSL_ctrl(ssl_ptr, _SSL_CTRL_CHAIN_CERT, 1, extra) != 1:
                    raise self._error("cannot add the chain certificate")
        finally:
            lib.ERR_pop_to_mark()


def _library() -> Any:
    """The library that defines ``_ssl``'s OpenSSL symbols (its own handle, then the process)."""
    import _ssl

    path = getattr(_ssl, "__file__", None)
    return ctypes.CDLL(path) if path else ctypes.CDLL(None)


def _layout_ok(native: NativeTLS) -> bool:
    """Whether CPython's objects are laid out as the offsets above assume.

    Each check compares a word read at an assumed offset with the same value
    obtained another way, so a different layout fails here, not in a handshake.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.options |= ssl.OP_NO_TICKET  # a distinctive options word to compare
    obj = ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)
    sock = obj._sslobj  # type: ignore[attr-defined]
    if _word(id(sock) + _PTR) != id(type(sock)) or _word(id(ctx) + _PTR) != id(type(ctx)):
        return False  # PyObject_HEAD is not (refcount, type)
    if _word(id(sock) + _SOCKET_CONTEXT) != id(sock.context):
        return False
    ctx_ptr = _word(id(ctx) + _CONTEXT_CTX)
    if native.lib.SSL_CTX_get_options(ctx_ptr) != int(ctx.options):
        return False
    return bool(native.lib.SSL_get_SSL_CTX(native.ssl_pointer(obj)) == ctx_ptr)


ContextFor = Callable[[bytes, bytes], ssl.SSLContext]
"""``context_for(chain_pem, key_pem)``: a server context as the certstore builds it."""
PairAt = Callable[[dt.datetime], tuple[bytes, bytes]]
"""``pair_at(now)``: a throwaway self-signed (chain PEM, key PEM)."""


def load(context_for: ContextFor, pair_at: PairAt) -> NativeTLS | None:
    """The native path, or None (logged) when this interpreter or OpenSSL does not allow it.

    The self-test serves a throwaway certificate through ``install`` from a context
    built by ``context_for`` (the certstore's own builder, passed in: this module
    does not import the certstore)."""
    if sys.implementation.name != "cpython":
        return None
    try:
        native = NativeTLS(_library())
        if native.lib.OpenSSL_version_num() != ssl.OPENSSL_VERSION_NUMBER:
            log.warning("native TLS path off: ctypes found another OpenSSL than Python's ssl module")
            return None
        if not _layout_ok(native):
            log.warning("native TLS path off: this CPython's ssl objects are laid out differently")
            return None
        _self_test(native, context_for, pair_at)
    except (OSError, AttributeError, NativeError, ssl.SSLError, AssertionError) as exc:
        log.warning("native TLS path off: %s", exc)
        return None
    return native


def _self_test(native: NativeTLS, context_for: ContextFor, pair_at: PairAt) -> None:
    """A full in-memory handshake served through ``install``; raises unless the client got our cert."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    now = dt.datetime.now(dt.timezone.utc)
    chain_pem, key_pem = pair_at(now)
    leaf = x509.load_pem_x509_certificate(chain_pem)
    key_der = serialization.load_pem_private_key(key_pem, None).private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    cert = native.certificate(leaf.public_bytes(serialization.Encoding.DER), key_der, False, native.chain(b""))
    other_chain, other_key = pair_at(now)
    server_ctx = context_for(other_chain, other_key)  # serves another cert unless install() works
    server_ctx.sni_callback = lambda obj, _name, _ctx: native.install(obj, cert)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    served = handshake(server_ctx, client_ctx, "self-test.invalid")
    if served != leaf.public_bytes(serialization.Encoding.DER):
        raise NativeError("the self-test handshake did not serve the installed certificate")


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_name: str,
              server_bytes: list[bytes] | None = None) -> bytes | None:
    """Run a TLS handshake in memory (no sockets); the DER of the leaf the client received.

    ``server_bytes`` collects what the server sent (under TLS 1.2 its Certificate
    message is in the clear: tests look for the intermediate there)."""
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_name)
    for _ in range(10):
        for side in (client, server):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        sent = s_out.read()
        if server_bytes is not None:
            server_bytes.append(sent)
        c_in.write(sent)
        try:
            client.do_handshake()
            break
        except ssl.SSLWantReadError:
            continue
    return client.getpeercert(binary_form=True)
