"""``python -m bench.pc_study …``: the command users type, kept; the study lives in :mod:`bench.studies.pc_study`."""
from bench.studies.pc_study import main

if __name__ == "__main__":
    raise SystemExit(main())
