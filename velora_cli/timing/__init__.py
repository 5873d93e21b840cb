"""Predicted step time: every op's FLOPs and bytes, and a per-op roofline over them.

    opcount.py    what every op of a step computes and moves (a dispatch mode over the meta step)
    flops.py      FLOP formulas: torch's where it has one, ours where not
    roofline.py   op costs -> seconds on a GPU from gpus.py (efficiencies labelled as assumptions,
                  or calibrated per chip on the validation corpus, with the rows held out)
    step_time.py  a row's predicted step time and tokens/s

May import: measure, emulation, methods and the leaves.
"""
