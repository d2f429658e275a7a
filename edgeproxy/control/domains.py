"""Customer hostnames: normalization, validation and the DNS/CAA pre-check.

Owns: turning whatever a customer typed into the one canonical form that we store,
look up, route on and put in certificates (lowercase IDNA A-labels, no trailing
dot); deciding whether that name may be served at all (no IP literal, no
wildcard, no bare public suffix, no unknown TLD, nothing inside the edge's own
zone); the registered domain (eTLD+1) that rate budgets are keyed on; and, at the
bottom, the DNS/CAA pre-check (dnspython) that runs before every order.
Must not import: ``acme``, ``httpx``, ``hypercorn``.

The hostname half of this module is sans-IO (house rule 2): pure functions, no
network, no cache directory. The only I/O is tldextract reading its bundled
Public Suffix List snapshot from its own package data, once, on first use.

Every rejection raises :class:`~edgeproxy.errors.InvalidHostname` whose ``code``
is a key of :data:`HOSTNAME_ERRORS` and whose message quotes the input safely
(``repr``, truncated: control and bidi characters come out escaped) and says what
to send instead.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import re
import unicodedata
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import NoReturn

import dns.exception
import dns.rdatatype
import dns.resolver
import dns.rrset
import idna
import tldextract

from ..errors import ConfigError, InvalidHostname

__all__ = [
    "HOSTNAME_ERRORS",
    "MAX_HOSTNAME_LENGTH",
    "MAX_LABEL_LENGTH",
    "normalize_hostname",
    "registered_domain",
    "validate_hostname",
    # DNS/CAA pre-check
    "DNS_CAA_FORBIDS",
    "DNS_ELSEWHERE",
    "DNS_MISSING",
    "DNS_OK",
    "DNS_UNAVAILABLE",
    "DnsChecker",
    "DnsVerdict",
    "caa_allows",
    "caa_lookup_names",
    "evaluate_pointing",
]

# RFC 1035 §2.3.4: 63 octets per label, 255 octets per name on the wire. The wire
# form spends one length octet per label plus the root's zero octet, so the text
# form without the trailing dot has at most 253 characters (RFC 2181 §11).
MAX_LABEL_LENGTH = 63
MAX_HOSTNAME_LENGTH = 253
# Inputs longer than this are refused before any Unicode processing: no valid name
# comes close, and it bounds the work an admin request can cause. (idna refuses
# more than 1024 characters too; checking first keeps our own error code.)
_MAX_INPUT_CHARS = 1024

_EXAMPLE = "cdn.shop.example.com"

HOSTNAME_ERRORS: Mapping[str, str] = MappingProxyType(
    {
        "empty": "no hostname was given",
        "too_long": "longer than 253 characters once encoded (RFC 1035 §2.3.4)",
        "label_too_long": "a dot-separated label is longer than 63 characters once encoded (RFC 1035 §2.3.4)",
        "empty_label": "a leading dot, two dots in a row, or more than one trailing dot",
        "whitespace": "contains a space, tab, line break or other whitespace",
        "control_character": "contains a control character such as NUL",
        "invisible_character": "contains an invisible formatting character (zero-width space, soft hyphen, bidi control, ...)",
        "invalid_character": "contains a character that is not allowed in hostnames (only letters, digits, hyphens and dots are)",
        "url": "a URL or path was sent instead of a bare hostname",
        "port": "a port number was sent with the hostname",
        "userinfo": "a user name or e-mail address was sent instead of a hostname",
        "wildcard": "wildcard names cannot be validated over HTTP-01",
        "ip_literal": "an IP address (or a name ending in a number, which browsers treat as one)",
        "bad_hyphen": "a label starts or ends with a hyphen, or has '--' in positions 3-4 without being an xn-- label",
        "invalid_idna": "an internationalized label or xn-- (punycode) label is not valid IDNA2008",
        "single_label": "a single label such as 'localhost' is not a public hostname",
        "public_suffix": "a public suffix such as 'com' or 'co.uk' (or an operator-added suffix) that nobody owns alone",
        "unknown_tld": "the top-level domain is not in the public suffix list",
        "special_use": "a special-use name (.onion, .arpa) that cannot get a publicly trusted certificate",
        "own_zone": "the name is, or is inside, this edge's own zone",
    }
)


# -- messages ----------------------------------------------------------------------------


def _quote(text: str, limit: int = 60) -> str:
    """``repr`` of ``text``, truncated: safe to embed in JSON, logs and terminals.

    repr() escapes every non-printable code point (NUL, newlines, U+202E RIGHT-TO-LEFT
    OVERRIDE, zero-width characters), so a hostile input cannot reorder or hide
    parts of the message around it. Truncate first so no escape is cut in half.
    """
    if len(text) > limit:
        text = text[:limit] + "\u2026"
    return repr(text)


def _describe(char: str, *, show: bool = True) -> str:
    """``"'_' (U+005F LOW LINE)"``; non-printable characters are named, never shown raw."""
    label = f"U+{ord(char):04X}"
    name = unicodedata.name(char, "")
    if name:
        label = f"{label} {name}"
    return f"{char!r} ({label})" if show and char.isprintable() else label


def _error(code: str, message: str) -> InvalidHostname:
    assert code in HOSTNAME_ERRORS, code  # every code is part of the API contract
    return InvalidHostname(message, code=code)


def _instead(suggestion: str | None) -> str:
    if suggestion:
        return f"send {_quote(suggestion)} instead"
    return f"send just the hostname, e.g. {_quote(_EXAMPLE)}"


# Checks a normalized name beyond the syntax (raises InvalidHostname): validate_hostname
# passes its public-suffix and own-zone rules, so that "send X instead" never names an
# X that the same call would refuse ('https://cdn.x.example/' suggests nothing while
# '.example' is not a known TLD, rather than a name that fails with unknown_tld).
_Admit = Callable[[str], object]


def _suggest(candidate: str, admit: _Admit | None) -> str | None:
    """``candidate`` normalized if it is a hostname ``admit`` accepts, else None (for "send X instead")."""
    try:
        name = _normalize(candidate, suggest=False, admit=None)
        if admit is not None:
            admit(name)
        return name
    except InvalidHostname:
        return None


# -- character classes -------------------------------------------------------------------

# U+200C ZERO WIDTH NON-JOINER and U+200D ZERO WIDTH JOINER are format characters
# that IDNA2008 allows in a few scripts (CONTEXTJ, RFC 5892 Appendix A.1/A.2; e.g.
# Persian and Indic names need them). idna enforces those context rules, so they
# go through; every other format character is rejected as invisible.
_IDNA_JOINERS = frozenset("\u200c\u200d")


def _uts46_ignored(char: str) -> bool:
    """True if UTS 46 §4 would silently delete ``char`` (status "ignored").

    That class is soft hyphen, zero-width space, variation selectors, combining
    grapheme joiner, ... A browser drops them, but a name that only looks right
    after invisible characters are removed almost always came from a pasted
    document; we say so instead of guessing.
    """
    try:
        return idna.uts46_remap(char, std3_rules=False) == ""
    except idna.IDNAError:
        return False  # disallowed outright: reported by the full mapping later


def _reject_unprintable(raw: str, admit: _Admit | None) -> None:
    for char in raw:
        category = unicodedata.category(char)
        if char.isspace():
            raise _error(
                "whitespace",
                f"{_quote(raw)} contains whitespace ({_describe(char)}); "
                f"remove spaces, tabs and line breaks and {_instead(_suggest(raw.strip(), admit))}.",
            )
        if category == "Cc":
            raise _error(
                "control_character",
                f"{_quote(raw)} contains the control character {_describe(char)}; send the hostname "
                f"as plain text, e.g. {_quote(_EXAMPLE)}.",
            )
        if category == "Cs":
            raise _error(
                "invalid_character",
                f"{_quote(raw)} contains {_describe(char)}, half of a UTF-16 surrogate pair, which is "
                f"not valid text; {_instead(None)}.",
            )
        if (category == "Cf" and char not in _IDNA_JOINERS) or (not char.isascii() and _uts46_ignored(char)):
            raise _error(
                "invisible_character",
                f"{_quote(raw)} contains the invisible character {_describe(char, show=False)}, probably copied "
                f"from a document; type the hostname again without it.",
            )


# -- IP literals ---------------------------------------------------------------------------

# WHATWG URL Standard, "ends in a number checker" (host parsing): if the last label is
# all digits, or 0x followed by hex digits, browsers parse the whole host as an IPv4
# address, so `127.1`, `0x7f.0.0.1`, `2130706433` and `shop.123` all mean an address (or
# are invalid) to a browser. RFC 1123 §2.1 relies on TLDs being alphabetic for the same
# reason; no TLD in the root zone is numeric.
_NUMERIC_LABEL = re.compile(r"(?:[0-9]+|0x[0-9a-f]*)\Z", re.IGNORECASE)


def _ends_in_number(name: str) -> bool:
    labels = name.split(".")
    if len(labels) > 1 and labels[-1] == "":
        labels.pop()
    return bool(_NUMERIC_LABEL.match(labels[-1]))


def _delimited_ip_literal(raw: str) -> bool:
    """IPv6 in any spelling (RFC 4291 §2.2), bracketed (RFC 3986 §3.2.2), with a zone id
    (RFC 6874, ``%25eth0`` or ``%eth0``) or a port; IPv4 with a port."""
    host = raw
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:  # "192.0.2.1:443", "127.1:80"
        host = host.split(":", 1)[0]
    host = host.split("%", 1)[0]
    if not host:
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return ":" not in host and _ends_in_number(host)
    return True


def _reject_ip_literal(raw: str, name: str) -> NoReturn:
    """``name``: the mapped text when the verdict came from the ends-in-number rule."""
    what = "is an IP address"
    if name:
        try:
            ipaddress.ip_address(name)
        except ValueError:
            what = "ends in a number, so browsers read it as an IP address"
    raise _error(
        "ip_literal",
        f"{_quote(raw)} {what}; "
        f"certificates here are issued for hostnames: point a hostname at the edge "
        f"and send that name, e.g. {_quote(_EXAMPLE)}.",
    )


# -- URL pieces and ASCII punctuation -------------------------------------------------------

_LDH_ASCII = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.")


def _reject_ascii_punctuation(raw: str, admit: _Admit | None) -> None:
    """Reject ASCII outside letters-digits-hyphen-dot (RFC 952, RFC 1123 §2.1), naming
    the usual mistake (a URL, a port, an e-mail address, a wildcard, an underscore)."""
    if all(char in _LDH_ASCII or not char.isascii() for char in raw):
        return
    if "://" in raw or any(char in raw for char in "/\\?#"):
        host: str | None = None
        try:
            host = urllib.parse.urlsplit(raw if "//" in raw else "//" + raw).hostname
        except ValueError:
            pass
        raise _error(
            "url",
            f"{_quote(raw)} is a URL or path, not a hostname; leave out 'https://', slashes and "
            f"anything after them and {_instead(_suggest(host, admit) if host and host != raw else None)}.",
        )
    if "@" in raw:
        raise _error(
            "userinfo",
            f"{_quote(raw)} contains '@'; a hostname has no user name and is not an e-mail "
            f"address: {_instead(_suggest(raw.rsplit('@', 1)[1], admit))}.",
        )
    if raw.count(":") == 1 and re.fullmatch(r"[^:]+:[0-9]*", raw):
        host, _, port = raw.partition(":")
        raise _error(
            "port",
            f"{_quote(raw)} includes a port ({_quote(':' + port)}); the edge always serves ports 80 and "
            f"443 itself, so {_instead(_suggest(host, admit))}.",
        )
    if "*" in raw:
        raise _error(
            "wildcard",
            f"{_quote(raw)} is a wildcard; certificate authorities validate wildcards only over DNS-01 "
            f"(Let's Encrypt refuses HTTP-01 for them) and this edge uses HTTP-01: register each "
            f"hostname separately, e.g. {_quote(_suggest(raw.replace('*', 'www', 1), admit) or _EXAMPLE)}.",
        )
    if "_" in raw:
        raise _error(
            "invalid_character",
            f"{_quote(raw)} contains an underscore; hostnames may not (RFC 952, RFC 1123 §2.1) and "
            f"certificate authorities refuse them: use a hyphen, e.g. "
            f"{_quote(_suggest(raw.replace('_', '-'), admit) or _EXAMPLE)}, after adding that name to your DNS.",
        )
    bad = next(char for char in raw if char.isascii() and char not in _LDH_ASCII)
    raise _error(
        "invalid_character",
        f"{_quote(raw)} contains {_describe(bad)}; hostnames may only contain letters, digits "
        f"and hyphens, separated by dots (RFC 1123 §2.1): {_instead(None)}.",
    )


# -- labels ------------------------------------------------------------------------------------

_ASCII_LABEL = re.compile(r"[a-z0-9-]+\Z")


def _reject_bad_hyphens(raw: str, label: str) -> None:
    if label.startswith("-") or label.endswith("-"):
        raise _error(
            "bad_hyphen",
            f"{_quote(raw)}: the label {_quote(label)} starts or ends with a hyphen, which hostnames "
            f"may not (RFC 952, RFC 1123 §2.1); send the name without that hyphen.",
        )
    if label[2:4] == "--":
        # RFC 5891 §4.2.3.1: "--" in positions 3-4 is reserved for IDNA prefixes such as
        # "xn--"; CAs (Let's Encrypt) reject such labels, so we refuse them up front.
        raise _error(
            "bad_hyphen",
            f"{_quote(raw)}: the label {_quote(label)} has '--' in the third and fourth position, "
            f"which is reserved for internationalized 'xn--' labels (RFC 5891 §4.2.3.1) and refused "
            f"by certificate authorities; send a name without '--' there.",
        )


def _label_too_long(raw: str, label: str, encoded_length: int) -> InvalidHostname:
    return _error(
        "label_too_long",
        f"{_quote(raw)}: the label {_quote(label)} is {encoded_length} characters once encoded; "
        f"DNS allows at most {MAX_LABEL_LENGTH} between dots (RFC 1035 §2.3.4): send a shorter name.",
    )


def _invalid_idna(raw: str, label: str, why: str) -> InvalidHostname:
    return _error(
        "invalid_idna",
        f"{_quote(raw)}: the label {_quote(label)} is not a valid internationalized label ({why}); "
        f"send the name as you would type it in a browser, e.g. {_quote('bücher.example.com')}, "
        f"or its exact xn-- form.",
    )


def _idna_reason(exc: Exception, default: str) -> str:
    if isinstance(exc, idna.IDNABidiError):
        return "it mixes right-to-left and left-to-right text in a way the RFC 5893 bidi rule forbids"
    codepoint = getattr(exc, "codepoint", None)  # recent idna carries it; older ones only a message
    if isinstance(codepoint, int):
        return f"{_describe(chr(codepoint))} is not allowed there (RFC 5892)"
    return default


def _disallowed_character(raw: str, exc: Exception, rule: str) -> InvalidHostname:
    """The error for a code point ``rule`` refuses, naming it when idna says which."""
    codepoint = getattr(exc, "codepoint", None)
    what = _describe(chr(codepoint)) if isinstance(codepoint, int) else "a character"
    return _error("invalid_character",
                  f"{_quote(raw)} contains {what}, which is not allowed in hostnames ({rule}); {_instead(None)}.")


def _a_label(raw: str, label: str) -> str:
    """One mapped label -> its A-label (RFC 5890 §2.3.2.1), validated."""
    if label.isascii():
        if not _ASCII_LABEL.match(label):  # unreachable after STD3 mapping; kept as a guard
            raise _error("invalid_character", f"{_quote(raw)} contains characters hostnames may not; {_instead(None)}.")
        if len(label) > MAX_LABEL_LENGTH:
            raise _label_too_long(raw, label, len(label))
        if label.startswith("xn--"):
            # An A-label must decode to a valid U-label that encodes back to exactly the
            # same A-label (RFC 5891 §5.3-5.4); otherwise it is a "fake A-label" that
            # different software would display or compare differently.
            try:
                u_label = idna.ulabel(label)
                canonical = idna.alabel(u_label).decode("ascii")
            except (UnicodeError, ValueError, IndexError) as exc:
                raise _invalid_idna(raw, label, _idna_reason(exc, "it is not valid punycode (RFC 3492)")) from exc
            if canonical != label:
                raise _invalid_idna(raw, label, f"it is not the canonical encoding, which is {canonical!r}")
            return label
        _reject_bad_hyphens(raw, label)
        return label
    # A U-label (RFC 5890 §2.3.2.1): check what we can name precisely ourselves first.
    _reject_bad_hyphens(raw, label)
    try:
        encoded = "xn--" + label.encode("punycode").decode("ascii")  # RFC 3492, what idna uses
    except UnicodeError as exc:
        raise _invalid_idna(raw, label, "it cannot be encoded as punycode") from exc
    if len(encoded) > MAX_LABEL_LENGTH:
        raise _label_too_long(raw, label, len(encoded))
    try:
        # IDNA2008 (RFC 5891 §4, RFC 5892 code point classes, RFC 5893 bidi rule).
        return idna.alabel(label).decode("ascii")
    except idna.InvalidCodepoint as exc:
        raise _disallowed_character(raw, exc, "IDNA2008, RFC 5892: emoji, symbols and punctuation are not letters") \
            from exc
    except (UnicodeError, ValueError) as exc:
        raise _invalid_idna(raw, label, _idna_reason(exc, "it breaks an IDNA2008 rule, RFC 5891-5893")) from exc


# -- normalization -------------------------------------------------------------------------------


def _normalize(raw: str, *, suggest: bool, admit: _Admit | None) -> str:
    if not raw:
        raise _error("empty", f"The hostname is empty; send the full hostname, e.g. {_quote(_EXAMPLE)}.")
    if len(raw) > _MAX_INPUT_CHARS:
        raise _error(
            "too_long",
            f"{_quote(raw)} is {len(raw)} characters long; a hostname has at most "
            f"{MAX_HOSTNAME_LENGTH} (RFC 1035 §2.3.4): send a shorter name.",
        )
    if suggest:
        _reject_unprintable(raw, admit)
        if (raw.startswith("[") or ":" in raw) and _delimited_ip_literal(raw):
            _reject_ip_literal(raw, "")
        _reject_ascii_punctuation(raw, admit)
    elif not all(char in _LDH_ASCII or (not char.isascii() and char.isprintable()) for char in raw):
        # Building a suggestion: anything odd just means "no suggestion".
        raise _error("invalid_character", "no suggestion")

    # UTS 46 §4 mapping, non-transitional (the only mode UTS 46 keeps since Unicode 15.1
    # and what browsers do): case folding to lowercase, NFC, fullwidth forms to ASCII, and
    # the ideographic full stops U+3002, U+FF0E, U+FF61 to "." (UTS 46 §2.3), so
    # "shop。example。test" means "shop.example.test", exactly as a browser resolves it.
    # UseSTD3ASCIIRules: nothing may map to ASCII other than letters, digits, "-", ".".
    try:
        mapped = idna.uts46_remap(raw, std3_rules=True)
    except idna.IDNAError as exc:
        raise _disallowed_character(raw, exc, "UTS 46") from exc

    # One trailing dot names the DNS root (RFC 1034 §3.1): "example.com." is the same
    # host as "example.com". Only one: "example.com.." has an empty label.
    if mapped.endswith("."):
        mapped = mapped[:-1]
    if not mapped:
        raise _error("empty", f"{_quote(raw)} contains no hostname; {_instead(None)}.")
    labels = mapped.split(".")
    if "" in labels:
        raise _error(
            "empty_label",
            f"{_quote(raw)} has an empty label (a leading dot, two dots in a row, or more than one "
            f"trailing dot); {_instead(_suggest('.'.join(part for part in labels if part), admit) if suggest else None)}.",
        )
    if _ends_in_number(mapped):
        _reject_ip_literal(raw, mapped)
    name = ".".join(_a_label(raw, label) for label in labels)
    if len(name) > MAX_HOSTNAME_LENGTH:
        raise _error(
            "too_long",
            f"{_quote(raw)} is {len(name)} characters long once encoded; DNS allows at most "
            f"{MAX_HOSTNAME_LENGTH} (RFC 1035 §2.3.4): send a shorter name.",
        )
    return name


def normalize_hostname(raw: str) -> str:
    """The canonical form of a hostname: lowercase IDNA A-labels, no trailing dot.

    ``"Bücher.Example."`` -> ``"xn--bcher-kva.example"``. UTS 46 mapping (non-
    transitional), then IDNA2008 validation of every label (RFC 5891-5893), LDH
    rules (RFC 952, RFC 1123 §2.1) and DNS lengths (RFC 1035 §2.3.4). IP
    literals of every spelling are refused (WHATWG URL host parsing).

    Pure and idempotent: ``normalize_hostname(normalize_hostname(x)) ==
    normalize_hostname(x)``. It does not consult the public suffix list (see
    :func:`validate_hostname`), so ``localhost`` or ``com`` normalize fine; use it
    to look names up, and :func:`validate_hostname` to admit them.

    Raises :class:`InvalidHostname` with a code from :data:`HOSTNAME_ERRORS`.
    """
    return _normalize(raw, suggest=True, admit=None)


# -- public suffixes -----------------------------------------------------------------------------

# The Public Suffix List, from tldextract's bundled snapshot only:
# - suffix_list_urls=() : never fetch over the network (the env variable
#   TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS is ignored when the argument is given);
# - cache_dir=None      : never read or write a cache directory (~/.cache), which
#   may be read-only or shared under systemd;
# - so it falls back to the snapshot in tldextract's package data, read once on
#   first use. Constructing the object does no I/O at all.
# include_psl_private_domains=True: the private section lists suffixes under which
# independent parties get names (github.io, blogspot.com, s3.amazonaws.com, ...).
# Let's Encrypt computes the "registered domain" for its rate limits with the full
# list, private section included, so our rate budgets (keyed on registered_domain)
# must too; and a bare private suffix like "github.io" is as much "not one
# customer's name" as "co.uk" is, so it is rejected as a public suffix.
def _new_extractor() -> tldextract.TLDExtract:
    return tldextract.TLDExtract(
        suffix_list_urls=(),
        cache_dir=None,
        fallback_to_snapshot=True,
        include_psl_private_domains=True,
    )


# One extractor per process; the snapshot (~15k rules, ~20 ms) loads on the first lookup,
# so importing this module (e.g. for `edgeproxy --help`) stays cheap. Lookups only read it.
_EXTRACTOR = _new_extractor()

# Suffixes that are on the list but can never get a publicly trusted certificate
# through HTTP-01: .onion (RFC 7686, not in the DNS) and .arpa (RFC 3172
# infrastructure, reverse zones, home.arpa per RFC 8375). Operators can still admit
# them explicitly through extra_suffixes.
_SPECIAL_USE_TLDS = frozenset({"onion", "arpa"})


@functools.lru_cache(maxsize=32)
def _normalized_suffixes(extra_suffixes: tuple[str, ...]) -> tuple[str, ...]:
    out = []
    for suffix in extra_suffixes:
        text = suffix.strip()
        text = text[1:] if text.startswith(".") else text  # ".test" is a common spelling
        try:
            out.append(normalize_hostname(text))
        except InvalidHostname as exc:
            raise ConfigError(f"domains.extra_suffixes: {suffix!r} is not a valid suffix: {exc}") from exc
    return tuple(out)


@functools.lru_cache(maxsize=32)
def _normalized_zones(own_zones: tuple[str, ...]) -> tuple[str, ...]:
    out = []
    for zone in own_zones:
        try:
            out.append(normalize_hostname(zone.strip()))
        except InvalidHostname:
            # A zone that is not itself a valid name can still be matched literally;
            # never drop it silently, or its names would become registrable.
            if zone.strip().strip("."):
                out.append(zone.strip().rstrip(".").lower())
    return tuple(out)


def _within(name: str, zone: str) -> bool:
    return name == zone or name.endswith("." + zone)


def _suffix(name: str, extra_suffixes: Sequence[str]) -> tuple[str, bool]:
    """(effective public suffix of ``name`` or "", whether it came from extra_suffixes).

    The longest match wins across the PSL and the operator's extra suffixes, the
    same way PSL rules compete (the PSL algorithm, https://publicsuffix.org/list/).
    """
    suffix = _EXTRACTOR(name).suffix
    from_extra = False
    for extra in _normalized_suffixes(tuple(extra_suffixes)):
        # Both are dot-aligned suffixes of name, so longer means more labels. ">=": an
        # extra suffix equal to the PSL's marks it as admitted by the operator.
        if _within(name, extra) and len(extra) >= len(suffix):
            suffix, from_extra = extra, True
    return suffix, from_extra


def _check_registrable(raw: str, name: str, extra_suffixes: Sequence[str]) -> str:
    """Return the effective suffix of ``name``, raising unless ``name`` is strictly below one."""
    suffix, from_extra = _suffix(name, extra_suffixes)
    if name == suffix:
        raise _error(
            "public_suffix",
            f"{_quote(raw)} is a public suffix, under which many unrelated owners register names; "
            f"send a hostname under a domain you own, e.g. {_quote('cdn.shop.' + name)}.",
        )
    if "." not in name:
        raise _error(
            "single_label",
            f"{_quote(raw)} is a single label, not a public hostname; send a fully qualified "
            f"name, e.g. {_quote(_EXAMPLE)}.",
        )
    if not suffix:
        tld = name.rsplit(".", 1)[1]
        raise _error(
            "unknown_tld",
            f"{_quote(raw)} ends in {_quote('.' + tld)}, which is not a top-level domain on the public "
            f"suffix list; check the spelling and send a name under a real domain, e.g. {_quote(_EXAMPLE)}.",
        )
    if not from_extra and suffix.rsplit(".", 1)[-1] in _SPECIAL_USE_TLDS:
        raise _error(
            "special_use",
            f"{_quote(raw)} is a special-use name ({_quote('.' + suffix.rsplit('.', 1)[-1])}) that "
            f"certificate authorities cannot validate; send a public hostname, e.g. {_quote(_EXAMPLE)}.",
        )
    return suffix


def validate_hostname(
    raw: str,
    *,
    extra_suffixes: Sequence[str] = (),
    own_zones: Sequence[str] = (),
) -> str:
    """Normalize ``raw`` and admit it only if the edge may serve it; return the normalized name.

    On top of :func:`normalize_hostname`: refuses single labels, bare public suffixes
    (``com``, ``co.uk``, ``github.io``), names whose TLD is not on the bundled Public
    Suffix List, special-use names (``.onion``, ``.arpa``) and names equal to or
    inside any of ``own_zones`` (the edge's own zone; the caller passes it, e.g.
    ``("edge.example.net", "example.net")``).

    ``extra_suffixes`` are treated as additional public suffixes (tests and the demo
    pass ``("test",)``): ``example.test`` and ``shop1.example.test`` are accepted,
    ``test`` alone is a bare suffix and refused. They are normalized like hostnames;
    an entry that is not a valid name raises :class:`ConfigError`.

    Pure: no network, no disk beyond the PSL snapshot loaded once. Raises
    :class:`InvalidHostname` with a code from :data:`HOSTNAME_ERRORS`.
    """
    def admit(name: str, shown: str | None = None) -> None:
        shown = name if shown is None else shown
        for zone in _normalized_zones(tuple(own_zones)):
            if _within(name, zone):
                raise _error(
                    "own_zone",
                    f"{_quote(shown)} belongs to this edge's own domain {_quote(zone)} and cannot be "
                    f"registered; send your own hostname and point it at the edge with a CNAME record.",
                )
        _check_registrable(shown, name, extra_suffixes)

    name = _normalize(raw, suggest=True, admit=admit)
    admit(name, raw)
    return name


def registered_domain(hostname: str, *, extra_suffixes: Sequence[str] = ()) -> str:
    """The registered domain (eTLD+1) of ``hostname``: ``"a.b.shop.co.uk"`` -> ``"shop.co.uk"``.

    Computed with the same list as :func:`validate_hostname` (private section
    included, as Let's Encrypt does for its per-domain rate limits), plus
    ``extra_suffixes``. Raises :class:`InvalidHostname` if ``hostname`` is invalid,
    a single label, a bare suffix or under an unknown TLD.
    """
    name = normalize_hostname(hostname)
    suffix = _check_registrable(hostname, name, extra_suffixes)
    keep = suffix.count(".") + 2
    return ".".join(name.split(".")[-keep:])


# =================================================================================================
# Domain registry service (DomainRegistry) and DNS/CAA pre-check: appended below by the lead.
# Everything above this line is pure and sans-IO and must stay that way.
# =================================================================================================


# -- DNS and CAA pre-check ------------------------------------------------------------------
# Before every new order (and on every renewal) the name must point at the edge,
# and CAA must allow our CA: an order we know will fail only burns the CA's
# failed-validation budget. The verdict logic is pure (``evaluate_pointing``,
# ``caa_allows``, ``caa_lookup_names``); ``DnsChecker`` does the lookups.

# Verdict codes (stable: they are the ``error.code`` of a domain waiting on DNS).
DNS_OK = "dns_ok"
DNS_MISSING = "dns_missing"  # no CNAME/A/AAAA at all (NXDOMAIN or empty answer)
DNS_ELSEWHERE = "dns_elsewhere"  # the name points somewhere that is not the edge
DNS_CAA_FORBIDS = "caa_forbids"  # a CAA RRset exists and does not name our CA
DNS_UNAVAILABLE = "dns_unavailable"  # SERVFAIL / timeout: we do not know (not definitive)


@dataclass(frozen=True)
class DnsVerdict:
    """The pre-check outcome. ``definitive`` is False when DNS could not be asked
    (a SERVFAIL is no proof that a customer removed their record)."""

    ok: bool
    code: str
    message: str
    definitive: bool = True
    # The relevant CAA RRset as (flags, tag, value), empty when the name has none: which
    # of several CAs it allows is decided per CA (``issuers.order_issuers``).
    caa: tuple[tuple[int, str, str], ...] = ()


def _record_to_add(hostname: str, cname_target: str, edge_ips: Sequence[str]) -> str:
    text = f"{hostname}. CNAME {cname_target.rstrip('.')}."
    if edge_ips:
        kinds = " / ".join(f"{'AAAA' if ':' in ip else 'A'} {ip}" for ip in edge_ips)
        text += f" (or {kinds})"
    return text


def evaluate_pointing(
    hostname: str, cname_chain: Sequence[str], addresses: Sequence[str], *,
    cname_target: str, edge_ips: Sequence[str],
) -> DnsVerdict:
    """Does ``hostname`` point at the edge? Pure.

    ``cname_chain`` are the CNAME targets met while resolving (in order),
    ``addresses`` the final A/AAAA values. A CNAME to ``cname_target`` anywhere in
    the chain passes (RFC 1034 section 3.6.2: the alias is followed); otherwise
    every address must be one of ``edge_ips`` (a name that also resolves to some
    other host would fail the CA's validation from there).
    """
    target = cname_target.rstrip(".").lower()
    chain = [c.rstrip(".").lower() for c in cname_chain]
    need = _record_to_add(hostname, cname_target, edge_ips)
    if target in chain:
        return DnsVerdict(True, DNS_OK, f"{hostname} is a CNAME to {target}")
    edge = {ip.lower() for ip in edge_ips}
    if addresses and edge and all(a.lower() in edge for a in addresses):
        return DnsVerdict(True, DNS_OK, f"{hostname} resolves to the edge ({', '.join(addresses)})")
    if chain:
        return DnsVerdict(False, DNS_ELSEWHERE,
                          f"{hostname} is a CNAME to {chain[0]}, not to this edge; the customer must "
                          f"publish {need}")
    if addresses:
        return DnsVerdict(False, DNS_ELSEWHERE,
                          f"{hostname} resolves to {', '.join(addresses)}, not to this edge; the customer "
                          f"must publish {need}")
    return DnsVerdict(False, DNS_MISSING, f"{hostname} has no DNS record yet; the customer must publish {need}")


def caa_lookup_names(hostname: str) -> list[str]:
    """The names whose CAA RRsets are searched, closest first (RFC 8659 section 3:
    climb towards the root, which itself is not queried)."""
    labels = hostname.rstrip(".").split(".")
    return [".".join(labels[i:]) for i in range(len(labels))]


def caa_allows(
    records: Sequence[tuple[int, str, str]], ca_identities: Sequence[str], *, wildcard: bool = False
) -> bool:
    """Does the relevant CAA RRset ``records`` ((flags, tag, value) triples) allow
    one of ``ca_identities`` to issue? Pure.

    RFC 8659 section 4: an empty set allows everyone; an unknown tag with the
    critical flag (128) forbids; for a non-wildcard name only ``issue``
    properties count (section 4.3: ``issuewild`` is for wildcards only) and
    if there are none, issuance is not restricted. The issuer domain name is the
    value up to the first ``;`` (section 4.2), compared case-insensitively.
    """
    known = {"issue", "issuewild", "iodef", "contactemail", "contactphone", "issuemail", "issuevmc"}
    for flags, tag, _value in records:
        if flags & 128 and tag.lower() not in known:
            return False
    tag_wanted = "issuewild" if wildcard else "issue"
    relevant = [v for _f, t, v in records if t.lower() == tag_wanted]
    if wildcard and not relevant:
        relevant = [v for _f, t, v in records if t.lower() == "issue"]
    if not relevant:
        return True
    allowed = {c.strip().lower().rstrip(".") for c in ca_identities}
    for value in relevant:
        issuer = value.split(";", 1)[0].strip().lower().rstrip(".")
        if issuer and issuer in allowed:
            return True
    return False


class DnsChecker:
    """Asks DNS whether a name points at the edge and whether CAA lets our CA issue.

    Blocking (dnspython): call it from a thread in async code. ``resolver`` is
    ``host:port`` or empty for the system resolver (``/etc/resolv.conf``).
    Thread-safe: dnspython resolvers may be shared between threads.
    """

    def __init__(
        self, *, cname_target: str, edge_ips: Sequence[str] = (), resolver: str = "",
        ca_identities: Sequence[str] = ("letsencrypt.org",), timeout: float = 5.0,
    ) -> None:
        self.cname_target = cname_target
        self.edge_ips = tuple(edge_ips)
        self.ca_identities = tuple(ca_identities)
        if resolver:
            host, _, port = resolver.rpartition(":")
            self._resolver = dns.resolver.Resolver(configure=False)
            self._resolver.nameservers = [host.strip("[]")]
            self._resolver.port = int(port)
        else:
            self._resolver = dns.resolver.Resolver()
        self._resolver.lifetime = timeout
        self._resolver.timeout = timeout

    def _answer(self, name: str, rdtype: str) -> list[dns.rrset.RRset] | None:
        """The answer section, [] for NXDOMAIN / no data; None when DNS failed."""
        try:
            answer = self._resolver.resolve(name, rdtype, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return []
        except (dns.exception.DNSException, OSError):
            return None
        return list(answer.response.answer)

    def check(self, hostname: str) -> DnsVerdict:
        chain: list[str] = []
        addresses: list[str] = []
        for rdtype in ("A", "AAAA"):
            rrsets = self._answer(hostname, rdtype)
            if rrsets is None:
                return DnsVerdict(False, DNS_UNAVAILABLE,
                                  f"DNS lookup of {hostname} ({rdtype}) failed (SERVFAIL or timeout); "
                                  "we check again later", definitive=False)
            for rrset in rrsets:
                for rdata in rrset:
                    if rrset.rdtype == dns.rdatatype.CNAME:
                        target = str(rdata.target).rstrip(".").lower()
                        if target not in chain:
                            chain.append(target)
                    elif rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                        addresses.append(str(rdata.address))
        verdict = evaluate_pointing(hostname, chain, addresses,
                                    cname_target=self.cname_target, edge_ips=self.edge_ips)
        if not verdict.ok:
            return verdict
        refused, records = self._check_caa(hostname)
        return refused or dataclasses.replace(verdict, caa=records)

    def _check_caa(self, hostname: str) -> tuple[DnsVerdict | None, tuple[tuple[int, str, str], ...]]:
        """(a refusing verdict or None, the relevant CAA RRset). ``ca_identities`` are
        every configured CA's: the name is refused only when CAA allows none of them."""
        for name in caa_lookup_names(hostname):
            rrsets = self._answer(name, "CAA")
            if rrsets is None:
                # RFC 8659 section 3: a CA must not issue when the CAA lookup fails.
                return DnsVerdict(False, DNS_UNAVAILABLE,
                                  f"CAA lookup of {name} failed (SERVFAIL or timeout); we check again later",
                                  definitive=False), ()
            records = tuple(
                (int(r.flags), r.tag.decode(), r.value.decode())
                for rrset in rrsets if rrset.rdtype == dns.rdatatype.CAA for r in rrset
            )
            if records:  # the closest non-empty RRset is the relevant one
                if caa_allows(records, self.ca_identities):
                    return None, records
                wanted = self.ca_identities[0] if self.ca_identities else "letsencrypt.org"
                return DnsVerdict(False, DNS_CAA_FORBIDS,
                                  f"the CAA records of {name} do not allow {wanted} to issue for {hostname}; "
                                  f'the customer must add {name}. CAA 0 issue "{wanted}"', caa=records), records
        return None, ()
