"""The long fuzz campaign (`make fuzz`): mutated inputs through every command, one oracle.

    .venv/bin/python scripts/fuzz.py --cases 5000 --seed 1
    .venv/bin/python scripts/fuzz.py --seed 1 --only 123 --keep      # one case again, files kept

Prints counts by outcome (exit 0, 1, 2, other) and by kind of failure (tracebacks, internal
errors, hangs, partial outputs, changed inputs, code executed, ...), then the first failing
case of each distinct failure with its command line. Exits 1 when any case failed.
The generator and the oracle live in tests/fuzzing.py (shared with tests/test_fuzz.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import fuzzing  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=5000, help="number of cases (default 5000)")
    ap.add_argument("--seed", type=int, default=None, help="campaign seed (default: a fresh one, printed)")
    ap.add_argument("--start", type=int, default=0, help="first case index (default 0)")
    ap.add_argument("--only", type=int, action="append", default=None,
                    help="run only this case index (repeatable): reproduce a failure")
    ap.add_argument("--family", action="append", choices=sorted(fuzzing.FAMILIES), default=None,
                    help="draw cases from these families only (repeatable; changes which case an index is)")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                    help="worker processes (default: up to 2)")
    ap.add_argument("--budget", type=float, default=fuzzing.DEFAULT_BUDGET,
                    help="wall-clock seconds per case before it counts as a hang")
    ap.add_argument("--work", type=Path, default=None,
                    help="working folder (default: a temporary one, removed unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the folders of failing cases")
    ap.add_argument("--list", type=int, default=30, help="distinct failures to list (default 30)")
    ap.add_argument("--json", type=Path, default=None, help="also write every case record to this file")
    args = ap.parse_args(argv)

    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(3), "big")
    work = args.work or Path(tempfile.mkdtemp(prefix="deepsigns-fuzz-"))
    work.mkdir(parents=True, exist_ok=True)
    indices = args.only or list(range(args.start, args.start + args.cases))
    print(f"fuzz: seed {seed}, {len(indices)} case(s), {args.workers} worker(s), budget {args.budget:g} s, "
          f"work folder {work}", flush=True)
    t0 = time.monotonic()
    import torch

    torch.set_num_threads(1)
    artefacts = fuzzing.build_artefacts(work / "artefacts")
    print(f"fuzz: base artefacts ready in {time.monotonic() - t0:.1f} s", flush=True)

    done = [0]
    step = max(1, len(indices) // 20)

    def progress(rec: dict) -> None:
        done[0] += 1
        if rec["failures"] and len(indices) <= 5:
            print(f"  case {rec['index']}: {rec['outcome']} {rec['failures']} {rec['detail'][:200]}")
        if done[0] % step == 0 or done[0] == len(indices):
            print(f"  {done[0]}/{len(indices)} cases, {time.monotonic() - t1:.0f} s", file=sys.stderr, flush=True)

    t1 = time.monotonic()
    results = fuzzing.run_campaign(seed, indices, artefacts, work / "cases", budget=args.budget,
                                   workers=args.workers, keep=args.keep, families=args.family,
                                   on_result=progress)
    elapsed = time.monotonic() - t1
    print()
    print(fuzzing.format_summary(results, elapsed))
    if any(r["failures"] for r in results):
        print()
        print(fuzzing.format_failures(results, limit=args.list))
    if len(indices) <= 5:
        for r in results:
            print(f"\ncase {r['index']} ({r['family']}: {r['mutation']})\n  $ {r.get('command', '')}"
                  f"\n  outcome {r['outcome']}, failures {r['failures']}\n  {r['detail']}"
                  f"\n  --- stderr\n{r.get('stderr', '')}  --- stdout\n{r.get('stdout', '')}")
            if args.keep and r["failures"]:
                print(f"  files kept in {r['folder']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    print(f"\nreproduce one case: .venv/bin/python scripts/fuzz.py --seed {seed} --only INDEX --keep")
    if args.work is None and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if any(r["failures"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
