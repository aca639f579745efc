"""Where a training run's Ray lives: a private local Ray, or exactly the cluster named by ``--address``.

Without an address Ray starts privately (``ray.init(address="local")``): a cluster that
``ray start`` left on the machine (its ``ray_current_cluster`` file, even with its processes gone)
or a ``RAY_ADDRESS`` in the environment is not joined.

With an address, Ray 2.60's token authentication matters: ``ray start --head`` turns it on when a
token exists (``RAY_AUTH_TOKEN``, the file at ``RAY_AUTH_TOKEN_PATH``, or ``~/.ray/auth_token``),
and ``ray.init(address="auto")`` then picks the token up, but ``ray.init(address="HOST:PORT")``
does not unless ``RAY_AUTH_MODE=token`` is exported. ``join_ray`` applies Ray's own ``auto``/
``ray start --head`` rule (``maybe_enable_token_auth_if_token_available``) to an explicit address
too: if ``RAY_AUTH_MODE`` is unset and Ray's token loader finds a token, token mode is used.
An explicit ``RAY_AUTH_MODE`` is respected. The token itself is only ever read by Ray.
"""

from __future__ import annotations

import os

import ray

from metta_core.errors import MettaError

AUTH_HELP = (
    "If the cluster was started with `ray start --head`, Ray 2.60 has token authentication on: make the "
    "cluster's token available here (`ray get-auth-token` prints it on the head node) as RAY_AUTH_TOKEN=<token>, "
    "as a file named by RAY_AUTH_TOKEN_PATH, or in ~/.ray/auth_token. Otherwise check that {address} is the head "
    "node's GCS address (`ray status --address {address}`)."
)


LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Ray's switch (read into ``ray._private.ray_constants.ENABLE_RAY_CLUSTER``) that, when ``0``,
makes every Ray process register the node under 127.0.0.1 instead of the machine's interface address."""


def init_private_ray(**kwargs) -> None:
    """``ray.init(address="local", **kwargs)`` on loopback only (default: all CPUs, no dashboard).

    On Linux Ray registers even a private local node under the machine's interface address and
    listens there. A private Ray has no other node to reach, so it is kept on 127.0.0.1: Ray's own
    switch for single-machine platforms, set for this process (Ray read it when it was imported)
    and, during ``ray.init``, in the environment the processes Ray starts inherit (then restored, so
    that later subprocesses, e.g. a ``ray start`` of a real cluster, do not inherit it).
    """
    from ray._private import ray_constants

    previous = os.environ.get(LOOPBACK_ENV)
    os.environ[LOOPBACK_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(address="local", **{"num_cpus": os.cpu_count(), "include_dashboard": False, **kwargs})
    finally:
        if previous is None:
            os.environ.pop(LOOPBACK_ENV, None)
        else:
            os.environ[LOOPBACK_ENV] = previous


def use_token_if_available() -> bool:
    """Ray's rule for ``address="auto"`` and ``ray start --head``, for an explicit address: if
    ``RAY_AUTH_MODE`` is unset and a token exists, turn token mode on; returns whether it is on."""
    from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available

    return maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def join_ray(address: str | None, **local_kwargs) -> bool:
    """Start Ray for a run; returns ``True`` if this call started or joined it (the caller then shuts it down).

    ``address=None``: a private local Ray on loopback (``init_private_ray``; ``local_kwargs`` go to
    ``ray.init``). ``"auto"``: Ray's own lookup (``RAY_ADDRESS``, then the machine's current
    cluster). ``"HOST:PORT"``: exactly that cluster, with its token if one is available. An already
    initialized Ray is used as it is (``False``).
    """
    if ray.is_initialized():
        return False
    if address is None:
        init_private_ray(**local_kwargs)
        return True
    if address != "auto":
        use_token_if_available()
    try:
        ray.init(address=address)
    except (ConnectionError, ray.exceptions.AuthenticationError) as exc:
        raise MettaError(f"could not join the Ray cluster at {address!r} ({exc}). {AUTH_HELP.format(address=address)}") from None
    return True
