"""Tests for ``ca.identity``: one table row per SPIFFE-ID rule (spiffe/spiffe SPIFFE-ID.md §2)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import pytest

from ca.errors import InvalidInput, InvalidSpiffeId
from ca.identity import SpiffeId, TrustDomain

TD_255 = "a" * 255
# "spiffe://" (9) + "example.org" (11) + "/" + 2027 characters = 2048 bytes exactly.
PATH_2048 = "/" + "p" * 2027
ID_2048 = f"spiffe://example.org{PATH_2048}"

# (id, input, expected str(), expected trust domain, expected path)
VALID = [
    ("ok/root", "spiffe://example.org", "spiffe://example.org", "example.org", ""),
    (
        "ok/one-segment",
        "spiffe://example.org/web",
        "spiffe://example.org/web",
        "example.org",
        "/web",
    ),
    (
        "ok/k8s",
        "spiffe://k8s-west.example.com/ns/default/sa/web",
        "spiffe://k8s-west.example.com/ns/default/sa/web",
        "k8s-west.example.com",
        "/ns/default/sa/web",
    ),
    (
        "ok/td/underscore-digits",
        "spiffe://my_td-01.x/a",
        "spiffe://my_td-01.x/a",
        "my_td-01.x",
        "/a",
    ),
    ("ok/path/all-chars", "spiffe://td/aZ09.-_/x", "spiffe://td/aZ09.-_/x", "td", "/aZ09.-_/x"),
    (
        "ok/path/dots-in-segment",
        "spiffe://td/.../a.b/.x",
        "spiffe://td/.../a.b/.x",
        "td",
        "/.../a.b/.x",
    ),
    ("ok/scheme/upper", "SPIFFE://example.org/a", "spiffe://example.org/a", "example.org", "/a"),
    ("ok/scheme/mixed", "SpIfFe://example.org", "spiffe://example.org", "example.org", ""),
    (
        "ok/td/upper-normalised",
        "spiffe://Example.ORG/x",
        "spiffe://example.org/x",
        "example.org",
        "/x",
    ),
    (
        "ok/path/case-kept",
        "spiffe://example.org/NS/Default",
        "spiffe://example.org/NS/Default",
        "example.org",
        "/NS/Default",
    ),
    ("ok/td/255-bytes", f"spiffe://{TD_255}/x", f"spiffe://{TD_255}/x", TD_255, "/x"),
    ("ok/id/2048-bytes", ID_2048, ID_2048, "example.org", PATH_2048),
]

# (id, input, substring the reason must contain)
INVALID = [
    ("fail/empty", "", "empty"),
    ("fail/scheme/https", "https://example.org/a", "scheme must be spiffe"),
    ("fail/scheme/missing", "example.org/a", "scheme must be spiffe"),
    ("fail/scheme/one-slash", "spiffe:/example.org", "scheme must be spiffe"),
    ("fail/scheme/leading-space", " spiffe://example.org", "scheme must be spiffe"),
    ("fail/td/missing", "spiffe://", "trust domain is missing"),
    ("fail/td/missing-with-path", "spiffe:///a", "trust domain is missing"),
    ("fail/td/port", "spiffe://example.org:8443/a", "trust domain contains a port"),
    ("fail/td/empty-port", "spiffe://example.org:/a", "trust domain contains a port"),
    ("fail/td/userinfo", "spiffe://user@example.org/a", "userinfo is not allowed"),
    ("fail/td/userinfo-password", "spiffe://u:p@example.org", "userinfo is not allowed"),
    ("fail/td/char-star", "spiffe://exa*mple.org", "invalid character '*' in trust domain"),
    ("fail/td/char-space", "spiffe://exa mple.org", "invalid character ' ' in trust domain"),
    # Regression: refused as "contains a port", for the colons inside the brackets.
    ("fail/td/char-bracket", "spiffe://[::1]/a", "invalid character '[' in trust domain"),
    ("fail/td/256-bytes", f"spiffe://{'a' * 256}/x", "trust domain exceeds 255 bytes"),
    ("fail/td/non-ascii", "spiffe://exämple.org", "non-ASCII"),
    ("fail/path/empty-segment", "spiffe://example.org/a//b", "path has an empty segment"),
    ("fail/path/empty-first-segment", "spiffe://example.org//a", "path has an empty segment"),
    ("fail/path/dot", "spiffe://example.org/a/./b", "path segment '.' is not allowed"),
    ("fail/path/dotdot", "spiffe://example.org/a/../b", "path segment '..' is not allowed"),
    ("fail/path/dotdot-last", "spiffe://example.org/a/..", "path segment '..' is not allowed"),
    ("fail/path/trailing-slash", "spiffe://example.org/a/", "path has a trailing slash"),
    ("fail/path/root-slash", "spiffe://example.org/", "path has a trailing slash"),
    ("fail/path/char-colon", "spiffe://example.org/a:b", "invalid character ':' in path segment"),
    ("fail/path/char-space", "spiffe://example.org/a b", "invalid character ' ' in path segment"),
    ("fail/path/char-plus", "spiffe://example.org/a+b", "invalid character '+' in path segment"),
    ("fail/path/char-at", "spiffe://example.org/a@b", "invalid character '@' in path segment"),
    ("fail/path/backslash", "spiffe://example.org/a\\b", "in path segment"),
    ("fail/path/non-ascii", "spiffe://example.org/caf\u00e9", "non-ASCII"),
    ("fail/percent/path", "spiffe://example.org/a%20b", "percent-encoding is not allowed"),
    ("fail/percent/td", "spiffe://ex%61mple.org", "percent-encoding is not allowed"),
    ("fail/query", "spiffe://example.org/a?x=1", "query is not allowed"),
    ("fail/query/empty", "spiffe://example.org?", "query is not allowed"),
    ("fail/fragment", "spiffe://example.org/a#frag", "fragment is not allowed"),
    ("fail/fragment/empty", "spiffe://example.org#", "fragment is not allowed"),
    ("fail/id/2049-bytes", ID_2048 + "p", "ID exceeds 2048 bytes"),
]


def _ids(table: Sequence[tuple[str, ...]]) -> list[str]:
    return [row[0] for row in table]


@pytest.mark.parametrize(("case", "value", "text", "td", "path"), VALID, ids=_ids(VALID))
def test_parse_valid(case: str, value: str, text: str, td: str, path: str) -> None:
    spiffe_id = SpiffeId.parse(value)
    assert str(spiffe_id) == text
    assert spiffe_id.trust_domain == TrustDomain(td)
    assert spiffe_id.trust_domain.name == td
    assert spiffe_id.path == path
    assert spiffe_id.is_trust_domain_id is (path == "")
    assert SpiffeId.parse(text) == spiffe_id  # canonical form round-trips
    assert SpiffeId.from_path(spiffe_id.trust_domain, path) == spiffe_id


@pytest.mark.parametrize(("case", "value", "reason"), INVALID, ids=_ids(INVALID))
def test_parse_invalid(case: str, value: str, reason: str) -> None:
    with pytest.raises(InvalidSpiffeId) as caught:
        SpiffeId.parse(value)
    assert reason in caught.value.reason
    assert caught.value.value == value
    assert isinstance(caught.value, InvalidInput)
    assert caught.value.code == "invalid-spiffe-id"


TD_VALID = [
    ("ok/name", "example.org", "example.org"),
    ("ok/upper", "EXAMPLE.org", "example.org"),
    ("ok/id-form", "spiffe://example.org", "example.org"),
    ("ok/id-form-upper", "SPIFFE://Example.Org", "example.org"),
    ("ok/255-bytes", TD_255, TD_255),
]

TD_INVALID = [
    ("fail/empty", "", "trust domain is missing"),
    ("fail/id-with-path", "spiffe://example.org/a", "trust domain ID must not have a path"),
    ("fail/id-trailing-slash", "spiffe://example.org/", "trailing slash"),
    ("fail/wrong-scheme", "https://example.org", "scheme must be spiffe"),
    ("fail/port", "example.org:443", "trust domain contains a port"),
    ("fail/userinfo", "me@example.org", "userinfo is not allowed"),
    ("fail/slash", "example.org/a", "invalid character '/' in trust domain"),
    ("fail/256-bytes", "a" * 256, "trust domain exceeds 255 bytes"),
    ("fail/non-ascii", "bücher.de", "non-ASCII"),
    ("fail/id-query", "spiffe://example.org?x", "query is not allowed"),
]


@pytest.mark.parametrize(("case", "value", "name"), TD_VALID, ids=_ids(TD_VALID))
def test_trust_domain_parse_valid(case: str, value: str, name: str) -> None:
    td = TrustDomain.parse(value)
    assert td.name == name
    assert str(td) == name
    assert td.id() == SpiffeId.parse(f"spiffe://{name}")
    assert str(td.id()) == f"spiffe://{name}"
    assert td.id().is_trust_domain_id


@pytest.mark.parametrize(("case", "value", "reason"), TD_INVALID, ids=_ids(TD_INVALID))
def test_trust_domain_parse_invalid(case: str, value: str, reason: str) -> None:
    with pytest.raises(InvalidSpiffeId) as caught:
        TrustDomain.parse(value)
    assert reason in caught.value.reason


FROM_PATH_INVALID = [
    ("fail/no-leading-slash", "ns/default", "path must start with '/'"),
    ("fail/empty-segment", "/a//b", "path has an empty segment"),
    ("fail/dotdot", "/..", "path segment '..' is not allowed"),
    ("fail/trailing-slash", "/a/", "path has a trailing slash"),
    ("fail/percent", "/a%2Fb", "percent-encoding is not allowed"),
    ("fail/query", "/a?b", "query is not allowed"),
    ("fail/fragment", "/a#b", "fragment is not allowed"),
    ("fail/char", "/a*b", "invalid character '*' in path segment"),
    ("fail/non-ascii", "/\u00fc", "non-ASCII"),
    ("fail/too-long", PATH_2048 + "p", "ID exceeds 2048 bytes"),
]


def test_from_path_valid() -> None:
    td = TrustDomain("example.org")
    spiffe_id = SpiffeId.from_path(td, "/ns/default/sa/web")
    assert str(spiffe_id) == "spiffe://example.org/ns/default/sa/web"
    assert SpiffeId.from_path(td, "") == td.id()
    assert str(SpiffeId.from_path(td, PATH_2048)) == ID_2048


@pytest.mark.parametrize(("case", "path", "reason"), FROM_PATH_INVALID, ids=_ids(FROM_PATH_INVALID))
def test_from_path_invalid(case: str, path: str, reason: str) -> None:
    with pytest.raises(InvalidSpiffeId) as caught:
        SpiffeId.from_path(TrustDomain("example.org"), path)
    assert reason in caught.value.reason
    assert caught.value.value == f"spiffe://example.org{path}"


def test_member_of() -> None:
    web = SpiffeId.parse("spiffe://example.org/web")
    assert web.member_of(TrustDomain("example.org"))
    assert web.member_of(TrustDomain.parse("spiffe://EXAMPLE.org"))
    assert not web.member_of(TrustDomain("other.org"))
    assert not web.member_of(TrustDomain("example.org.evil"))
    assert TrustDomain("example.org").id().member_of(TrustDomain("example.org"))


def test_equality_hashing_and_ordering() -> None:
    a = SpiffeId.parse("spiffe://a.org/z")
    b = SpiffeId.parse("spiffe://b.org/a")
    a_upper = SpiffeId.parse("SPIFFE://A.ORG/z")
    assert a == a_upper
    assert hash(a) == hash(a_upper)
    assert len({a, a_upper, b}) == 2
    assert SpiffeId.parse("spiffe://a.org/Z") != a  # path is case-sensitive
    assert sorted([b, a, a.trust_domain.id()]) == [a.trust_domain.id(), a, b]
    assert TrustDomain("a.org") < TrustDomain("b.org")
    assert TrustDomain("A.org") == TrustDomain("a.org")
    assert hash(TrustDomain("A.org")) == hash(TrustDomain("a.org"))
    assert {TrustDomain("x.org"): 1}[TrustDomain.parse("spiffe://X.org")] == 1


def test_immutable_and_slotted() -> None:
    spiffe_id = SpiffeId.parse("spiffe://example.org/a")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spiffe_id.path = "/b"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spiffe_id.trust_domain.name = "evil.org"  # type: ignore[misc]
    assert not hasattr(spiffe_id, "__dict__")
    assert not hasattr(spiffe_id.trust_domain, "__dict__")


DIRECT_TD_INVALID = [
    ("fail/td/empty", "", "trust domain is missing"),
    ("fail/td/port", "example.org:80", "trust domain contains a port"),
    ("fail/td/userinfo", "u@example.org", "userinfo is not allowed"),
    ("fail/td/char", "example.org/a", "invalid character '/' in trust domain"),
    ("fail/td/scheme", "spiffe://example.org", "trust domain contains a port"),
    ("fail/td/too-long", "a" * 256, "trust domain exceeds 255 bytes"),
]


@pytest.mark.parametrize(("case", "name", "reason"), DIRECT_TD_INVALID, ids=_ids(DIRECT_TD_INVALID))
def test_direct_trust_domain_construction_validates(case: str, name: str, reason: str) -> None:
    with pytest.raises(InvalidSpiffeId) as caught:
        TrustDomain(name)
    assert reason in caught.value.reason


def test_direct_construction_normalises_and_validates() -> None:
    assert TrustDomain("Example.ORG").name == "example.org"
    assert SpiffeId(TrustDomain("example.org"), "/a") == SpiffeId.parse("spiffe://example.org/a")
    with pytest.raises(InvalidSpiffeId, match=r"path segment '\.' is not allowed"):
        SpiffeId(TrustDomain("example.org"), "/a/.")
    with pytest.raises(InvalidSpiffeId, match="path must start with '/'"):
        SpiffeId(TrustDomain("example.org"), "a")
    with pytest.raises(TypeError):
        SpiffeId("example.org", "/a")  # type: ignore[arg-type]
    with pytest.raises(InvalidSpiffeId):
        dataclasses.replace(SpiffeId.parse("spiffe://example.org/a"), path="/a/")


def test_error_message_is_human_readable() -> None:
    with pytest.raises(InvalidSpiffeId) as caught:
        SpiffeId.parse("spiffe://example.org:8443/a")
    assert str(caught.value) == (
        "invalid SPIFFE ID 'spiffe://example.org:8443/a': trust domain contains a port"
    )
