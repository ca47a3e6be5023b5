#!/usr/bin/env python3
"""Mixed two-model workload on two cpu nodes whose memory budget holds one model each:
residency-aware routing (the default) against residency-blind routing
(DROVER_RESIDENCY_ROUTING=false), same binaries, same run, alternated rounds.

Each round starts a coordinator and two cpu nodes serving the demo SD1.5 models `dream` and
`photo` (random weights, other seeds) with NODE_MEMORY_BUDGET=120M, then CLIENTS clients submit
JOBS jobs in all through POST /v1/generate, alternating the two models (64x64, 2 LCM steps).
Prints one JSON line per round (jobs/s, loads and evictions the nodes report) and the ratio of
the means. Usage: scripts/bench-residency.py [--jobs 48] [--clients 4] [--rounds 2]
(builds nothing: run `cargo build --bin drover-coordinator --bin drover-node` first).
"""
import argparse
import json
import os
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "debug")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return r.status, r.read()


def round_once(models_dir, aware, jobs, clients, ids):
    http, grpc = free_port(), free_port()
    data = tempfile.mkdtemp(prefix="drover-bench-")
    env = dict(os.environ, DROVER_HTTP_ADDR=f"127.0.0.1:{http}", DROVER_GRPC_ADDR=f"127.0.0.1:{grpc}",
               DROVER_DATA_DIR=os.path.join(data, "coordinator"), DROVER_STORE_RESERVE_MB="1",
               DROVER_HEARTBEAT_MS="200", RUST_LOG="warn",
               DROVER_RESIDENCY_ROUTING="true" if aware else "false")
    procs = [subprocess.Popen([os.path.join(BIN, "drover-coordinator")], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    base = f"http://127.0.0.1:{http}"
    try:
        for name in ("node-a", "node-b"):
            node_env = dict(os.environ, COORDINATOR_URL=f"http://127.0.0.1:{grpc}", NODE_NAME=name,
                            BACKEND="cpu", NUM_WORKERS="1", MODEL_ROOT=models_dir,
                            MODEL="dream,photo", NODE_MEMORY_BUDGET="120M", RUST_LOG="warn",
                            RAYON_NUM_THREADS="1")
            procs.append(subprocess.Popen([os.path.join(BIN, "drover-node")], env=node_env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.time() + 120
        while True:
            try:
                _, body = call(f"{base}/v1/nodes")
                nodes = json.loads(body)
                if len([n for n in nodes if n["state"] == "online"]) == 2:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise SystemExit("nodes did not come online")
            time.sleep(0.1)
        counter = iter(range(jobs))
        lock = threading.Lock()
        errors = []

        def client():
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                body = {"prompt": "a lighthouse", "model": ids[i % 2], "size": "64x64",
                        "steps": 2, "seed": i}
                try:
                    status, _ = call(f"{base}/v1/generate", body)
                    if status != 200:
                        errors.append(status)
                except OSError as e:
                    errors.append(str(e))

        started = time.time()
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.time() - started
        time.sleep(0.5)
        _, body = call(f"{base}/v1/nodes")
        loads = evictions = 0
        for n in json.loads(body):
            for m in n.get("residency") or []:
                loads += m["loads"]
                evictions += m["evictions"]
        return {"routing": "aware" if aware else "blind", "jobs": jobs, "clients": clients,
                "seconds": round(seconds, 2), "jobs_per_s": round(jobs / seconds, 3),
                "loads": loads, "evictions": evictions, "errors": len(errors)}
    finally:
        for p in reversed(procs):
            p.kill()
            p.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=48)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    node = os.path.join(BIN, "drover-node")
    with tempfile.TemporaryDirectory() as models:
        ids = []
        for name, seed in (("dream", "1"), ("photo", "7")):
            out = os.path.join(models, name)
            subprocess.run([node, "make-model", "--family", "sd15", "--seed", seed, "--out", out],
                           check=True, stdout=subprocess.DEVNULL)
            info = json.loads(subprocess.run([node, "inspect", "--json", out], check=True,
                                             capture_output=True).stdout)
            ids.append(info["model_id"])
        results = {"aware": [], "blind": []}
        for r in range(args.rounds):
            order = (True, False) if r % 2 == 0 else (False, True)
            for aware in order:
                line = round_once(models, aware, args.jobs, args.clients, ids)
                print(json.dumps(line), flush=True)
                results[line["routing"]].append(line["jobs_per_s"])
        mean = {k: sum(v) / len(v) for k, v in results.items()}
        print(json.dumps({"aware_jobs_per_s": round(mean["aware"], 3),
                          "blind_jobs_per_s": round(mean["blind"], 3),
                          "aware_over_blind": round(mean["aware"] / mean["blind"], 2)}))


if __name__ == "__main__":
    main()
