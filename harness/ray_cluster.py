"""Joining or starting the Ray cluster that runs schedule on (runs as tasks, one run's
training workers through Ray Train). Ray is imported on use: this module imports without it."""

from __future__ import annotations

import logging
import os
import socket

from harness.errors import HarnessError, describe_error
from harness.interrupts import reinstall

#: environment forwarded to workers of a remote cluster (a local one inherits the driver's)
FORWARD_ENV_PREFIXES = ("HARNESS_", "HF_", "TRANSFORMERS_", "TOKENIZERS_")


def init_ray(ray_address: str | None, min_cpus: int = 1) -> bool:
    """Starts a local Ray instance (or joins ``ray_address``); returns whether we started it.
    A local instance gets this machine's cores, at least ``min_cpus`` (Ray's CPUs are slots:
    a run's N training workers take one each)."""
    import ray  # heavy and optional: this module imports without it

    if ray.is_initialized():
        return False
    if ray_address:
        check_reachable(ray_address)
        env = {k: v for k, v in os.environ.items() if k.startswith(FORWARD_ENV_PREFIXES)}
        try:
            ray.init(address=ray_address, log_to_driver=False,
                     runtime_env={"env_vars": env} if env else None)
        except (ConnectionError, RuntimeError) as exc:
            raise HarnessError(
                f"could not join the Ray cluster at --ray-address {ray_address} "
                f"({describe_error(exc)}); a "
                f"cluster started by `ray start` uses token authentication: set "
                f"RAY_AUTH_MODE=token (the token is read from ~/.ray/auth_token or "
                f"RAY_AUTH_TOKEN)") from None
    else:
        # address="local": a new instance of our own. Without it ray.init joins any cluster
        # `ray start` (or another harness run) left registered on this machine, and then
        # refuses num_cpus.
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, min_cpus),
                 include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    reinstall()  # ray.init makes SIGTERM exit the driver: ours marks the runs in flight failed
    return True


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A HOST:PORT nobody listens on fails here in a line: Ray itself retries for minutes.
    Other forms (``auto``, ``ray://...``) are left to Ray."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout_s).close()
    except OSError as exc:
        raise HarnessError(
            f"no Ray cluster answers at --ray-address {address} "
            f"({exc.strerror or type(exc).__name__}); start one with `ray start --head "
            f"--port {port}` or leave out --ray-address to run a local one") from None


def workers_ready(workers: int, use_gpu: bool, ray_address: str | None) -> None:
    """Joins (or starts) Ray and checks the cluster can hold ``workers`` workers of one run:
    Ray would otherwise wait for them forever."""
    import ray

    init_ray(ray_address, min_cpus=workers)  # locally: a CPU slot per worker at least
    kind = "GPU" if use_gpu else "CPU"
    have = ray.cluster_resources().get(kind, 0)
    if have < workers:
        raise HarnessError(f"{workers} training workers need {workers} {kind}s but the Ray "
                           f"cluster has {have:g}; lower --workers-per-run (or --gpus-per-run) "
                           f"or add nodes")


def threads_per_worker(workers: int, use_gpu: bool) -> int:
    """torch threads for each of a run's ``workers`` on this machine's cores (0: torch's default,
    for GPU workers)."""
    return 0 if use_gpu else max(1, (os.cpu_count() or 1) // workers)


def worker_failure_line(exc: BaseException, workers: int, job: str, then: str) -> str:
    """One line from Ray's error about a run's workers doing ``job``: the worker's own
    exception where it raised one, else what happened to it, and ``then`` (what to do)."""
    text = str(exc)
    for marker in ("TrainingDiverged:", "HarnessError:"):
        if marker in text:
            return text.split(marker, 1)[1].strip().splitlines()[0]
    died = any(w in text for w in ("died", "ActorDiedError", "exited", "SIGKILL", "killed"))
    what = f"a {job} worker died" if died else f"{job} on the workers failed"
    lines = text.splitlines()
    first = _raised(lines) or next((line.strip() for line in lines if line.strip()),
                                   type(exc).__name__)
    return f"{what} ({workers} workers: {first[:200]}); {then}"


def _raised(lines: list[str]) -> str | None:
    """The exception line of the first traceback in ``lines`` (the worker's own error, where
    Ray's message quotes it), or None."""
    inside = False
    for line in lines:
        if line.startswith("Traceback"):
            inside = True
        elif inside and line.strip() and not line[0].isspace():
            return line.strip()
    return None
