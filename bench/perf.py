"""``python -m bench.perf …``: the command users type, kept; the study lives in :mod:`bench.studies.perf`."""
from bench.studies.perf import main

if __name__ == "__main__":
    raise SystemExit(main())
