"""``python -m bench.low_nfe …``: the command users type; the study lives in :mod:`bench.studies.low_nfe`."""
from bench.studies.low_nfe import main

if __name__ == "__main__":
    raise SystemExit(main())
