"""`metta-bridges train --framework rllib --address` against clusters started with `ray start`.

Each test starts its own Ray nodes with `ray start --block` in subprocesses (own session, own
`--temp-dir`, a free port, `--node-ip-address 127.0.0.1`) and stops exactly those processes: SIGTERM
to each `ray start --block` makes it stop the processes of its node; its process group is killed
if it does not exit in time. `ray stop` is never called (it would stop every Ray on the machine).
On Linux Ray replaces 127.0.0.1 by the machine's interface address
(`ray._private.services.resolve_ip_for_localhost`), so the two-node test runs in a network
namespace of its own that has only a loopback device (`unshare --net`, as root): there the nodes
can only register, listen and connect on 127.0.0.1. Without the rights to make one it is skipped.

The cluster uses token authentication the way `ray start --head` turns it on in Ray 2.60, with a
token this test writes: `RAY_AUTH_MODE=token` and `RAY_AUTH_TOKEN_PATH` for the nodes, only
`RAY_AUTH_TOKEN_PATH` for the training run (the case that used to die with a ConnectionError).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from bridges.rllib.cluster import LOOPBACK_ENV

RAY = str(Path(sys.executable).with_name("ray"))
IN_NETNS = "METTA_TEST_IN_PRIVATE_NETNS"
"""Set in the copy of pytest that runs inside the private network namespace."""
REPO = Path(__file__).resolve().parents[2]
STARTED = "Ray runtime started"


def ran_in_private_network(nodeid: str) -> bool:
    """Run test ``nodeid`` again in a new network namespace with only loopback; ``False`` when already
    inside it (run the body). Fails with the inner output if the inner run fails."""
    if os.environ.get(IN_NETNS):
        return False
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs `unshare --net` (root) to keep the Ray nodes on loopback")
    inner = subprocess.run(
        ["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
         sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", nodeid],
        env={**os.environ, IN_NETNS: "1"}, cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    print(inner.stdout[-3000:])
    assert inner.returncode == 0, f"inside the private network namespace:\n{inner.stdout[-6000:]}\n{inner.stderr[-2000:]}"
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any Ray address or auth setting of the caller's, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH", LOOPBACK_ENV))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return {**env, **extra}


class RayNode:
    """One `ray start --block` node in its own process group; ``stop`` ends exactly its processes."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str]) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            [RAY, "start", "--block", "--node-ip-address", "127.0.0.1", "--disable-usage-stats", *args],
            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )

    def wait_started(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if STARTED in self.log.read_text():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.5)
        raise RuntimeError(f"ray start did not report {STARTED!r} in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=45)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything of this node still in its group
        self.proc.wait()


@contextlib.contextmanager
def two_node_cluster(num_cpus: int = 2):
    """A head and a second node on this machine with token auth; yields ``(address, workdir)``."""
    workdir = Path(tempfile.mkdtemp(prefix="r15", dir="/tmp"))  # short: Ray's socket paths are length-limited
    token = workdir / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    port = free_port()
    address = f"127.0.0.1:{port}"
    nodes: list[RayNode] = []
    try:
        nodes.append(RayNode(["--head", "--port", str(port), "--temp-dir", str(workdir / "ray"),
                              "--num-cpus", str(num_cpus), "--include-dashboard", "false",
                              "--dashboard-port", str(free_port())], workdir / "head.log", env))
        nodes[0].wait_started()
        nodes.append(RayNode(["--address", address, "--num-cpus", str(num_cpus)], workdir / "node2.log", env))
        nodes[1].wait_started()
        yield address, workdir
    finally:
        for node in reversed(nodes):
            node.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def cli(args: list[str], env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bridges.cli", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


TRAIN = ["train", "--framework", "rllib", "--num-envs", "4", "--batch-size", "128", "--bptt-horizon", "16",
         "--minibatch-size", "64", "--update-epochs", "1", "--hidden-size", "16", "--total-timesteps", "768",
         "--no-stop-at-target", "--no-progress"]
"""Three iterations of 2 learners x 128 env steps on CartPole."""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_node_cluster_trains_through_address_with_two_learners_and_env_runners(request):
    """4 CPUs in 2 nodes for 2 learners and 2 env runners (1 CPU each): the run needs both nodes.
    The run finds the cluster's token from ``RAY_AUTH_TOKEN_PATH`` without ``RAY_AUTH_MODE``; a run
    without any token stops with one error that says what to set."""
    if ran_in_private_network(request.node.nodeid):
        return
    with two_node_cluster() as (address, workdir):
        no_token = cli([*TRAIN, "--address", address, "--out-dir", str(workdir / "no_token")],
                       clean_env(HOME=str(workdir), RAY_NUM_REDIS_GET_RETRIES="3"))  # fail in seconds, not 20
        assert no_token.returncode == 2, no_token.stderr[-3000:]
        assert "could not join the Ray cluster" in no_token.stderr and "RAY_AUTH_TOKEN" in no_token.stderr

        env = clean_env(RAY_AUTH_TOKEN_PATH=str(workdir / "auth_token"))
        run = cli([*TRAIN, "--address", address, "--num-learners", "2", "--num-env-runners", "2",
                   "--out-dir", str(workdir / "run")], env)
        assert run.returncode == 0, run.stderr[-5000:]
        summary = json.loads(run.stdout[run.stdout.index("{\n  \"framework\""):])
        rows = [json.loads(line) for line in (workdir / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["env_steps"] >= 768 and len(rows) >= 3
    assert all(row["env_steps"] > 0 and row["steps_per_second"] > 0 for row in rows)
    print(f"two-node run: {len(rows)} iterations, {summary['env_steps']} env steps, "
          f"steps/s per iteration {[round(r['steps_per_second']) for r in rows]}")


@pytest.mark.slow
def test_without_address_a_private_local_ray_starts_whatever_cluster_is_named(monkeypatch):
    """RAY_ADDRESS (like the current-cluster file ``ray start`` leaves behind) names a cluster that
    does not exist; without ``--address`` the run must not try to join it."""
    import ray

    from bridges.rllib.cluster import join_ray

    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{free_port()}")
    assert join_ray(None, num_cpus=1)
    try:
        assert ray.cluster_resources()["CPU"] == 1
        assert [node["NodeManagerAddress"] for node in ray.nodes()] == ["127.0.0.1"]  # loopback only
        assert ray.get(ray.remote(ray.util.get_node_ip_address).remote()) == "127.0.0.1"  # in the workers too
        assert LOOPBACK_ENV not in os.environ  # not inherited by later subprocesses (a real `ray start`)
    finally:
        ray.shutdown()
