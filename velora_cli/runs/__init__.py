"""The user's real training run: the plan checked while it trains, and what it measured.

    callback.py    `VeloraCallback` for ``transformers.Trainer``: checks the plan, records memory
    plan_check.py  was the model prepared as the plan says?
    memory.py      the run's real peak memory, interval by interval
    record.py      the run record (measured beside predicted), written atomically
    compare.py     ``velora profile --compare RUN``: predict what a recorded run ran

May import: profiling, configs, report and everything below; not search, exports or commands.
"""
