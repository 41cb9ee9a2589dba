"""bench — the benchmark harness: sweeps of (solver, steps) cells with honest timing and quality metrics.

    python -m bench.run                       # a quick default sweep on the analytic gmm2d model
    python -m bench.run --model ddpm_cifar --solvers ddim,dpmpp --steps 1,10,50,1000
    python -m bench.report runs/gmm2d         # rebuild the report from the results alone
"""
__version__ = "0.1.0"
