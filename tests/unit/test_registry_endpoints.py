"""Notification endpoints against server-side request forgery: the allow list of base URLs per
organisation, and the addresses production may deliver to (real name resolution of localhost)."""

from __future__ import annotations

import pytest

from services.registry import dsub
from services.registry.broker import EndpointRefused, check_endpoint

_LIST = '{"hosp-a": ["https://his.a.example/hie/"], "*": ["https://hub.example:8443/notify"]}'


def test_an_endpoint_must_lie_under_its_own_organisations_base_urls() -> None:
    policy = dsub.EndpointPolicy.parse(_LIST, production=True)
    assert policy.base_for("hosp-a", "https://his.a.example/hie/notify") == "https://his.a.example/hie/"
    assert policy.base_for("hosp-a", "https://HIS.A.example:443/hie/x?y=1") == "https://his.a.example/hie/"
    # Another hospital's base is not this one's.
    assert policy.base_for("hosp-b", "https://his.a.example/hie/notify") is None
    # The `*` entry is everyone's; its path is a whole-segment prefix.
    assert policy.base_for("hosp-b", "https://hub.example:8443/notify/b") == "https://hub.example:8443/notify"
    assert policy.base_for("hosp-b", "https://hub.example:8443/notify") == "https://hub.example:8443/notify"
    for url in (
        "https://hub.example:8443/notifyx",  # not under the segment
        "https://hub.example/notify/b",  # other port
        "http://his.a.example/hie/notify",  # other scheme
        "https://his.a.example.evil.example/hie/notify",  # other host
        "https://his.a.example/hie/../admin",  # climbs out of the base
        "https://his.a.example/hie/%2e%2e/admin",
        "https://his.a.example/other",
        "https://user:pw@his.a.example/hie/notify",
    ):
        assert policy.base_for("hosp-a", url) is None, url


def test_production_refuses_internal_addresses_unless_listed() -> None:
    policy = dsub.EndpointPolicy.parse(_LIST, "10.20.0.0/16", production=True)
    base = "https://his.a.example/hie/"
    assert policy.address_allowed("203.0.113.0", base) is False  # documentation range: not global
    assert policy.address_allowed("8.8.8.8", base)
    internal_addresses = ("127.0.0.1", "::1", "169.254.169.254", "10.1.2.3", "192.168.1.1", "::ffff:127.0.0.1", "::")
    for internal in internal_addresses:
        assert policy.address_allowed(internal, base) is False, internal
    # A listed private network (the regional hospital network) and an address the base names.
    assert policy.address_allowed("10.20.3.4", base)
    assert policy.address_allowed("192.168.1.1", "https://192.168.1.1/hie/")


def test_development_without_a_list_accepts_endpoints_but_not_link_local() -> None:
    policy = dsub.EndpointPolicy.parse("", production=False)
    assert not policy.enforced
    assert policy.base_for("hosp-a", "http://127.0.0.1:9000/n") == "http://127.0.0.1:9000/n"
    # Loopback only when configured explicitly (the tests' local receivers).
    assert policy.address_allowed("127.0.0.1", "http://127.0.0.1:9000/n") is False
    loopback = dsub.EndpointPolicy.parse("", production=False, allow_loopback=True)
    assert loopback.address_allowed("127.0.0.1", "http://127.0.0.1:9000/n")
    assert policy.address_allowed("169.254.169.254", "http://169.254.169.254/latest") is False
    # Production with nothing listed allows nothing.
    assert dsub.EndpointPolicy.parse("", production=True).base_for("hosp-a", "https://x.example/n") is None


@pytest.mark.parametrize("bad", ['["https://x.example/"]', '{"a": "https://x.example/"}', '{"a": ["ftp://x/"]}'])
def test_a_malformed_allow_list_is_refused_at_start(bad: str) -> None:
    with pytest.raises(ValueError, match="allow list"):
        dsub.EndpointPolicy.parse(bad, production=True)


async def test_host_names_are_resolved_in_production_and_internal_answers_refused() -> None:
    listed = '{"hosp-a": ["https://localhost:8443/hie/", "https://127.0.0.1:8443/hie/"]}'
    policy = dsub.EndpointPolicy.parse(listed, production=True)
    # localhost resolves to loopback: refused although the base URL is listed by name.
    with pytest.raises(EndpointRefused, match="endpoint-address-not-allowed"):
        await check_endpoint(policy, "hosp-a", "https://localhost:8443/hie/n")
    # The literal loopback address the admin listed is allowed.
    await check_endpoint(policy, "hosp-a", "https://127.0.0.1:8443/hie/n")
    with pytest.raises(EndpointRefused, match="endpoint-not-allowed"):
        await check_endpoint(policy, "hosp-b", "https://127.0.0.1:8443/hie/n")
    with pytest.raises(EndpointRefused, match="endpoint-unresolvable"):
        await check_endpoint(
            dsub.EndpointPolicy.parse('{"*": ["https://no-such-host.invalid/"]}', production=True),
            "hosp-a",
            "https://no-such-host.invalid/n",
        )
    # A listed network admits loopback resolution (e.g. a sidecar relay on the same host).
    networks = dsub.EndpointPolicy.parse(listed, "127.0.0.0/8,::1/128", production=True)
    await check_endpoint(networks, "hosp-a", "https://localhost:8443/hie/n")
