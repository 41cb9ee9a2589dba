"""``python -m bench.ode_agreement …``: the command users type, kept; the study lives in :mod:`bench.studies.ode_agreement`."""
from bench.studies.ode_agreement import main

if __name__ == "__main__":
    raise SystemExit(main())
