"""Formats `make bench`'s results (bench/agent.sh) as a Markdown table on stdout.

    python3 table.py RESULTS.jsonl FACTS.json

Reports, never judges: the footprint and latency targets are shown next to the numbers.
"""

import json
import sys

NAMES = {
    "tract": "tract in-process (floor)",
    "shoal-agent": "shoal-agent (HTTP)",
    "kserve": "KServe ModelServer + onnxruntime (HTTP)",
}


def fmt(value, spec):
    return "n/a" if value is None else format(value, spec)


def kib_size(kib):
    return "n/a" if kib is None else size(kib * 1024)


def size(n):
    return f"{n / 1e6:.1f} MB ({n / 2**20:.1f} MiB)"


def main():
    rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
    facts = json.load(open(sys.argv[2]))
    by = {(r["system"], r["concurrency"]): r for r in rows if not r.get("failed")}
    concurrencies = sorted({r["concurrency"] for r in rows})
    out = []
    say = out.append

    say("## shoal-agent benchmark: magika (INT32 [1, 2048] → FP32 [1, 214]), batch 1")
    say("")
    say(
        f"Closed-loop clients on 127.0.0.1, {facts.get('warmup_seconds')} s warm-up then "
        f"{facts.get('seconds')} s measured per row, {facts.get('cores')} cores shared. "
        "tract in-process = the agent's engine called directly: parse the same JSON body, "
        "validate, infer, serialize the outputs (no HTTP). shoal-agent: default "
        f"`--workers` ({facts.get('agent_workers', '?')}) and `--queue`. KServe: one "
        "process, one uvicorn worker, synchronous `predict`, onnxruntime intra-op threads "
        + (
            "default (one per physical core)"
            if facts.get("kserve_intra_op_threads") == 0
            else str(facts.get("kserve_intra_op_threads"))
        )
        + (f" ({facts['kserve_version']})" if "kserve_version" in facts else "")
        + "."
    )
    say("")
    say("| system | clients | requests ok | errors | req/s | p50 ms | p90 ms | p99 ms |")
    say("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for c in concurrencies:
        for system in ("tract", "shoal-agent", "kserve"):
            r = by.get((system, c))
            if r is None:
                failed = any(
                    x["system"] == system and x["concurrency"] == c for x in rows
                )
                if failed:
                    say(f"| {NAMES[system]} | {c} | load generator failed | | | | | |")
                continue
            err = str(r["errors"])
            if r.get("first_error"):
                err += f" (first: {r['first_error'][:80]})"
            say(
                f"| {NAMES[system]} | {c} | {r['ok']} | {err} | {r['rps']:.1f} | "
                f"{r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['p99_ms']:.2f} |"
            )
    say("")
    say("| clients | agent / KServe throughput (target ≥ 5×) | agent p50 overhead over tract (target ≤ 10%) | agent / tract throughput |")
    say("| ---: | ---: | ---: | ---: |")
    for c in concurrencies:
        agent, tract, kserve = (by.get((s, c)) for s in ("shoal-agent", "tract", "kserve"))
        ratio = agent["rps"] / kserve["rps"] if agent and kserve and kserve["rps"] else None
        overhead = (
            (agent["p50_ms"] / tract["p50_ms"] - 1) * 100 if agent and tract else None
        )
        floor = agent["rps"] / tract["rps"] if agent and tract and tract["rps"] else None
        say(
            f"| {c} | {fmt(ratio, '.2f')}× | {fmt(overhead, '+.1f')}% | {fmt(floor, '.2f')}× |"
        )
    if "kserve_error" in facts:
        say("")
        say(f"KServe rows missing: {facts['kserve_error']}")
    if "agent_error" in facts:
        say("")
        say(f"shoal-agent rows missing: {facts['agent_error']}")

    say("")
    say("| footprint | value | target |")
    say("| --- | ---: | ---: |")
    say(
        f"| shoal-agent RSS, magika loaded, right after ready | "
        f"{kib_size(facts.get('agent_rss_ready_kib'))} | ≤ 20 MB idle |"
    )
    say(
        f"| shoal-agent RSS after the load runs | "
        f"{kib_size(facts.get('agent_rss_after_kib'))} | |"
    )
    if "kserve_rss_ready_kib" in facts:
        say(
            f"| KServe RSS right after ready / after the load runs | "
            f"{kib_size(facts.get('kserve_rss_ready_kib'))} / "
            f"{kib_size(facts.get('kserve_rss_after_kib'))} | |"
        )
    say(
        f"| release binary (`target/release/shoal-agent`, as built) | "
        f"{size(facts['release_bytes'])} | |"
    )
    say(
        f"| release binary, stripped copy | "
        f"{size(facts['release_stripped_bytes'])} | ≤ 25 MB |"
    )
    if "release_small_bytes" in facts:
        say(
            "| `--profile release-small` (fat LTO, 1 codegen unit, stripped) | "
            f"{size(facts['release_small_bytes'])} | ≤ 25 MB |"
        )
    print("\n".join(out))


if __name__ == "__main__":
    main()
