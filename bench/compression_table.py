"""Helpers of bench/compression.sh (the compression part of `make bench`). Stdlib only.

    python3 compression_table.py body KIND > BODY.json
        One Open Inference Protocol request body, batch 1, deterministic:
        magika (INT32 [1, 2048], 0..255), ppocr-cls (FP32 [1, 3, 48, 192]),
        recommender (INT64 [1], user 42).

    python3 compression_table.py serve AGENT_BIN NAME MODEL.onnx BODY.json \
            --starts 3 --seconds 5 --warmup 1 --ready-timeout 60
        Starts `AGENT_BIN --model NAME=MODEL.onnx` on a free 127.0.0.1 port STARTS
        times; each time measures the wall time from spawn until
        /v2/models/NAME/ready answers 200 (polled every 10 ms) and reads
        shoal_agent_model_load_seconds from /metrics. After the last start, one
        closed-loop client (keep-alive HTTP/1.1, one request after another) posts
        BODY for WARMUP + SECONDS and records latencies. Prints one JSON line.
        Every agent is killed before returning, and also if this process dies
        (PR_SET_PDEATHSIG), so the caller's trap only needs to kill this process.

    python3 compression_table.py table DIR
        Markdown tables from DIR/results.jsonl and DIR/quality.jsonl (written by
        compression.sh).

Reports, never judges: timing never makes anything fail.
"""

import ctypes
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time


# ---------------------------------------------------------------- request bodies


def body(kind):
    if kind == "magika":
        data = [(i * 7919) % 256 for i in range(2048)]
        inp = {"name": "bytes", "shape": [1, 2048], "datatype": "INT32", "data": data}
    elif kind == "ppocr-cls":
        n = 3 * 48 * 192
        data = [round(((i * 7919) % 2001) / 1000.0 - 1.0, 3) for i in range(n)]
        inp = {"name": "x", "shape": [1, 3, 48, 192], "datatype": "FP32", "data": data}
    elif kind == "recommender":
        inp = {"name": "user_id", "shape": [1], "datatype": "INT64", "data": [42]}
    else:
        raise SystemExit(f"unknown body kind {kind!r}")
    return json.dumps({"id": "bench", "inputs": [inp]}, separators=(",", ":"))


# ---------------------------------------------------------------- agent probes


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent():
    """Runs in the child before exec: SIGKILL it when this process dies."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def get(port, path, timeout=2.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def metric_load_seconds(port, name):
    """shoal_agent_model_load_seconds of NAME from /metrics, or None."""
    try:
        status, text = get(port, "/metrics")
    except OSError:
        return None
    if status != 200:
        return None
    for line in text.decode("utf-8", "replace").splitlines():
        if line.startswith("shoal_agent_model_load_seconds{") and f'model="{name}"' in line:
            try:
                return float(line.rsplit(" ", 1)[1])
            except ValueError:
                return None
    return None


def start_agent(agent_bin, name, model, log, ready_timeout):
    """Spawns the agent; returns (process, port, ready_ms or None)."""
    port = free_port()
    path = f"/v2/models/{name}/ready"
    started = time.perf_counter()
    proc = subprocess.Popen(
        [agent_bin, "--model", f"{name}={model}", "--listen", f"127.0.0.1:{port}"],
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
        preexec_fn=die_with_parent,
    )
    deadline = started + ready_timeout
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            return proc, port, None
        try:
            status, _ = get(port, path, timeout=1.0)
            if status == 200:
                return proc, port, (time.perf_counter() - started) * 1e3
        except OSError:
            pass
        time.sleep(0.010)
    return proc, port, None


def stop(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def percentile_ms(sorted_seconds, p):
    if not sorted_seconds:
        return None
    return sorted_seconds[round((len(sorted_seconds) - 1) * p)] * 1e3


def closed_loop(port, name, payload, seconds, warmup, max_requests=200_000):
    """One client, one request after another, keep-alive; latencies after warm-up."""
    path = f"/v2/models/{name}/infer"
    headers = {"Content-Type": "application/json"}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    latencies, errors, first_error = [], 0, None
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + seconds
    while True:
        t0 = time.perf_counter()
        if t0 >= stop_at or len(latencies) + errors >= max_requests:
            break
        try:
            conn.request("POST", path, body=payload, headers=headers)
            response = conn.getresponse()
            text = response.read()
            ok = response.status == 200
            err = None if ok else f"{response.status}: {text[:200].decode('utf-8', 'replace')}"
        except (OSError, http.client.HTTPException) as e:
            ok, err = False, f"{type(e).__name__}: {e}"
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        took = time.perf_counter() - t0
        if t0 < measure_from:
            continue
        if ok:
            latencies.append(took)
        else:
            errors += 1
            first_error = first_error or err
    conn.close()
    window = time.perf_counter() - measure_from
    latencies.sort()
    return {
        "ok": len(latencies),
        "errors": errors,
        "first_error": first_error,
        "seconds": window,
        "rps": len(latencies) / window if window > 0 else None,
        "p50_ms": percentile_ms(latencies, 0.5),
        "p99_ms": percentile_ms(latencies, 0.99),
    }


def serve(argv):
    import argparse

    parser = argparse.ArgumentParser(prog="compression_table.py serve")
    parser.add_argument("agent_bin")
    parser.add_argument("name")
    parser.add_argument("model")
    parser.add_argument("body")
    parser.add_argument("--starts", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--ready-timeout", type=float, default=60.0)
    parser.add_argument("--log", default=os.devnull)
    args = parser.parse_args(argv)
    payload = open(args.body, "rb").read()

    # The caller's trap sends SIGTERM: leave through `finally` so the agent stops.
    def leave(signum, _frame):
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, leave)

    result = {"ready_ms": [], "agent_load_ms": [], "rss_ready_kib": None, "latency": None}
    with open(args.log, "ab") as log:
        for i in range(args.starts):
            proc, port, ready_ms = start_agent(
                args.agent_bin, args.name, args.model, log, args.ready_timeout
            )
            try:
                if ready_ms is None:
                    result["error"] = (
                        f"start {i + 1}: not ready within {args.ready_timeout:g} s"
                        if proc.poll() is None
                        else f"start {i + 1}: the agent exited with {proc.returncode}"
                    )
                    break
                result["ready_ms"].append(ready_ms)
                load = metric_load_seconds(port, args.name)
                if load is not None:
                    result["agent_load_ms"].append(load * 1e3)
                if i == args.starts - 1:
                    result["rss_ready_kib"] = rss_kib(proc.pid)
                    result["latency"] = closed_loop(
                        port, args.name, payload, args.seconds, args.warmup
                    )
            finally:
                stop(proc)
    for key in ("ready_ms", "agent_load_ms"):
        values = result[key]
        result[key + "_median"] = statistics.median(values) if values else None
    print(json.dumps(result))


# ---------------------------------------------------------------- tables


def fmt(value, spec, missing="n/a"):
    return missing if value is None else format(value, spec)


def mb(n):
    return "n/a" if n is None else f"{n / 1e6:.3f} MB"


def read_jsonl(path):
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def table(out_dir):
    rows = read_jsonl(os.path.join(out_dir, "results.jsonl"))
    quality = read_jsonl(os.path.join(out_dir, "quality.jsonl"))
    facts = {}
    try:
        facts = json.load(open(os.path.join(out_dir, "facts.json")))
    except (FileNotFoundError, ValueError):
        pass
    out = []
    say = out.append
    say("## Compression benchmark: fp32 vs fp16 vs int8 (per tensor) vs int8 per channel")
    say("")
    say(
        "`shoal-operator compress` (release build) on each model; validation in tract, "
        "original vs compressed, on the recommender's validation.jsonl "
        f"({facts.get('dataset_samples', '?')} samples) or synthetic inputs "
        f"({facts.get('synthetic_samples', '?')} samples) for the others. Agent ready = "
        "wall time from spawning a standalone `shoal-agent --model NAME=FILE` on "
        "127.0.0.1 until `/v2/models/NAME/ready` answers 200 (polled every 10 ms), "
        f"median of {facts.get('starts', '?')} starts; agent load = "
        "`shoal_agent_model_load_seconds` from its /metrics (load, optimize, warm-up), "
        f"median of the same starts. Latency: one closed-loop client (Python "
        "http.client, keep-alive), batch 1, "
        f"{facts.get('warmup_seconds', '?')} s warm-up then "
        f"{facts.get('seconds', '?')} s measured, default `--workers`; "
        f"{facts.get('cores', '?')} cores shared. Weights rewritten / kept = the "
        "report's tensorsCompressed / tensorsKeptFloat (initializers only)."
    )
    say("")
    say(
        "| model | variant | bytes | ratio | weights rewritten / kept | compress s | validation "
        "| max abs error | top-1 agreement | agent ready ms | agent load ms | RSS ready "
        "| p50 ms | p99 ms | requests |"
    )
    say(
        "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: | ---: |"
    )
    notes = []
    for r in rows:
        rep = r.get("report") or {}
        val = rep.get("validation") or {}
        serve_ = r.get("serve") or {}
        lat = serve_.get("latency") or {}
        bytes_ = rep.get("artifactBytes", r.get("bytes"))
        ratio = rep.get("ratio", 1.0 if r["variant"] == "fp32" else None)
        if r["variant"] == "fp32":
            validation = "(the original)"
        elif val:
            validation = f"{val.get('samples')} {rep.get('inputs', '')}".strip()
        else:
            validation = "n/a"
        gate = rep.get("gate") or {}
        if gate and not gate.get("passed", True):
            validation += " (gate failed)"
        if r.get("compress_error"):
            notes.append(f"{r['model']} {r['variant']}: compress failed: {r['compress_error']}")
        if serve_.get("error"):
            notes.append(f"{r['model']} {r['variant']}: agent: {serve_['error']}")
        if r.get("serve_error"):
            notes.append(f"{r['model']} {r['variant']}: agent: {r['serve_error']}")
        if lat.get("errors"):
            notes.append(
                f"{r['model']} {r['variant']}: {lat['errors']} failed requests "
                f"(first: {(lat.get('first_error') or '')[:120]})"
            )
        weights = rep.get("weights") or {}
        compressed = weights.get("tensorsCompressed", weights.get("tensors_compressed"))
        kept = weights.get("tensorsKeptFloat", weights.get("tensors_kept_float"))
        tensors = "–" if compressed is None else f"{compressed} / {kept}"
        variant = r["variant"]
        if r.get("compress_error") and bytes_ is None:
            variant += " (no output, see below)"
        requests = lat.get("ok")
        if requests is not None and lat.get("errors"):
            requests = f"{requests} (+{lat['errors']} errors)"
        say(
            f"| {r['model']} | {variant} | {mb(bytes_)} | {fmt(ratio, '.2f')}"
            f"{'' if ratio is None else '×'} | {tensors} | "
            f"{fmt(rep.get('compressSeconds'), '.2f', '–')} | {validation} | "
            f"{fmt(val.get('maxAbsError'), '.3g', '–')} | "
            f"{fmt(val.get('top1Agreement'), '.1%', '–')} | "
            f"{fmt(serve_.get('ready_ms_median'), '.0f')} | "
            f"{fmt(serve_.get('agent_load_ms_median'), '.0f')} | "
            f"{mb(serve_['rss_ready_kib'] * 1024) if serve_.get('rss_ready_kib') else 'n/a'} | "
            f"{fmt(lat.get('p50_ms'), '.2f')} | {fmt(lat.get('p99_ms'), '.2f')} | "
            f"{fmt(requests, '')} |"
        )
    if notes:
        say("")
        for note in notes:
            say(f"- {note}")

    say("")
    say("## Recommender offline quality (MovieLens-100k leave-one-out, all users, onnxruntime)")
    say("")
    if facts.get("quality_error"):
        say(f"Not measured: {facts['quality_error']}")
    elif not quality:
        say("Not measured (see target/bench/compression/quality.log).")
    else:
        base = next((q for q in quality if q.get("variant") == "fp32"), None)
        say("| variant | bytes | hit-rate@10 | Δ vs fp32 | NDCG@10 | Δ vs fp32 |")
        say("| --- | ---: | ---: | ---: | ---: | ---: |")
        for q in quality:
            dh = dn = None
            if base:
                dh = q["hit_rate_at_10"] - base["hit_rate_at_10"]
                dn = q["ndcg_at_10"] - base["ndcg_at_10"]
            say(
                f"| {q.get('variant', q['model'])} | {mb(q.get('bytes'))} | "
                f"{q['hit_rate_at_10']:.4f} | {fmt(dh, '+.4f')} | "
                f"{q['ndcg_at_10']:.4f} | {fmt(dn, '+.4f')} |"
            )
        if facts.get("popularity_baseline"):
            pb = facts["popularity_baseline"]
            say(
                f"| (popularity baseline) | | {pb.get('hit_rate_at_10', 0):.4f} | | "
                f"{pb.get('ndcg_at_10', 0):.4f} | |"
            )
    print("\n".join(out))


def main():
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    command, rest = sys.argv[1], sys.argv[2:]
    if command == "body" and len(rest) == 1:
        print(body(rest[0]))
    elif command == "serve":
        serve(rest)
    elif command == "table" and len(rest) == 1:
        table(rest[0])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
