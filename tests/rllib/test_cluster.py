"""bridges.rllib.cluster.join_ray: which ``ray.init`` call each ``--address`` makes (no Ray started)."""

from __future__ import annotations

import pytest
import ray

from bridges.rllib import cluster
from metta_core.errors import MettaError


@pytest.fixture
def calls(monkeypatch):
    """Records ``ray.init`` kwargs and whether the token rule ran, instead of starting Ray."""
    made: list[tuple[str, dict]] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: made.append(("init", kw)))
    monkeypatch.setattr(cluster, "use_token_if_available", lambda: made.append(("token", {})) or True)
    return made


def test_no_address_starts_a_private_local_ray(calls):
    assert cluster.join_ray(None, num_cpus=1)
    assert calls == [("init", {"address": "local", "num_cpus": 1, "include_dashboard": False})]


def test_auto_uses_rays_own_lookup_and_token_rule(calls):
    assert cluster.join_ray("auto")
    assert calls == [("init", {"address": "auto"})]


def test_host_port_applies_the_token_rule_first(calls):
    assert cluster.join_ray("127.0.0.1:6379")
    assert calls == [("token", {}), ("init", {"address": "127.0.0.1:6379"})]


def test_a_running_ray_is_used_as_it_is(monkeypatch):
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "init", lambda **kw: pytest.fail("ray.init called"))
    assert cluster.join_ray("127.0.0.1:6379") is False


def test_a_failed_join_says_what_to_set(calls, monkeypatch):
    def refuse(**kw):
        raise ConnectionError("Failed to connect to GCS")

    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(MettaError, match=r"could not join the Ray cluster at '127.0.0.1:1'.*RAY_AUTH_TOKEN=<token>"):
        cluster.join_ray("127.0.0.1:1")

