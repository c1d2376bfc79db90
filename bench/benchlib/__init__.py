"""The measuring machinery of bench/, one job a module:

    env        the device, the dtype, library versions, the commit; which paths can run here (Unavailable)
    timing     timing a step (CUDA events, L2 flush), peak memory, rotating inputs, FLOP counts, device ceilings
    compiles   Triton compilations: counting each kernel's compiled variants; the warm-up's compile-only mode
    targets    the named targets and how a run's rows are turned into ratios and verdicts
    results    the results file (rewritten after every record, shared by the pytest processes of one run)
    suite      one per pytest process: gates each case on the deadline, times it, records it
    cases      what the bench files share: parametrization (target / cost marks), inputs, baseline helpers
    models     building model parts for the model-level cases

Every bench module builds, per case and implementation, a zero-argument `step` (one iteration on rotated inputs)
and hands it to `Suite.run`, which times it, records it into the run's results and into pytest-benchmark's
`extra_info`. Ratios between our path and the baselines are recomputed whenever a case gains an entry, so they
hold whatever order the tests run in.
"""
