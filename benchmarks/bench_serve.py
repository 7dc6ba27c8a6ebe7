"""`clipengine serve` against the one-shot CLI, on an index of ViT-B-32 with random weights (they cost what
trained ones do), side by side in one run:
  * warm text query through HTTP at 1 client: p50 and p99 over distinct queries (keep-alive connection)
  * throughput at 1, 4 and 16 concurrent clients, each with its own connection, distinct text queries
  * `clipengine search TEXT` in a fresh process: through the running service, and with no service (the
    index loaded by the process itself); medians of fresh processes, alternated so both see the same load
Targets (2 cores): p50 <= 30 ms, p99 <= 100 ms at 1 client; the CLI through a service <= 0.3 s.

    python benchmarks/bench_serve.py            # 200 photos, 300 warm queries, 10 s per concurrency, 7 CLI rounds
    python benchmarks/bench_serve.py --quick    # tiny model, fewer of everything (checks that it runs)
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

P50_TARGET_MS, P99_TARGET_MS, CLI_TARGET_S = 30.0, 100.0, 0.3
WORDS = ["dog", "beach", "red car", "mountain lake", "city at night", "cat on a sofa", "forest path", "birthday cake",
         "snowy street", "old bridge", "sailing boat", "market stall"]


def query(i: int) -> str:
    return f"a photo of a {WORDS[i % len(WORDS)]} number {i}"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def user_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["HF_HUB_OFFLINE"] = "1"
    return env


class Client:
    """One keep-alive HTTP connection, as a script or a page holds one."""

    def __init__(self, url: str):
        parsed = urllib.parse.urlparse(url)
        self.connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)

    def search(self, text: str, k: int = 10) -> float:
        started = time.perf_counter()
        self.connection.request("GET", "/api/search?" + urllib.parse.urlencode({"q": text, "k": k}))
        response = self.connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise SystemExit(f"the service answered {response.status}: {body[:200]!r}")
        return time.perf_counter() - started


def warm_latency(url: str, n: int) -> dict:
    client = Client(url)
    for i in range(5):
        client.search(query(10_000 + i))
    times = [client.search(query(i)) * 1e3 for i in range(n)]
    return {"queries": n, "p50_ms": round(statistics.median(times), 2), "p99_ms": round(percentile(times, 0.99), 2),
            "mean_ms": round(statistics.fmean(times), 2)}


def throughput(url: str, clients: int, seconds: float) -> dict:
    done = [0] * clients
    latencies: list[list[float]] = [[] for _ in range(clients)]
    stop = time.perf_counter() + seconds

    def work(c: int) -> None:
        client = Client(url)
        i = c * 1_000_000
        while time.perf_counter() < stop:
            latencies[c].append(client.search(query(i)) * 1e3)
            done[c] += 1
            i += 1

    threads = [threading.Thread(target=work, args=(c,)) for c in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    every = [x for per in latencies for x in per]
    return {"clients": clients, "queries": sum(done), "queries_per_second": round(sum(done) / elapsed, 1),
            "p50_ms": round(statistics.median(every), 1), "p99_ms": round(percentile(every, 0.99), 1)}


def cli_search(index: Path) -> float:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "clipengine", "search", "a dog on a beach", "--index", str(index)],
                            capture_output=True, text=True, env=user_env())
    if result.returncode != 0:
        raise SystemExit(f"clipengine search failed: {result.stderr}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, help="where to write the JSON (default: results/serve-DATE.json)")
    args = parser.parse_args()
    from results_file import save_result  # puts tests/ on sys.path
    from serving import start_service
    from synthetic import write_photo_folder

    from clipengine.index.pipeline import index_folder
    from clipengine.models import ModelSpec

    quick = args.quick
    arch, spec = ("tiny", ModelSpec("tiny")) if quick else ("ViT-B-32", ModelSpec("ViT-B-32", "none"))
    photos_n, warm_n, seconds, rounds = (40, 40, 2.0, 3) if quick else (200, 300, 10.0, 7)
    result: dict = {"date": dt.date.today().isoformat(), "cores": os.cpu_count(), "model": arch, "photos": photos_n}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_photo_folder(root / "photos", photos_n, (640, 480))
        started = time.perf_counter()
        index_folder(root / "photos", root / "idx", spec)
        print(f"indexed {photos_n} photos with {arch} in {time.perf_counter() - started:.0f} s", flush=True)

        process, url = start_service(root / "idx", env=user_env(), timeout=120)
        try:
            result["warm_1_client"] = warm_latency(url, warm_n)
            print(f"warm text query through HTTP, 1 client: p50 {result['warm_1_client']['p50_ms']} ms, "
                  f"p99 {result['warm_1_client']['p99_ms']} ms", flush=True)
            result["throughput"] = []
            for clients in (1, 4, 16):
                row = throughput(url, clients, seconds)
                result["throughput"].append(row)
                print(f"{clients:>2} clients: {row['queries_per_second']} queries/s "
                      f"(p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms)", flush=True)
            through = []
            for _ in range(rounds):
                through.append(cli_search(root / "idx"))
        finally:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=60)
        alone = [cli_search(root / "idx") for _ in range(rounds)]
        result["cli_search_s"] = {"through_service_median": round(statistics.median(through), 3),
                                  "without_service_median": round(statistics.median(alone), 3),
                                  "rounds": rounds}
        cli = result["cli_search_s"]
        cli["ratio"] = round(cli["without_service_median"] / cli["through_service_median"], 2)
        print(f"`clipengine search` in a fresh process: {cli['through_service_median']} s through the service, "
              f"{cli['without_service_median']} s without: {cli['ratio']}x", flush=True)
    warm = result["warm_1_client"]
    result["targets"] = {"p50_ms": P50_TARGET_MS, "p99_ms": P99_TARGET_MS, "cli_s": CLI_TARGET_S,
                         "met": warm["p50_ms"] <= P50_TARGET_MS and warm["p99_ms"] <= P99_TARGET_MS
                         and cli["through_service_median"] <= CLI_TARGET_S}
    print(f"targets (ViT-B-32): p50 <= {P50_TARGET_MS} ms, p99 <= {P99_TARGET_MS} ms, CLI <= {CLI_TARGET_S} s: "
          f"{'met' if result['targets']['met'] else 'NOT met'}")
    save_result("serve", result, args.out, quick)


if __name__ == "__main__":
    main()
