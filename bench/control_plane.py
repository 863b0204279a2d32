"""Control-plane load with no model: N simulated workers against one PostgreSQL database and Redis.

A temporary PostgreSQL database is created and migrated (dropped at the end); Redis carries the
chunk ids, one list per queue in a dedicated db number (LPUSH by the dispatcher's `publish`,
BRPOP by the workers). A dispatcher thread runs `service.dispatch.tick` every `--tick-interval`
seconds. The N workers are threads spread over `--procs` processes; each process has its own
SQLAlchemy pool of at most `--max-db-conns / procs` connections (no overflow), so N may exceed
the server's max_connections: threads beyond the pool wait for a connection. Each worker loops:
BRPOP a chunk id → claim_chunk → sleep `--work-ms` (0: no-op) → commit_chunk.

Per N: chunk commits/s, dispatch latency (Claim.published_at → claim returned, p50/p95), the
dispatcher tick wall time and CPU time (p50/p95), and the peak number of connections that
pg_stat_activity shows on the database. Before the runs, the tick cost is measured with no work
(idle) and with a loaded steady state (active jobs, the in-flight bound full), for the working
tree's `service/dispatch.py` and, with `--baseline REV`, for git REV's version in the same run.

    python bench/control_plane.py --workers 1 10 50 100 200
Last line: max_commits_per_s=<value> (N=<workers>).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ADMIN_URL = os.environ.get(
    "DPIG_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
KEY = "dpig-bench-cp:{run}:{queue}"


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _settings(url: str, home: Path) -> Any:
    from service.settings import Settings

    return Settings.from_values(
        database_url=url,
        home=home / "home",
        storage_url=(home / "outputs").as_uri(),
        lease_seconds=300,
        max_chunks_per_job=1_000_000,
        max_active_jobs=10_000,
    )


def _context(url: str, home: Path, pool_size: int) -> Any:
    from service.db import make_engine, session_factory
    from service.jobs import Context
    from service.storage import storage_from_url

    settings = _settings(url, home)
    engine = make_engine(url, pool_size=max(1, pool_size), max_overflow=0, pool_timeout=120)
    return Context(
        settings, session_factory(engine), storage_from_url(settings.storage_url, settings)
    )


# ------------------------------------------------------------------------------------------------
# workers (child processes)


def _worker_proc(
    url: str, home: str, redis_db: int, run: str, threads: int, pool: int, work_ms: float,
    stop: Any, out: Any, ready: Any,
) -> None:  # fmt: skip
    import redis

    from service.db import utcnow
    from service.jobs import claim_chunk, commit_chunk

    ctx = _context(url, Path(home), pool)
    key = KEY.format(run=run, queue="bulk")
    records: list[tuple[float, float]] = []  # (commit time, dispatch latency s)
    lock = threading.Lock()
    misses = [0]

    def loop(index: int) -> None:
        client = redis.Redis(db=redis_db)
        owner = f"bench-{os.getpid()}-{index}"
        mine: list[tuple[float, float]] = []
        while not stop.is_set():
            item = client.brpop([key], timeout=0.5)
            if item is None:
                continue
            claim = claim_chunk(ctx, owner, chunk_id=int(item[1]))
            if claim is None:
                misses[0] += 1
                continue
            now = utcnow()
            latency = (now - claim.published_at).total_seconds() if claim.published_at else -1.0
            if work_ms > 0:
                time.sleep(work_ms / 1000)
            if commit_chunk(ctx, claim, claim.item_stop - claim.item_start, 0):
                mine.append((time.time(), latency))
        client.close()
        with lock:
            records.extend(mine)

    from sqlalchemy import text

    with ctx.session() as session:  # connected and imported before the window opens
        session.execute(text("SELECT 1"))
    pool_threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(threads)]
    for thread in pool_threads:
        thread.start()
    ready.put(os.getpid())
    for thread in pool_threads:
        thread.join()
    out.put({"records": records, "misses": misses[0]})
    ctx.sessions.kw["bind"].dispose()


# ------------------------------------------------------------------------------------------------
# the main process: database, jobs, dispatcher


def _load_dispatch(rev: str | None) -> ModuleType:
    import service.dispatch

    if rev is None:
        return service.dispatch
    source = subprocess.run(
        ["git", "show", f"{rev}:service/dispatch.py"], cwd=ROOT, check=True,
        capture_output=True, text=True,
    ).stdout  # fmt: skip
    path = Path(tempfile.mkdtemp(prefix="dpig-bench-")) / "dispatch_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("dispatch_baseline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["dispatch_baseline"] = module
    spec.loader.exec_module(module)
    return module


def _reset(ctx: Any) -> None:
    from sqlalchemy import delete

    from service.db import Base

    with ctx.session() as session:
        for table in reversed(Base.metadata.sorted_tables):
            if table.name not in ("tenants", "alembic_version", "registered_models"):
                session.execute(delete(table))


def _submit_jobs(ctx: Any, jobs: int, chunks: int) -> None:
    from service.jobs import submit, tenant_id
    from service.specs import parse_spec

    tenants = [tenant_id(ctx, f"t{k}") for k in range(4)]
    for j in range(jobs):
        spec = parse_spec(
            {"kind": "sample", "count": chunks, "chunk_size": 1, "queue": "bulk", "seed": j}
        )
        submit(ctx, tenants[j % len(tenants)], spec)


def _tick_cost(ctx: Any, module: ModuleType, config: Any, ticks: int) -> dict[str, float]:
    def publish(chunk_id: int, queue: str) -> None:
        pass

    walls, cpus = [], []
    for _ in range(ticks):
        w0, c0 = time.perf_counter(), time.process_time()
        module.tick(ctx, publish, config)
        cpus.append((time.process_time() - c0) * 1000)
        walls.append((time.perf_counter() - w0) * 1000)
    return {
        "wall_ms_p50": round(_pct(walls, 0.5), 2),
        "wall_ms_p95": round(_pct(walls, 0.95), 2),
        "cpu_ms_p50": round(_pct(cpus, 0.5), 2),
    }


def measure_tick_costs(
    ctx: Any, baseline: str | None, jobs: int, chunks: int, ticks: int
) -> dict[str, Any]:
    """Idle (no jobs) and loaded (active jobs, in-flight bound full: nothing to publish) tick cost
    of the working tree's dispatcher and of `baseline`'s, interleaved in one process."""
    from service.dispatch import DispatchConfig

    modules = {"current": _load_dispatch(None)}
    if baseline:
        modules[f"baseline ({baseline})"] = _load_dispatch(baseline)
    config = DispatchConfig(max_in_flight={"interactive": 4, "bulk": 64})
    result: dict[str, Any] = {}
    _reset(ctx)
    for name, module in modules.items():
        result.setdefault(name, {})["idle"] = _tick_cost(ctx, module, config, ticks)
    _submit_jobs(ctx, jobs, chunks)
    modules["current"].tick(ctx, lambda c, q: None, config)  # fill the in-flight bound
    for name, module in modules.items():
        result[name][f"loaded ({jobs} jobs x {chunks} chunks)"] = _tick_cost(
            ctx, module, config, ticks
        )
    _reset(ctx)
    return result


def _ticks_of(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0


def _postgres_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() in ("postgres", "postmaster"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _cpu_snapshot(children: list[int]) -> dict[str, float]:
    """CPU seconds so far: the whole machine (busy), every postgres process (backends come and
    go: the sum over those alive now), the worker processes and this process (dispatcher)."""
    hz = os.sysconf("SC_CLK_TCK")
    cpu = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    busy = sum(int(v) for v in cpu) - int(cpu[3]) - int(cpu[4])  # minus idle and iowait
    return {
        "machine": busy / hz,
        "postgres": sum(_ticks_of(p) for p in _postgres_pids()) / hz,
        "workers": sum(_ticks_of(p) for p in children) / hz,
        "dispatcher+bench": _ticks_of(os.getpid()) / hz,
    }


def _conns(admin: Any, name: str) -> int:
    row = admin.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (name,)
    ).fetchone()
    return int(row[0]) if row else 0


def run_n(
    args: argparse.Namespace, url: str, name: str, home: Path, admin: Any, rds: Any, n: int
) -> dict[str, Any]:
    from service.dispatch import DispatchConfig, tick

    ctx = _context(url, home, 2)
    _reset(ctx)
    _submit_jobs(ctx, args.jobs, args.chunks_per_job)
    run = uuid.uuid4().hex[:8]
    procs = max(1, min(args.procs, n))
    pool = max(1, min(args.max_db_conns // procs, -(-n // procs)))
    bound = args.max_in_flight or max(8, 2 * n)
    config = DispatchConfig(max_in_flight={"interactive": 4, "bulk": bound})

    def publish(chunk_id: int, queue: str) -> None:
        rds.lpush(KEY.format(run=run, queue=queue), chunk_id)

    mpctx = mp.get_context("spawn")
    stop, out, ready = mpctx.Event(), mpctx.Queue(), mpctx.Queue()
    children = []
    for p in range(procs):
        threads = n // procs + (1 if p < n % procs else 0)
        child = mpctx.Process(
            target=_worker_proc,
            args=(url, str(home), args.redis_db, run, threads, min(pool, threads),
                  args.work_ms, stop, out, ready),
        )  # fmt: skip
        child.start()
        children.append(child)
    # every worker process imported, connected and running its threads before anything is timed
    # (a fixed pause was too short for spawned processes on a loaded machine)
    for _ in children:
        ready.get(timeout=300)
    ticks: list[tuple[float, float, float]] = []  # (start, wall ms, cpu ms)
    halt = threading.Event()

    def dispatcher() -> None:
        while not halt.is_set():
            start, c0 = time.perf_counter(), time.thread_time()
            t0 = time.time()
            tick(ctx, publish, config)
            ticks.append(
                (t0, (time.perf_counter() - start) * 1000, (time.thread_time() - c0) * 1000)
            )
            halt.wait(max(0.0, args.tick_interval - (time.perf_counter() - start)))

    thread = threading.Thread(target=dispatcher, daemon=True)
    thread.start()
    t_start = time.time() + args.warmup
    t_end = t_start + args.duration
    peak = 0
    pids = [c.pid for c in children if c.pid is not None]
    while time.time() < t_start:
        time.sleep(0.05)
    cpu_before = _cpu_snapshot(pids)
    while time.time() < t_end:
        peak = max(peak, _conns(admin, name))
        time.sleep(0.25)
    cpu_after = _cpu_snapshot(pids)
    stop.set()
    halt.set()
    thread.join()
    results = [out.get(timeout=60) for _ in children]
    for child in children:
        child.join(timeout=30)
    records = [r for res in results for r in res["records"] if t_start <= r[0] < t_end]
    lat = [r[1] * 1000 for r in records if r[1] >= 0]
    window = [t for t in ticks if t_start <= t[0] < t_end]
    rds.delete(*[KEY.format(run=run, queue=q) for q in ("bulk", "interactive")])
    ctx.sessions.kw["bind"].dispose()
    return {
        "workers": n,
        "procs": procs,
        "pool_per_proc": pool,
        "db_conns_budget": procs * pool + 2,
        "db_conns_peak": peak,
        "max_in_flight": bound,
        "commits": len(records),
        "commits_per_s": round(len(records) / args.duration, 1),
        "dispatch_ms_p50": round(_pct(lat, 0.5), 2),
        "dispatch_ms_p95": round(_pct(lat, 0.95), 2),
        "ticks": len(window),
        "tick_ms_p50": round(_pct([t[1] for t in window], 0.5), 2),
        "tick_ms_p95": round(_pct([t[1] for t in window], 0.95), 2),
        "tick_cpu_ms_p50": round(_pct([t[2] for t in window], 0.5), 2),
        "claim_misses": sum(res["misses"] for res in results),
        # cores used in the window (CPU seconds ÷ duration); postgres is approximate (backends
        # that exited in the window are missed, those started in it counted whole)
        "cores_used": {
            k: round((cpu_after[k] - cpu_before[k]) / args.duration, 2) for k in cpu_after
        },
        "load_average": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 10, 50, 100, 200])
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--work-ms", type=float, default=0.0, help="sleep per chunk (ms)")
    parser.add_argument("--procs", type=int, default=4, help="worker processes")
    parser.add_argument("--max-db-conns", type=int, default=60, help="for all worker processes")
    parser.add_argument("--max-in-flight", type=int, default=0, help="0: max(8, 2 N)")
    parser.add_argument("--tick-interval", type=float, default=0.05)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--chunks-per-job", type=int, default=2000)
    parser.add_argument("--redis-db", type=int, default=14)
    parser.add_argument("--baseline", default="HEAD", help="git rev for the tick-cost baseline")
    parser.add_argument("--tick-samples", type=int, default=100)
    parser.add_argument(
        "--json", type=Path, default=ROOT / "bench" / "results" / "control_plane.json"
    )
    args = parser.parse_args()

    import psycopg
    import redis
    from sqlalchemy import make_url

    from service.db import upgrade_database

    admin_url = make_url(ADMIN_URL).set(drivername="postgresql")
    admin = psycopg.connect(admin_url.render_as_string(hide_password=False), autocommit=True)
    max_conns = int(admin.execute("SHOW max_connections").fetchone()[0])  # type: ignore[index]
    name = f"dpig_cp_bench_{uuid.uuid4().hex[:10]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    home = Path(tempfile.mkdtemp(prefix="dpig-cp-bench-"))
    rds = redis.Redis(db=args.redis_db)
    rows: list[dict[str, Any]] = []
    try:
        url = admin_url.set(drivername="postgresql+psycopg", database=name)
        url_text = url.render_as_string(hide_password=False)
        upgrade_database(url_text)
        ctx = _context(url_text, home, 2)
        tick_costs = measure_tick_costs(
            ctx, args.baseline or None, args.jobs, args.chunks_per_job, args.tick_samples
        )
        ctx.sessions.kw["bind"].dispose()
        print("tick cost (ms):")
        for impl, cases in tick_costs.items():
            for case, figures in cases.items():
                print(f"  {impl:<18} {case:<32} {figures}")
        for n in args.workers:
            row = run_n(args, url_text, name, home, admin, rds, n)
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
    header = (
        f"{'N':>5} {'procs':>5} {'pool':>5} {'conns':>5} {'commits/s':>10} {'disp p50':>9} "
        f"{'disp p95':>9} {'tick p50':>9} {'tick p95':>9} {'tick cpu':>9}"
    )
    print(f"\nmax_connections={max_conns}, work={args.work_ms} ms/chunk, "
          f"tick every {args.tick_interval * 1000:.0f} ms (ms columns in ms)")  # fmt: skip
    print(header)
    for r in rows:
        print(
            f"{r['workers']:>5} {r['procs']:>5} {r['pool_per_proc']:>5} {r['db_conns_peak']:>5} "
            f"{r['commits_per_s']:>10} {r['dispatch_ms_p50']:>9} {r['dispatch_ms_p95']:>9} "
            f"{r['tick_ms_p50']:>9} {r['tick_ms_p95']:>9} {r['tick_cpu_ms_p50']:>9}"
        )
    best = max(rows, key=lambda r: r["commits_per_s"])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "max_connections": max_conns,
                "cpus": os.cpu_count(),
                "tick_cost_ms": tick_costs,
                "runs": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"max_commits_per_s={best['commits_per_s']} (N={best['workers']})")


if __name__ == "__main__":
    main()
