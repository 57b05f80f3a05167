"""Steady inference traffic for the demo: random MovieLens users sent to every agent.

Usage: traffic.py --rate REQUESTS_PER_SECOND --duration SECONDS URL [URL ...]
Each URL is an agent (http://127.0.0.1:19001); requests go round-robin to
/v2/models/product-recommender/infer. Bounded: it stops after --duration seconds.
Every 5 s it prints one line: requests sent, answers by HTTP status, and by version.
"""

import argparse
import collections
import json
import random
import sys
import time
import urllib.error
import urllib.request

MODEL = "product-recommender"
USERS = 943


def infer(url, user):
    body = json.dumps({"inputs": [{"name": "user_id", "datatype": "INT64", "shape": [1],
                                   "data": [user]}]}).encode()
    request = urllib.request.Request(f"{url}/v2/models/{MODEL}/infer", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.load(response).get("model_version")
    except urllib.error.HTTPError as error:
        return error.code, None
    except OSError:
        return "unreachable", None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=20)
    parser.add_argument("--duration", type=float, default=600)
    parser.add_argument("urls", nargs="+")
    args = parser.parse_args()
    rng = random.Random(42)
    statuses, versions = collections.Counter(), collections.Counter()
    started = time.monotonic()
    next_report = started + 5
    sent = 0
    while time.monotonic() - started < args.duration:
        url = args.urls[sent % len(args.urls)]
        status, version = infer(url, rng.randrange(USERS))
        statuses[status] += 1
        versions[version or "-"] += 1
        sent += 1
        if time.monotonic() >= next_report:
            print(f"{time.strftime('%H:%M:%S')} sent {sent}: status {dict(statuses)} "
                  f"version {dict(versions)}", flush=True)
            statuses.clear()
            versions.clear()
            next_report += 5
        time.sleep(max(0.0, started + sent / args.rate - time.monotonic()))


if __name__ == "__main__":
    sys.exit(main())
