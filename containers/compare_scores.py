"""One /score request to two servers on the same Redis: the answers must agree (containers/test.sh).

    python containers/compare_scores.py HOST_URL CONTAINER_URL

The user is known and every candidate but the last has stored features, so equal scores mean
equal features read, the same model and the same ONNX Runtime arithmetic. Exit 1 on a difference.
"""

from __future__ import annotations

import json
import sys
import urllib.request

REQUEST = {"user_id": 460, "candidate_item_ids": [891, 936, 12, 345, 999999], "context": {"hour": 18}}
COMPARED = ("scores", "model_version", "user_known", "unknown_candidates")


def score(base_url: str) -> dict:
    """POST REQUEST to BASE_URL/score; the response's compared fields (10 s timeout)."""
    req = urllib.request.Request(
        f"{base_url}/score", data=json.dumps(REQUEST).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        body = json.load(resp)
    return {k: body[k] for k in COMPARED}


def main(host_url: str, container_url: str) -> int:
    host, container = score(host_url), score(container_url)
    print(f"  host:      {host}\n  container: {container}")
    if not host["user_known"] or host["unknown_candidates"] != [999999]:
        print("  FAIL: Redis lacks the run's features (user unknown or stored items missing)")
        return 1
    if host != container:
        print("  FAIL: the container scores differently from the host")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
