"""``python -m bench.memory …``: the command users type, kept; the study lives in :mod:`bench.studies.memory`."""
from bench.studies.memory import main

if __name__ == "__main__":
    raise SystemExit(main())
