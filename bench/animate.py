"""``python -m bench.animate …``: the command users type, kept; the study lives in :mod:`bench.studies.animate`."""
from bench.studies.animate import main

if __name__ == "__main__":
    raise SystemExit(main())
