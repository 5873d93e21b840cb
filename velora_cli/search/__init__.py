"""The tune: which configuration is best under a memory budget, searched, probed and verified.

    tuner.py          the search itself: decision only, no torch; takes ``estimate``/``measure``/
                      ``probe`` callables and returns the recommendation
    candidates.py     what is searched: `Candidate`, the search space, layouts a step cannot run
    settings.py       `TuneSettings` from the command line, and a candidate's `StepSpec`
    autotune.py       ``velora tune`` end to end: space, backends, probes, journal, the document
    world_sizes.py    ``--world-size 1,2,4,8``: one tune per GPU count, the fewest that fit
    estimator.py      the tune's ``estimate(c)``/``measure(c)`` on the backends, with floors
    prober.py, probes.py, data.py   accuracy probes (gradient fidelity, a short training run) and
                      the probe text
    journal.py, resume.py   finished results as JSON lines; which journal ``--resume`` continues

May import: runs, exports, profiling, configs, report, parallel, estimate and everything below
(the layer contract in pyproject's ``[tool.importlinter]``); never commands or cli.
"""
