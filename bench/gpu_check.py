"""``python -m bench.gpu_check …``: the command users type, kept; the study lives in :mod:`bench.studies.gpu_check`."""
from bench.studies.gpu_check import main

if __name__ == "__main__":
    raise SystemExit(main())
