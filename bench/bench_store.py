"""Benchmark: reading the done ids of a big output (the start of every resumed stage).

Writes a JSONL of ``--lines`` sample-sized records (default 1M x ~450 bytes), then, each in
a fresh subprocess so peak memory is measured cleanly (``ru_maxrss`` delta over the
interpreter with imports loaded), reads its ids with

- baseline: ``set(json.loads(line)["id"] for line in f)`` (what a naive stage would do);
- vpd: ``vpd.store.read_done_ids`` (id-first fast path, 8-byte hashes in a sorted array);

and prints lines/s, peak MB and the ratios vpd/baseline. It also times membership lookups
and ``vpd data synth --n 1000`` end to end (CLI start-up included).

Run: ``.venv/bin/python bench/bench_store.py [--lines 1000000]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CHILD = r"""
import json, resource, sys, time
method, path = sys.argv[1], sys.argv[2]
from vpd.store import read_done_ids, stable_hash  # imports before the baseline RSS
import numpy as np
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
if method == "naive":
    with open(path, encoding="utf-8") as f:
        done = set(json.loads(line)["id"] for line in f)
else:
    done = read_done_ids(path)
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
probes = [f"q{i:07d}#{i % 5}" for i in range(0, 2_000_000, 20)]  # half present, half not
t1 = time.perf_counter()
hits = sum(p in done for p in probes)
lk = time.perf_counter() - t1
print(json.dumps({"n": len(done), "s": dt, "mb": (peak - base) / 1024,
                  "lookups_per_s": len(probes) / lk, "hits": hits}))
"""


def write_file(path: Path, lines: int) -> int:
    """Sample-like records: id first (as vpd writers do), a program, usage, timing."""
    program = (
        "def execute_command(image):\n    image_patch = ImagePatch(image)\n"
        "    shapes = image_patch.find('red shape')\n    return str(len(shapes))\n"
    )
    with open(path, "w", encoding="utf-8") as f:
        for i in range(lines):
            qid = f"q{i // 5:07d}"
            rec = {
                "id": f"{qid}#{i % 5}",
                "qid": qid,
                "k": i % 5,
                "program": program,
                "syntax": "viper",
                "model": "SmolLM2-135M-Instruct",
                "temperature": 0.7,
                "seed": i,
                "prompt_id": "viper-v1",
                "usage": {"prompt_tokens": 812, "completion_tokens": 64},
                "latency_s": 0.123,
            }
            f.write(json.dumps(rec, separators=(",", ":")) + "\n")
    return path.stat().st_size


def run_child(method: str, path: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, method, str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def bench_synth(tmp: Path) -> tuple[float, float]:
    vpd = shutil.which("vpd", path=str(Path(sys.executable).parent)) or "vpd"
    t0 = time.perf_counter()
    subprocess.run(
        [vpd, "data", "synth", "--out", str(tmp / "synth"), "--n", "1000", "--no-progress"],
        check=True,
        capture_output=True,
    )
    cli = time.perf_counter() - t0
    from vpd.data.synth import generate

    t0 = time.perf_counter()
    generate(tmp / "synth2", n=1000, seed=0)
    return cli, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="vpd-bench-store-"))
    try:
        path = tmp / "samples.jsonl"
        t0 = time.perf_counter()
        size = write_file(path, args.lines)
        print(
            f"wrote {args.lines:,} lines, {size / 1e6:.0f} MB ({size / args.lines:.0f} B/line) "
            f"in {time.perf_counter() - t0:.1f}s"
        )
        naive = run_child("naive", path)
        vpd = run_child("vpd", path)
        assert naive["n"] == vpd["n"] == args.lines and naive["hits"] == vpd["hits"]
        rows = [("baseline set(json.loads)", naive), ("vpd read_done_ids", vpd)]
        print(f"{'method':28s} {'lines/s':>12s} {'peak MB':>9s} {'lookups/s':>12s}")
        for name, r in rows:
            print(
                f"{name:28s} {args.lines / r['s']:12,.0f} {r['mb']:9.1f} "
                f"{r['lookups_per_s']:12,.0f}"
            )
        print(
            f"ratio vpd/baseline: speed x{naive['s'] / vpd['s']:.2f}, "
            f"memory x{vpd['mb'] / max(naive['mb'], 1e-9):.3f} "
            f"({naive['mb'] / max(vpd['mb'], 1e-3):.0f}x less), "
            f"lookups x{vpd['lookups_per_s'] / naive['lookups_per_s']:.2f}"
        )
        cli, gen = bench_synth(tmp)
        print(
            f"vpd data synth --n 1000: {cli:.2f}s via CLI (start-up included), "
            f"{gen:.2f}s in-process ({1000 / gen:,.0f} questions/s)"
        )
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
