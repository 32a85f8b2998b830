"""Hold the locks of some runs of a study folder, so that `sntfx study` processes sharing it skip them.

    python benchmarks/results/snt-research/04-confirm/hold_runs.py \
        benchmarks/results/snt-research/04-confirm/smallvgg snt-lin-branch snt-linear

A study process computes only the runs whose lock (``.lock`` in the run's
folder, an ``flock``) it can take; this holds the named methods' locks, seeds 0-4 (the
confirmation's) of every model in the folder, until it is stopped (Ctrl-C or kill), so
that the confirmation's processes go on with the other runs. Used while the
cost model that decides those runs' layers is not settled (see README.md).
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        sys.exit(__doc__)
    folder, methods = Path(argv[0]), argv[1:]
    seeds = [f"seed{s}" for s in range(5)]
    models = [p for p in (folder / "runs").iterdir() if p.is_dir()] if (folder / "runs").is_dir() else []
    if not models:
        sys.exit(f"{folder}: no runs/ folder with models in it; start the study once first")
    fds = []
    for model in models:
        for method in methods:
            for seed in seeds:
                run = model / method / seed
                run.mkdir(parents=True, exist_ok=True)
                fd = os.open(run / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    print(f"{run}: a process is computing it; not held")
                    continue
                fds.append(fd)
    print(f"holding {len(fds)} run locks; stop this process to release them", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main(sys.argv[1:])
