"""Record the seed noise of an experiment preset from a multi-seed run, so that one-seed runs of
the same settings (`make demo`) state it in their report (poelm/experiment/seed_noise.json).

    poelm experiment tiny --seeds 3 --out runs/demo
    python scripts/record_seed_noise.py runs/demo/results.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from poelm.atomic import atomic_write_json
from poelm.experiment.config import trajectory_settings
from poelm.experiment.seeds import MEASURED_NOISE


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="results.json of a `poelm experiment --seeds N` run (N >= 2)")
    args = ap.parse_args()
    results = json.loads(Path(args.results).read_text())
    summary = results.get("seeds")
    if not summary:
        raise SystemExit(f"{args.results}: one seed, no noise to record; run `poelm experiment --seeds 3`")
    if (results.get("commit") or "").endswith("+changes"):
        print(f"note: {args.results} ran on uncommitted changes ({results['commit']})")
    summary = {k: v for k, v in summary.items() if k != "gap_band"}  # the report's table needs no curve
    config = results["config"]
    record = json.loads(MEASURED_NOISE.read_text()) if MEASURED_NOISE.exists() else {}
    record[config["name"]] = {"measured": results.get("started", time.strftime("%Y-%m-%d")),
                              "commit": results.get("commit"), "settings": trajectory_settings(config),
                              "summary": summary}
    atomic_write_json(MEASURED_NOISE, record)
    print(f"{MEASURED_NOISE}: {config['name']} noise over seeds {summary['seeds']}")


if __name__ == "__main__":
    main()
