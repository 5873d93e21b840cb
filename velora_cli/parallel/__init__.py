"""One training step spread over ranks: DDP or FSDP2, estimated per rank or measured with N real
processes. Plain names and checks here (no torch import); the engines' code in the modules:

    shard.py      wrap a prepared model as every rank does (DDP, or FSDP2 `fully_shard` per
                  decoder layer plus the root), and the optimizer over its (sharded) parameters
    roles.py      what the memory tracker cannot see alone: FSDP2's unsharded parameters, DDP's
                  gradient buckets, communication buffers
    rank_step.py  one rank's tracked step -> its row (shared by the estimate and real ranks)
    fake.py       the estimate's world: torch's fake process group and fake CPU tensors
    estimate.py   the per-rank estimate backend (one process, ranks one after another)
    launch.py     N real processes (gloo on CPU, NCCL on GPUs) with timeouts and clean-up
    worker.py     what each of those processes runs
    job.py        per-rank rows -> one row of the profile (peak = the largest rank's)

The batch is per rank (``--batch-size`` per GPU, as in the HF Trainer): the job's global batch is
``world_size × batch_size``.
"""

from velora_cli.measure.layout import FSDP, PARALLEL, layout_errors, layout_label

__all__ = ["FSDP", "PARALLEL", "layout_errors", "layout_label"]
