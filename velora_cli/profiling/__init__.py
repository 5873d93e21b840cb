"""``velora profile``'s core: plan the rows, validate them, measure each on a backend, save as
we go (commands/profile.py parses and renders around it).

    profiler.py    rows from the strategies, the backends, the document written row by row
    num_groups.py  the default sub-token choices, per model

May import: parallel, estimate and everything below; not search, runs, exports or commands.
"""
