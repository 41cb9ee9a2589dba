"""Studies beside the harness: solver overhead and end-to-end throughput against diffusers (``perf``,
``perf_studies``, ``common``, ``peers``), the GPU checks (``gpu_check``, ``gpu_suite.sh``), predictor–corrector
against its predictor (``pc_study``), the deterministic samplers' agreement (``ode_agreement``), a sweep's
peak memory against its sample count (``memory``) and the animations (``animate``).  Each runs as
``python -m bench.<name>`` (a thin shim in :mod:`bench`)."""
