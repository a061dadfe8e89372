"""Load held while attacked (issue 11): one tenant's calls stay fast while another attacks.

    python bench/hostile.py [--seconds 30] [--watches 200] [--uploads 20] [--rate 200]

One run, a real server over loopback (its own process, embedded Ray, as `chainrule serve` runs
it, with a token file naming tenants A and B):
  - tenant A (one process, asyncio gRPC) holds `--watches` WatchJob streams on its running job,
    every step's event asked for (min_progress_interval_ms 0; the server sends at most 4
    progress and 4 validation events a second per stream, and a tenant's streams share 32 of
    each a second), `--uploads` uploads that send a
    few bytes every 2 s and never finish, and submits spec after spec, each as soon as the
    last one is answered, refused or not (the server's default submit rate, 5 a second in
    bursts of 50, refuses most: A keeps calling, as a hostile client would);
  - tenant B (another process) calls GetJob and ListJobs, alternately, at `--rate` calls/s
    (4 threads on a fixed schedule), and a health check runs every 50 ms.
The stream caps are raised for this run (StreamLimits per tenant and in all, and the RPC
threads above them, passed to serve() as an operator would configure them), so A really holds
every stream it opens; A then asks for 10 streams over its cap, which must be refused at once.

Targets: B's p99 <= 50 ms, 0 errors for B, the health check always SERVING, and the server's
RSS growth during the attack (printed; bounded means it levels off, not that it is zero). The
peer is B's own load on the same server before the attack, measured in the same run. On a
shared machine latencies follow the other load: the run prints the load average and the
server's CPU seconds per second, quiet and attacked, which depend less on it.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOKEN_A = "tenant-a-token-0123456789abcdef"
TOKEN_B = "tenant-b-token-0123456789abcdef"
EXTRA_STREAMS = 10  # asked for over A's cap


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] if ordered else 0.0


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int) -> float:
    """The process's CPU time so far (all its threads, user + system): what the attack costs
    the server, less disturbed by the machine's other load than latencies are."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- the server's process ------------------------------------------------------------------


def run_server(data_dir: str, tokens: str, streams_per_tenant: int, streams: int,
               addresses, stop) -> None:
    from services.server import configure_process, serve
    from services.streams import StreamLimits

    configure_process()
    server = serve("127.0.0.1:0", data_dir, tokens_file=tokens,
                   stream_limits=StreamLimits(streams_per_tenant, streams),
                   max_rpc_threads=streams + 64)
    addresses.put(server.address)
    stop.wait()
    server.stop()


# --- tenant A: the attack ------------------------------------------------------------------


def run_attacker(address: str, watched_job: str, watches: int, uploads: int, submits: bool,
                 ready, stop, results) -> None:
    asyncio.run(_attack(address, watched_job, watches, uploads, submits, ready, stop, results))


async def _attack(address: str, watched_job: str, watches: int, uploads: int, submits: bool,
                  ready, stop, results) -> None:
    import grpc

    from chainrule.v1 import training_service_pb2 as pb
    from chainrule.v1 import training_service_pb2_grpc as pb_grpc
    from tests.services.helpers import iris_spec

    metadata = (("authorization", f"Bearer {TOKEN_A}"),)
    # Several connections, so that no HTTP/2 connection's stream limit caps the attack.
    channels = [grpc.aio.insecure_channel(address) for _ in range(8)]
    stubs = [pb_grpc.TrainingServiceStub(channel) for channel in channels]
    counts = {"events": 0, "watch_errors": 0, "submitted": 0, "submit_refused": 0,
              "upload_errors": 0}
    opened = asyncio.Event()
    open_streams = 0

    async def watch(stub) -> None:
        nonlocal open_streams
        call = stub.WatchJob(pb.WatchJobRequest(job_id=watched_job), metadata=metadata)
        try:
            first = True
            async for _ in call:
                if first:
                    first = False
                    open_streams += 1
                    if open_streams >= watches + uploads:
                        opened.set()
                counts["events"] += 1
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:
                counts["watch_errors"] += 1

    async def slow_upload(stub, number: int) -> None:
        nonlocal open_streams
        size = 1 << 20

        async def parts():
            nonlocal open_streams
            yield pb.UploadDatasetRequest(header=pb.DatasetHeader(
                name=f"slow-{number}", format="csv", label_column="y", size_bytes=size,
                sha256=hashlib.sha256(b"").hexdigest()))
            open_streams += 1
            if open_streams >= watches + uploads:
                opened.set()
            yield pb.UploadDatasetRequest(chunk=b"x,y\n")
            while True:
                await asyncio.sleep(2.0)
                yield pb.UploadDatasetRequest(chunk=b"1,0\n")

        try:
            await stub.UploadDataset(parts(), metadata=metadata)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:
                counts["upload_errors"] += 1

    async def submit_forever() -> None:
        spec = iris_spec(epochs=1, name="a-spec")
        stub = stubs[0]
        while True:
            try:
                await stub.SubmitJob(pb.SubmitJobRequest(spec=spec), metadata=metadata,
                                     timeout=10)
                counts["submitted"] += 1
            except grpc.aio.AioRpcError:
                counts["submit_refused"] += 1

    tasks = [asyncio.ensure_future(watch(stubs[i % len(stubs)])) for i in range(watches)]
    tasks += [asyncio.ensure_future(slow_upload(stubs[i % len(stubs)], i))
              for i in range(uploads)]
    began = time.perf_counter()
    try:
        await asyncio.wait_for(opened.wait(), timeout=120)
    except asyncio.TimeoutError:
        pass
    open_seconds = time.perf_counter() - began
    # Over the cap: each must be refused (RESOURCE_EXHAUSTED) at once.
    refusals = []
    for i in range(EXTRA_STREAMS):
        asked = time.perf_counter()
        call = stubs[i % len(stubs)].WatchJob(pb.WatchJobRequest(job_id=watched_job),
                                              metadata=metadata, timeout=10)
        try:
            async for _ in call:
                break
            refusals.append(("OPENED", time.perf_counter() - asked))
            call.cancel()
        except grpc.aio.AioRpcError as error:
            refusals.append((error.code().name, time.perf_counter() - asked))
    ready.put((open_streams, open_seconds, refusals))
    if submits:
        tasks.append(asyncio.ensure_future(submit_forever()))
    await asyncio.get_running_loop().run_in_executor(None, stop.wait)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for channel in channels:
        await channel.close()
    results.put(counts)


# --- tenant B: the calls that must stay fast ------------------------------------------------


def run_victim(address: str, job_id: str, rate: float, seconds: float, output: str) -> None:
    """B's GetJob/ListJobs at `rate` calls/s for `seconds`, and a health check every 50 ms."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from chainrule.v1 import training_service_pb2 as pb
    from chainrule.v1 import training_service_pb2_grpc as pb_grpc

    metadata = (("authorization", f"Bearer {TOKEN_B}"),)
    threads = 4
    latencies: list[float] = []
    errors: list[str] = []
    health: list[str] = []
    lock = threading.Lock()
    start = time.perf_counter() + 0.5
    end = start + seconds

    def caller(index: int) -> None:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.TrainingServiceStub(channel)
            interval = threads / rate
            due = start + index * interval / threads
            n = 0
            # Calls that fall behind their schedule go at once, until the run's end: a slow
            # server shows as a lower rate and higher latencies, never as a longer run.
            while due < end and time.perf_counter() < end:
                pause = due - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
                began = time.perf_counter()
                try:
                    if n % 2:
                        stub.ListJobs(pb.ListJobsRequest(page_size=50), metadata=metadata,
                                      timeout=5)
                    else:
                        stub.GetJob(pb.GetJobRequest(job_id=job_id), metadata=metadata,
                                    timeout=5)
                    took = time.perf_counter() - began
                    with lock:
                        latencies.append(took)
                except grpc.RpcError as error:
                    with lock:
                        errors.append(error.code().name)
                n += 1
                due += interval

    def checker() -> None:
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.perf_counter() < end:
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    health.append(health_pb2.HealthCheckResponse.ServingStatus.Name(status))
                except grpc.RpcError as error:
                    health.append(error.code().name)
                time.sleep(0.05)

    workers = [threading.Thread(target=caller, args=(i,)) for i in range(threads)]
    workers.append(threading.Thread(target=checker))
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    Path(output).write_text(json.dumps([latencies, errors, health]))


def victim_load(context, address: str, job_id: str, rate: float, seconds: float):
    with tempfile.NamedTemporaryFile(suffix=".json") as output:
        process = context.Process(target=run_victim,
                                  args=(address, job_id, rate, seconds, output.name))
        process.start()
        process.join(timeout=seconds + 120)
        if process.exitcode != 0:
            process.kill()
            raise RuntimeError(f"tenant B's process ended with {process.exitcode}")
        return json.loads(Path(output.name).read_text())


def report(name: str, outcome, seconds: float) -> float:
    latencies, errors, health = outcome
    not_serving = [h for h in health if h != "SERVING"]
    p99 = percentile(latencies, 0.99)
    print(f"{name:<14} B: {len(latencies) / seconds:6.1f} calls/s  p50 "
          f"{percentile(latencies, 0.5) * 1e3:6.2f} ms  p99 {p99 * 1e3:7.2f} ms  max "
          f"{max(latencies, default=0) * 1e3:7.1f} ms  errors {len(errors)}"
          f"{' ' + str(sorted(set(errors))) if errors else ''}  health checks {len(health)}, "
          f"not SERVING {len(not_serving)}")
    return p99


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--quiet-seconds", type=float, default=10.0)
    parser.add_argument("--watches", type=int, default=200)
    parser.add_argument("--uploads", type=int, default=20)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--submits", action=argparse.BooleanOptionalAction, default=True,
                        help="A submits spec after spec (--no-submits: streams only, to see "
                             "which part of the attack costs B what)")
    args = parser.parse_args()

    from chainrule.client import Client
    from tests.services.helpers import iris_spec, wait_for

    context = multiprocessing.get_context("spawn")
    data_dir = tempfile.mkdtemp(prefix="chainrule-hostile-")
    tokens = Path(data_dir) / "tokens"
    tokens.write_text(f"A {TOKEN_A}\nB {TOKEN_B}\n")
    streams = args.watches + args.uploads
    addresses, stop_server = context.Queue(), context.Event()
    server = context.Process(target=run_server, args=(
        str(Path(data_dir) / "data"), str(tokens), streams, streams + 8, addresses,
        stop_server))
    server.start()
    try:
        address = addresses.get(timeout=300)
        print(f"server pid {server.pid} on {address}; caps raised for this run: "
              f"{streams} streams per tenant, {streams + 8} in all, {streams + 72} RPC threads")
        with Client(address, token=TOKEN_B) as b, Client(address, token=TOKEN_A) as a:
            b_job = b.submit(iris_spec(name="b-job"))
            wait_for(lambda: b.get(b_job.id).state >= 3, 300, interval=0.2, what="B's job")
            # A's job runs for the whole bench: its every step goes to A's watchers.
            a_job = a.submit(iris_spec(epochs=10_000, name="a-watched"))
            wait_for(lambda: a.get(a_job.id).progress.step > 0, 300, interval=0.2,
                     what="A's job to run")

        loads = [os.getloadavg()[0]]
        cpu_before = cpu_seconds(server.pid)
        quiet = victim_load(context, address, b_job.id, args.rate, args.quiet_seconds)
        quiet_cpu = (cpu_seconds(server.pid) - cpu_before) / args.quiet_seconds
        quiet_p99 = report("quiet (peer)", quiet, args.quiet_seconds)
        loads.append(os.getloadavg()[0])

        rss_before = rss_bytes(server.pid)
        ready, stop_attack, attack_results = context.Queue(), context.Event(), context.Queue()
        attacker = context.Process(target=run_attacker, args=(
            address, a_job.id, args.watches, args.uploads, args.submits, ready, stop_attack,
            attack_results))
        attacker.start()
        opened, open_seconds, refusals = ready.get(timeout=300)
        print(f"A holds {opened} streams ({args.watches} WatchJob, {args.uploads} uploads), "
              f"opened in {open_seconds:.1f} s")
        codes = sorted({code for code, _ in refusals})
        print(f"A's {EXTRA_STREAMS} streams over its cap: {codes}, answered in at most "
              f"{max(t for _, t in refusals) * 1e3:.1f} ms")
        peak = [rss_bytes(server.pid)]
        sampling = threading.Event()

        def sample_rss() -> None:
            while not sampling.wait(0.5) and server.is_alive():
                peak.append(rss_bytes(server.pid))

        sampler = threading.Thread(target=sample_rss)
        sampler.start()
        cpu_before = cpu_seconds(server.pid)
        try:
            attacked = victim_load(context, address, b_job.id, args.rate, args.seconds)
            attacked_cpu = (cpu_seconds(server.pid) - cpu_before) / args.seconds
        finally:
            sampling.set()
            sampler.join()
            stop_attack.set()
        loads.append(os.getloadavg()[0])
        rss_after = rss_bytes(server.pid)
        counts = attack_results.get(timeout=120)
        attacker.join(timeout=30)
        attacked_p99 = report("attacked", attacked, args.seconds)
        print(f"A meanwhile: {counts['submitted']} specs submitted, {counts['submit_refused']} "
              f"refused ({(counts['submitted'] + counts['submit_refused']) / args.seconds:.0f} "
              f"submit calls/s), {counts['events']} watch events received, "
              f"{counts['watch_errors']} watch and {counts['upload_errors']} upload errors")
        print(f"server RSS: {rss_before / 2**20:.0f} MiB before the attack, peak "
              f"{max(peak) / 2**20:.0f} MiB, {rss_after / 2**20:.0f} MiB at its end "
              f"(+{(max(peak) - rss_before) / 2**20:.0f} MiB)")
        latencies, errors, health = attacked
        met = (attacked_p99 <= 0.050 and not errors
               and all(h == "SERVING" for h in health))
        print(f"server CPU: {quiet_cpu:.2f} s/s under B's load alone, {attacked_cpu:.2f} s/s "
              f"attacked (the job it follows included)")
        print(f"load average (1 min; {os.cpu_count()} cores): "
              f"{' -> '.join(f'{load:.1f}' for load in loads)} (before the quiet run, after it, "
              f"after the attack)")
        print(f"B's p99 attacked / quiet: {attacked_p99 / max(quiet_p99, 1e-9):.2f}x; target "
              f"p99 <= 50 ms, 0 errors, always SERVING: {'met' if met else 'NOT met'}")
    finally:
        stop_server.set()
        server.join(timeout=60)
        if server.is_alive():
            server.terminate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
