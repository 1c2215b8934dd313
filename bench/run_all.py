"""Run every ``bench/bench_*.py`` in turn, each in its own process, printing
its output as it goes. Exits non-zero when one of them fails.

    .venv/bin/python bench/run_all.py            # all of them
    .venv/bin/python bench/run_all.py lock sandbox   # only these
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent


def main(argv: list[str]) -> int:
    scripts = sorted(BENCH.glob("bench_*.py"))
    if argv:
        wanted = {name.removeprefix("bench_").removesuffix(".py") for name in argv}
        unknown = wanted - {s.stem.removeprefix("bench_") for s in scripts}
        if unknown:
            print(f"run_all: no such benchmark: {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in wanted]
    results: list[tuple[str, int, float]] = []
    for script in scripts:
        print(f"=== {script.name}", flush=True)
        t0 = time.monotonic()
        code = subprocess.run([sys.executable, str(script)], cwd=ROOT, check=False).returncode
        elapsed = time.monotonic() - t0
        results.append((script.name, code, elapsed))
        print(
            f"=== {script.name}: {'ok' if code == 0 else f'FAILED (exit {code})'} in {elapsed:.1f} s\n",
            flush=True,
        )
    print("summary:")
    for name, code, elapsed in results:
        print(f"  {name:<28} {'ok' if code == 0 else f'FAILED (exit {code})':<18} {elapsed:7.1f} s")
    failed = [name for name, code, _ in results if code != 0]
    if failed:
        print(f"run_all: {len(failed)} benchmark(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
