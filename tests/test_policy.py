"""Public-listener policy: API rate limits and the per-upstream client-IP header policy.

Unit level, calling the ASGI app with a fake relay (the real-listener behaviour
of the same code is covered by the e2e and hostile-input suites).
"""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeproxy.edge.proxy import forward_headers, parse_trusted_hops, visitor_ip
from edgeproxy.rules.ratelimit import TokenBuckets
from test_proxy import SHOP, call, make_env

TRUSTED = parse_trusted_hops(["10.0.0.0/8", "2001:db8::1"])


def test_token_bucket_burst_refill_and_bounded_keys() -> None:
    buckets = TokenBuckets(rate=2.0, burst=4.0, max_keys=2)
    assert [buckets.allow("a", 0.0) for _ in range(5)] == [True, True, True, True, False]
    assert buckets.allow("a", 0.5)          # one token back after half a second at 2/s
    assert not buckets.allow("a", 0.5)
    assert buckets.allow("b", 0.5) and buckets.allow("c", 0.5)
    assert len(buckets) == 2                # "a" forgotten: memory stays bounded
    assert TokenBuckets(rate=0, burst=0).allow("x", 0.0)  # disabled


def test_token_bucket_wait_says_how_long_until_the_next_token() -> None:
    """What the replayer sleeps: 0.0 takes a token; otherwise the time until one, taking nothing."""
    buckets = TokenBuckets(rate=4.0, burst=1.0)
    assert buckets.wait("", 10.0) == 0.0
    assert buckets.wait("", 10.0) == pytest.approx(0.25)
    assert buckets.wait("", 10.1) == pytest.approx(0.15)  # nothing was taken by asking
    assert buckets.wait("", 10.25) == 0.0
    assert TokenBuckets(rate=0, burst=0).wait("", 0.0) == 0.0


def test_api_rate_limit_per_visitor_is_429_and_never_forwarded() -> None:
    env = make_env(rate_per_ip=1.0, rate_per_domain=1000.0, rate_burst=3.0)

    async def main() -> None:
        statuses = [(await call(env.proxy.https_app, method="POST", path="/api/v1/m", body=b"{}")).status
                    for _ in range(5)]
        assert statuses == [202, 202, 202, 429, 429]
        limited = await call(env.proxy.https_app, method="POST", path="/api/v1/m", body=b"{}")
        assert limited.header("retry-after") == "1"
        assert len(env.up.relay_requests()) == 3
        # Another visitor has its own bucket; a second later the first has one token again.
        other = await call(env.proxy.https_app, method="POST", path="/api/v1/m", body=b"{}",
                           client=("203.0.113.5", 40000))
        assert other.status == 202
        env.clock.now += 1.0
        assert (await call(env.proxy.https_app, method="POST", path="/api/v1/m", body=b"{}")).status == 202
        # Behind a trusted hop, the visitor is the address that hop reports.
        for i in range(3):
            reply = await call(env.proxy.https_app, method="POST", path="/api/v1/m", body=b"{}",
                               client=("10.1.2.3", 1), headers=[("X-Forwarded-For", f"198.18.0.{i}")])
            assert reply.status == 202
        assert env.proxy.stats["api_rate_limited"] == 3

    env.run(main())


def test_api_rate_limit_per_domain() -> None:
    env = make_env(rate_per_ip=0.0, rate_per_domain=1.0, rate_burst=2.0)

    async def main() -> None:
        statuses = [(await call(env.proxy.https_app, method="POST", path="/api/v1/m", body=b"{}",
                                client=(f"198.51.100.{i}", 1))).status for i in range(4)]
        assert statuses == [202, 202, 429, 429]

    env.run(main())


def _names(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    return {name for name, _ in headers}


def test_client_ip_header_policy() -> None:
    inbound = [(b"x-forwarded-for", b"198.18.0.9"), (b"forwarded", b"for=1.2.3.4"), (b"x-real-ip", b"1.2.3.4")]
    none = forward_headers(inbound, peer="203.0.113.7", trusted=TRUSTED, host=SHOP, client_ip=frozenset())
    assert not _names(none) & {b"x-forwarded-for", b"forwarded", b"x-real-ip"}
    assert (b"x-forwarded-host", SHOP.encode()) in none
    every = dict(forward_headers(inbound, peer="2001:db8::77", trusted=TRUSTED, host=SHOP,
                                 client_ip=frozenset({"x-forwarded-for", "forwarded", "x-real-ip"})))
    assert every[b"x-forwarded-for"] == b"2001:db8::77"  # the untrusted peer's own XFF is dropped
    assert every[b"forwarded"] == b'for="[2001:db8::77]";host=' + SHOP.encode() + b";proto=https"
    assert every[b"x-real-ip"] == b"2001:db8::77"
    via_hop = dict(forward_headers(inbound, peer="10.0.0.1", trusted=TRUSTED, host=SHOP,
                                   client_ip=frozenset({"x-real-ip", "x-forwarded-for"})))
    assert via_hop[b"x-real-ip"] == b"198.18.0.9"
    assert via_hop[b"x-forwarded-for"] == b"198.18.0.9, 10.0.0.1"


def test_visitor_ip_skips_trusted_hops_right_to_left() -> None:
    assert visitor_ip([b"198.18.0.1, 10.0.0.5"], "10.0.0.1", TRUSTED) == "198.18.0.1"
    assert visitor_ip([b"198.18.0.1"], "203.0.113.1", TRUSTED) == "203.0.113.1"  # untrusted peer: ignore XFF
    assert visitor_ip([], "10.0.0.1", TRUSTED) == "10.0.0.1"


_token = st.text(alphabet=string.ascii_letters + string.digits + "-", min_size=1, max_size=20)
_header = st.tuples(
    st.one_of(st.sampled_from([b"cookie", b"Cookie", b"authorization", b"connection", b"keep-alive", b"te",
                               b"transfer-encoding", b"upgrade", b"host", b"x-forwarded-for", b"forwarded",
                               b"x-real-ip", b"x-forwarded-host", b"proxy-authorization", b"content-type",
                               b"user-agent", b"x-custom"]),
              _token.map(str.encode)),
    st.binary(max_size=30),
)


@settings(max_examples=300, deadline=None)
@given(headers=st.lists(_header, max_size=12),
       peer=st.sampled_from(["203.0.113.7", "10.0.0.1", "2001:db8::1", "2001:db8::99"]),
       policy=st.sets(st.sampled_from(["x-forwarded-for", "forwarded", "x-real-ip"])))
def test_header_policy_properties(headers: list[tuple[bytes, bytes]], peer: str, policy: set[str]) -> None:
    out = forward_headers(headers, peer=peer, trusted=TRUSTED, host=SHOP, client_ip=frozenset(policy))
    names = [name for name, _ in out]
    named_by_connection = {t.strip().lower() for n, v in headers if n.lower() == b"connection"
                           for t in v.split(b",") if t.strip()}
    # Connection names the *received* hop-by-hop fields; the ones the edge sets itself
    # for the next hop are checked below, not here.
    own = {b"x-forwarded-host", b"x-forwarded-proto", b"x-forwarded-for", b"forwarded", b"x-real-ip"}
    never = {b"cookie", b"authorization", b"proxy-authorization", b"connection", b"keep-alive", b"te",
             b"transfer-encoding", b"upgrade", b"host"} | (named_by_connection - own)
    assert not set(names) & never
    for name in (b"x-forwarded-for", b"forwarded", b"x-real-ip"):
        assert names.count(name) == (1 if name.decode() in policy else 0)
    assert names.count(b"x-forwarded-host") == 1 and dict(out)[b"x-forwarded-host"] == SHOP.encode()
    if peer in ("203.0.113.7", "2001:db8::99"):  # untrusted peers cannot inject addresses
        for name, value in out:
            if name in (b"x-forwarded-for", b"x-real-ip"):
                assert value == peer.encode()
