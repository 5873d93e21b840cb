"""Write docs/validation.md and the README's accuracy table from `velora validate`, generated.

    python benchmarks/validation_table.py                      # run the whole corpus, write the page
    python benchmarks/validation_table.py --json run.json      # from a saved `velora validate --format json`

The page's prose (what is compared, how to reproduce it, what is not reproduced and why) is
written here; every figure comes from the validate document (report/validate.py renders the
tables). The README's table (between its ``validate:begin`` and ``validate:end`` markers) is the
summary per source, GPU and tier. The whole corpus takes minutes on meta tensors.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from velora_cli.report.validate import render  # noqa: E402

HEAD = """# How close velora's estimates are to real GPUs

`velora validate` predicts every published GPU measurement in [`validation/published/`](../validation/README.md)
with the estimate backend (meta tensors, no GPU), for the run's own GPU, CUDA version and training
loop, and compares it with what the source measured, tier by tier:

- **allocated**: `torch.cuda.max_memory_allocated()` (tensor bytes), bound ±3 %;
- **reserved**: `torch.cuda.max_memory_reserved()` (the caching allocator's pool), bound ±5 %;
- **device**: what the GPU shows used (reserved + the CUDA context), bound ±5 % and never more
  than 2 % low: low is the side that ends in an out-of-memory;
- **tokens/s**: training throughput, bound ±15 % (fitcheck timed its step: tokens/s is derived
  from its `step_seconds`).

Errors are signed, `(predicted − measured) / measured`: negative means velora predicted too little.
The exit code is 1 when an expressible case is out of bounds, so CI can gate on it.

## Reproduce

```bash
velora validate
velora validate --source fitcheck_t4 --format json -o validate.json
velora validate --case flash-none-fp16-adamw-r32-ckpt-HuggingFaceTB_SmolLM2-135M-bs2-seq512
```

The whole corpus runs offline in about 3.5 minutes on this project's 2-core machine, idle (228
cases, 129 of them predicted; model configs come from the corpus). The test suite runs a few small cases
(`tests/test_validate.py`) and holds ten, one of every source, GPU and memory mechanism (K/V
repeated before SDPA, eager attention, QLoRA, 4096 tokens, a holdout and an out-of-memory
boundary row of fitcheck's T4; the guide's V100 with and without fp16 AMP and checkpointing), to
the memory bounds, in CI; the whole corpus, with its memory tiers held to their bounds, is an
opt-in test, `VELORA_VALIDATE_ALL=1 python -m pytest tests/test_validate.py -k whole`, which
fails today for the cases named below.

This page is generated from that output:

```bash
python benchmarks/validation_table.py
```

## Results

"""

TAIL = """
## What is not reproduced, and why

- **Step time: what is calibrated, and what is left.** The corpus calibrates the roofline where
  the cases fitted and the cases held out agree (`CALIBRATIONS` in `velora_cli/timing/roofline.py`,
  each value with its rows): on the T4, fitted on fitcheck's 57 timed rows of 2026-09-15/16 (five
  models), fp16 tensor-core GEMMs at 0.35 of the 65 TFLOP/s peak (assumed 0.80; a plausible
  reason, not measured: the peak is at the boost clock and the card is held to 70 W), the memory-efficient
  SDPA kernel at 0.17 (fp16) / 0.25 (fp32) and 13 µs per kernel (eager PyTorch's per-op host cost,
  seen in the small models' steps); fp32 GEMMs and memory-bound ops stay as assumed. Its 12 rows
  of 2026-09-21 (six other models) were held out: −7.6 … +12.4 % (mean |err| 6.4 %) with the
  calibration, +14 … +65 % before. On the V100, the guide's four fp16-AMP rows imply fp16
  tensor-core GEMMs at 0.45 (each row left out of the fit in turn: −10 … +9 %), the same
  direction as the T4's independent source. The V100's fp32 GEMMs run at 0.916 of the peak, a
  published torch.mm measurement of the chip, not a fit (below). Left out of bounds: T4 rows of
  the 2026-09-15 and -16 sessions spread −17.5 … +20 % (fitcheck's repeats of one setup differ by
  up to 11.7 % in step time, and the two sessions by about 12 points: below).
- `benchmarks/roofline_holdout.py` refits these values and prints the held-out error;
  `benchmarks/roofline_calibration.py` prints, per GPU and GEMM precision, what the timed cases
  imply for each op class relative to the efficiencies in use (section above).
- **The transformers guide (V100), fp16 AMP at 4 x 512 without checkpointing: −2.7 % device.**
  The other eight rows are within −1.7 … +0.6 % (see below what made them match); this one keeps
  about 380 MiB more than the estimate (AMP's GradScaler, the fp16 casts of the era's autocast,
  or the allocator of torch 1.10: not found).
- **LitGPT (A100) and PEFT's method comparison (L40S).** Whole-run peaks over real, variable-length
  data with evaluation passes (PEFT), and LitGPT's own model code with unstated LoRA settings:
  not a single step that velora could rebuild; they stay in the corpus, marked with what is missing.
- **Reserved, fitcheck's 2026-09-21 QLoRA rows on transformers 5.0.0 (Qwen2.5-Coder-1.5B −12.8 %
  and −10.2 %, its boundary row −9.6 % device).** transformers 5.0's loader submits every
  checkpoint tensor to a thread pool that materializes it on the GPU, while the main thread
  quantizes them one by one; the workers run ahead by as much as the timing allows, so up to the
  whole model's fp16 weights sit on the GPU before they are quantized. transformers PR #44576
  ("Disable async loading when quantizing on the fly", merged 2026-03-10, fixing issue #44387)
  made that loading sequential (issue #43032 reported the same on 5.0.0.dev0: full-precision
  tensors materialized on the GPU before quantization, an OOM where 4.48 loaded); its table shows Qwen2.5-7B loading with 5.46 GB allocated and
  13.47 GB reserved before the fix. The replay loads sequentially (the loader after the fix): the
  run's figure lies between that (4544 MiB for 74c48249f5ad) and the bound where every fp16
  weight is on the GPU before any is quantized (6520 MiB; measured 5212 MiB). Which one a run
  gets depends on timing, so neither is taken as the prediction.
- Each missing feature is one value in the setup mapping's table
  (`velora_cli/validation/mapping.py`); when velora learns it, the cases that need it are
  predicted on the next run.

## What made the memory tiers match

- **The loss of the run's transformers release (fms-acceleration's A100 rows).** The estimate
  ran the installed transformers (5.x), whose `ForCausalLMLoss` upcasts the logits to fp32 and
  pads the labels: at the loss's backward the fp32 log-softmax, its gradient and its result, 12
  bytes per logit. The recorded releases computed it otherwise (read in their wheels;
  `velora_cli/measure/loss_path.py` lists the files): GPTBigCode through 4.48 copied the shifted
  logits and took `CrossEntropyLoss` in bf16, 3 x 2 bytes per logit (on santacoder's 49,153
  entries at 8 x 2048 tokens, 4.83 GB less); Llama/Mistral/Mixtral/Granite before they called
  `loss_function` upcast in place and copied the shifted fp32 logits (the same 12 bytes); 4.46-4.48's
  `ForCausalLMLoss` did the copy while the model kept its bf16 logits (14 bytes, in the forward).
  And GPTBigCode 4.39-4.52 kept each block's `present` (a view of its whole `c_attn` output)
  while `use_cache` was on, its config's default, with no check for gradient checkpointing (4.53
  added one): under reentrant checkpointing that is 24 x (8 x 2048) x 2304 x 2 = 1.81 GB more at
  the loss. The mapping passes the record's `versions.transformers` (`StepSpec.transformers_version`)
  and the step wraps the model's forward with that release's loss and presents. santacoder went
  from +10.8 / +19.9 % allocated (bs4 / bs8) to +0.01 / −0.01 % (bs4's peak is now the optimizer
  step, bs8's the forward's loss); Mistral and PowerLM peak elsewhere or hold the same bytes and
  did not move. santacoder's device figures stay +0.6 … +12.8 %: the two sessions that ran the
  same setup read nvidia-smi 1.2 GB apart with identical allocated peaks, and the A100's context
  is the unmeasured 1 GiB default.
- **fitcheck's SDPA rows repeat K/V before SDPA.** Its harness `repeat_interleave`s K/V to the
  query heads (a shim that also drops `enable_gqa`), so torch runs the memory-efficient kernel on
  the T4 and keeps the repeated K/V. transformers 5 instead passes `enable_gqa`, which torch
  2.13's memory-efficient kernel does not take, so a plain run gets SDPA's math path there. The
  mapping sets `--repeat-kv` (`StepSpec.repeat_kv`) for these rows; before, they were planned on
  the math path and came out +18 to +43 % allocated at 2048 to 4096 tokens.
- **fitcheck's loop keeps the model output alive.** Its step is
  `out = model(input_ids=batch, labels=batch); out.loss.backward(); optimizer.step()`, so the
  fp16 logits (tokens x vocabulary) stay allocated through the backward, where the peak is.
  velora's step drops them once the loss is taken (as the HF Trainer does); the corpus records
  the loop (`setup.loop.holds_outputs`) and the estimate then holds them too
  (`StepSpec.keep_outputs`). Without it the allocated peak was low by exactly one logits tensor
  (9 to 12 % on SmolLM2-135M).
- **No `empty_cache()` before measuring.** fitcheck resets the peak after one warm-up step but
  keeps the pool the warm-up grew; the allocator replay follows that schedule
  (`setup.loop`: one warm-up step, one measured step, no `empty_cache`).
- **What is left.** The allocated peak of every case is low by exactly one `(batch, seq)` int64
  tensor (8 KiB to 32 KiB): fitcheck's `batch` of token ids (passed as `input_ids` and as `labels`)
  lives on the GPU, and the estimate's tracker counts the model, the optimizer state and what the
  step allocates, not the micro-batch it is handed. The two Qwen2.5-1.5B cases are 2 MiB lower
  still, the size of one (2048 tokens x 256) fp32 tensor, i.e. a k/v-projection output in fp32
  (Qwen's K/V width is 2 heads x 128) — not explained yet. Reserved: Qwen2.5-1.5B +22 MiB, and
  SmolLM2-360M at 4096 tokens −16 MiB (one segment; −0.4 %, inside the bounds but on the low side).
- **cudaMalloc places each new segment below the earlier ones.** Among free blocks of one size
  the caching allocator's best fit takes the one at the lowest address (`BlockComparatorSize` in
  c10/cuda/CUDACachingAllocator.cpp orders by stream, size, then `ptr`), so which of two equal
  blocks a request splits, and so what can merge again later, depends on where the driver put
  their segments. Eager attention leaves several free blocks of one size (each layer's score
  tensors), and the replay, which gave later segments higher addresses, split the older one:
  fitcheck's twelve eager LoRA rows came out one (batch, heads, seq, seq) score tensor off
  (−512 … +256 MiB reserved, −8.9 … +3.3 %). With each new segment below the earlier ones
  (`allocator.caching.SEGMENTS_GROW_DOWN`) all twelve are within −12 … +4 MiB (−0.1 … +0.1 %).
  The order is the CUDA driver's and not documented: it is inferred from these twelve
  measurements (T4, torch 2.10 and 2.14), not read from a source; `tests/test_allocator_gpu.py`
  replays a trace on which the two orders differ (100 vs 150 MiB reserved) on a real GPU. It also
  moved QLoRA rows: deepseek-coder-1.3b eager −1.8 → +1.0 %, Qwen2.5-1.5B eager 1 x 2048 (torch
  2.10) +0.0 → −1.3 % reserved, and the guide's V100 rows −2.7 … +0.6 → −2.7 … +0.1 % device.
- **CUDA's softmax backward takes a temporary the size of the scores.**
  `softmax_backward_cuda_out` (aten/src/ATen/native/cuda/SoftMax.cu) computes
  `Tensor tmp = grad * output;` before its kernel: with HF eager attention (softmax with
  `dtype=torch.float32`) one fp32 (B, H, N, N) tensor, live with the saved probabilities, their
  gradient and the new input gradient; the CPU and meta kernels take none. The estimate's tracker
  now counts it (`emulation.softmax.cuda_kernel_temporaries`). fitcheck's eager rows at 1024 to
  4096 tokens were low by exactly that tensor (256 MiB at 2 x 32 heads x 1024², 1 GiB at
  2 x 32 x 2048²: −9 % to −19.6 % allocated).
- **Gradients zeroed in place (the guide's Trainer).** transformers' Trainer of v4.18–4.26 calls
  `model.zero_grad()`, and torch < 2.0 defaults to `set_to_none=False`: the gradients stay
  allocated through every later forward (torch 2.0 changed the default, pytorch#92731; the
  Trainer passes `set_to_none=True` itself since 4.27, transformers#22136). The corpus records it
  (`setup.loop.zero_grad_set_to_none`), the step follows it (`StepSpec.zero_grad_set_to_none`),
  and the allocator replay puts the first step's gradients where its backward made them.
  +1.26 GiB for BERT-large in fp32.
- **torch < 1.11 saved softmax's input.** SoftmaxBackward kept `self` (only for its dtype) until
  pytorch#66018 (2021-10-01, after the 1.10 branch; issue #64000): one more (B, H, N, N) tensor per
  layer, 1.5 GiB for BERT-large at 4 x 512. The guide states no torch version; its nvidia-smi
  capture is dated 2022-01, when 1.10 was current (`setup.torch_version`, `StepSpec.torch_version`).
- **Autocast's weight-cast cache with checkpointing.** Autocast keeps the fp16 cast of every
  trained fp32 weight until its region ends (`cached_cast` in aten/src/ATen/autocast_mode.cpp,
  whatever the grad mode). Without checkpointing each linear saves that cast anyway; with it, the
  checkpointed layers save nothing, yet the cache holds ~600 MiB of BERT-large casts to the end of
  the forward. The estimate's autocast now caches them inside the step's autocast region.
  Together with the softmax backward's temporary these took the guide's rows from −21 … +1.4 %
  to −2.7 … +0.6 % device (mean |error| 11.8 % to 0.9 %).
- **What loading left in the pool (QLoRA).** fitcheck never calls `empty_cache()`, and
  `reset_peak_memory_stats()` rebases the reserved peak to what is reserved at that moment, so
  the reserved peak starts from what loading reserved. transformers' bitsandbytes quantizer puts
  each checkpoint tensor on the GPU in the load dtype before bitsandbytes quantizes it
  (`Params4bit._quantize` → `functional.quantize_4bit` allocates the packed codes and the absmax
  while the fp16 tensor is live, then it is dropped), and peft's
  `prepare_model_for_kbit_training` then replaces every other fp16 parameter (embeddings, norms,
  biases) by an fp32 copy (`param.data = param.data.to(torch.float32)`). The freed fp16 blocks
  stay in segments the packed weights and fp32 copies now pin, so a step's large tensors need new
  segments. The allocator replay now loads a QLoRA model that way
  (`allocator.device_memory.LoadPlan`, built by `methods.quant.load_transients`). On the 55
  fitcheck QLoRA cases with a reserved figure: mean |error| 2.78 % → 2.40 %, mean −1.48 % →
  −0.90 %, cases outside ±5 % 9 → 5; device below −2 %: 20 → 17 of 63.
- **The CUDA context for the run's CUDA version.** The device figure adds the context measured
  on the same GPU die and CUDA version where there is one (`gpus.GpuSpec.cuda_context`): 140.875
  MiB on the T4 with CUDA 12.8 / 13.0 (the same figure as without a version, since the T4 was
  measured), and for the transformers guide's V100 on CUDA 11.2 the 1343 MiB it measured (eager
  module loading) instead of the flat 1 GiB default, once those cases become expressible.

## Step time on the V100 and the T4: what was found (issue 23)

- **The V100's fp32 GEMMs run at 0.916 of the fp32 peak, not the assumed 0.80.** The guide's
  fp32 steps are almost all GEMMs on CUDA cores (Volta has no fp32 tensor cores; BERT-large at
  4 x 512 is 2048 x 1024 x 1024 and 2048 x 4096 x 1024 products, 79 % of the step as predicted
  before).
  A published measurement of the chip, not the guide, sets the figure: `torch.mm` of two
  8192 x 8192 fp32 matrices on a Tesla V100-SXM2-16GB ran at 14.38 TFLOP/s
  (zzc0721/torch-performance-test-data, issue #140, torch 2.7.0+cu128; its `test.py` times 30
  products back to back after 6 warm-up ones), 14.38 / 15.7 = 0.916. From that one point the GEMM
  shape model reproduces the same run's other sizes within 6 % (1024³ 0.672 vs 0.673 measured,
  2048³ 0.768 vs 0.810, 4096³ 0.902 vs 0.882: `tests/test_roofline_measured.py`), so the shape
  model was right and the large-GEMM efficiency was not. It is in `CALIBRATIONS["GV100"]` with its
  source; the guide's fp32 rows, not used to set it, check it:

  | case | before | after |
  |:---|---:|---:|
  | vanilla-bs4 | −18.6 % | −9.7 % |
  | bs1-ga4 | −22.1 % | −13.8 % |
  | bs1-ga4-gc | −22.0 % | −13.4 % |
  | adafactor-bs4 | −13.2 % | −4.1 % |
  | bnb-adam8bit-bs4 | −15.4 % | −5.4 % |

  (`velora validate --case hf-guide-v100/`, tokens/s; the fp16-AMP rows and every memory figure
  are unchanged.) The short-K GEMM penalty tried before is not needed.
- **The same source's T4 figure is not adopted.** Its T4 entries (database.md: 4.43 TFLOP/s on
  Kaggle, torch 2.6; 4.17 on Colab, torch 2.8; the best of its sizes) are 0.52–0.55 of the 8.1
  TFLOP/s peak. Applied to the T4's fp32 GEMMs (in fitcheck's rows: LoRA's adapters, skinny
  products whose time the shape model sets, 5–52 % of a predicted step, median 13 %), fitcheck's
  T4 rows get worse: mean |error| 8.6 → 9.9 %, 17 rows outside ±15 % instead of 11 (a
  re-pricing of the 69 timed rows' counted ops by class, which counts 11 outside today where
  validate counts 9); refitted with fp32 held at 0.547, the 2026-09-21 held-out rows
  go from −7.6 … +12.4 % to −16.1 … +13.4 %; left free, the fit keeps fp32 at 0.995 of the
  assumed time. The corpus and the square-GEMM benchmark disagree for the T4's skinny fp32 GEMMs;
  fp32 on the T4 stays assumed.
- **Not modelled in the guide's step, all small:** the Trainer of v4.18–4.26 clips gradients
  (`max_grad_norm` 1.0 by default: a norm per parameter and an in-place scale, about 2 % of the
  fp32 step by their bytes and launches); BERT of that era adds the extended attention mask to
  the scores even when it is all ones (one more pass over the (4, 16, 512, 512) fp32 scores per
  layer, about 1 %; velora's step, today's transformers BERT, adds none); and `adamw_hf` is
  transformers' own AdamW, planned as torch's for-loop AdamW (7 kernels and 18 bytes per
  parameter of traffic against torch's 8 and 20, about 1 % less with the launches). All three
  estimated from the kernels' bytes, not measured; together about +2 % on the predicted step.
  The guide's samples/s is the Trainer's `train_samples_per_second`, 512 samples over the whole
  `train()` (the first step's start-up included), so the steady step is a little faster than the
  corpus's `step_seconds`. Neither explains the remaining −4 … −14 % (predicted slower than
  measured): both would widen it. It is largest on the bs 1 rows (−13 … −14 %), whose GEMMs are
  512 tokens tall, below the sizes the benchmark covers (square, 1024 and up): the shape model's
  penalty for short GEMMs on the V100's CUDA cores is the likely place, not established.
- **fitcheck's T4 rows out of bounds are its own run-to-run spread and a session offset.**
  - *Repeats.* fitcheck's sweep runs one setup three times, each in a fresh process, "as
    allocator noise-floor evidence" (its `scripts/calibration_sweep.py`, `REPEAT =
    SmolLM2-1.7B, 4, 1024`). In the 2026-09-15 session the three step times are 4.84 / 4.58 /
    4.34 s (eager LoRA), 3.71 / 3.34 / 3.36 s (SDPA LoRA), 6.79 / 6.81 / 6.11 s (eager QLoRA) and
    5.13 / 5.03 / 5.05 s (SDPA QLoRA): 11.7 %, 10.9 %, 11.5 % and 1.9 % apart. One prediction per
    setup cannot be within ±15 % of all three when they spread that much and the session runs
    slow: four of the eight 09-15 rows out of bounds are runs of a repeated setup whose other
    runs are within bounds or nearer (+20.1 % against +13.6 % and +7.6 %; +20.2 % against +8.4 % and +9.0 %;
    +18.7 % and +19.0 % against +6.7 %).
  - *Session.* The 09-15 rows are not repeats of 09-01/09-16 setups: the only setups timed in two
    sessions are TinyLlama QLoRA 2 x 1024 (eager 2.03 s on 09-15, 2.07 s on 09-16; SDPA 1.76 s
    and 1.53 s: 2 % and 15 % apart), and the sessions ran different libraries (09-15: torch
    2.14.0+cu130, transformers 5.17, peft 0.20; 09-16 and 09-21: torch 2.10.0+cu128,
    transformers 5.0, peft 0.19.1) under the same harness (`scripts/measure.py`: one warm-up
    step, one timed step). Against one calibration the 09-15 rows come out +6.5 % on average
    (median +8.0 %, 40 rows), the 09-16 rows −5.5 % (median −7.3 %, 17 rows), the held-out 09-21
    rows +2.5 %: about 12 points between two sessions of the same harness on the same GPU model.
    The calibration (fitted on 09-15 and 09-16 together) sits between them, which leaves 09-15's
    slowest runs above +15 % and 09-16's Qwen2.5-1.5B 1 x 2048 SDPA row at −17.5 %. Which of the
    version change, the host or the card's clocks (a 70 W T4 throttles) makes 09-15 slower is not
    in the data; a per-session factor would be a constant fitted to pass, so none is applied.
  - *What validate shows.* A case whose setup the source ran more than once now carries
    `repeats` in the JSON (the runs, their measured tokens/s min/median/max, the spread, and the
    prediction's error against the median and against the runs' range) and a table in the text
    formats. It is information: the bounds and the pass/fail verdict stay each run's own. The four
    09-15 SmolLM2-1.7B setups are predicted +6.7 %, +7.6 %, +8.4 % and +12.6 % from the nearest
    of their runs.
"""


TIER_NAMES = {"allocated_bytes": "allocated", "reserved_bytes": "reserved",
              "device_bytes": "device", "tokens_per_second": "tokens/s"}  # fmt: skip
BEGIN, END = "<!-- validate:begin -->", "<!-- validate:end -->"


def calibration(document: dict) -> str:
    """The efficiencies the timed cases imply (benchmarks/roofline_calibration.py)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from roofline_calibration import report

    body = report(document).replace("## ", "##### ")
    return (
        "\n#### Step time: the efficiencies the timed cases imply, per op class\n\n"
        "From `python benchmarks/roofline_calibration.py validate.json`: per GPU and GEMM "
        "precision, one factor for the GEMMs (and fused attention) and one for the memory-bound "
        "ops, fitted over the timed cases (measured ≈ Σ factor × predicted seconds of the "
        "class); the implied efficiency is the assumed one over the factor.\n\n" + body + "\n"
    )


def readme_table(document: dict) -> str:
    """The README's table: per source and GPU, each tier's cases, mean |error|, signed range and
    how many were predicted low."""
    lines = [
        "| source | GPU | tier | cases | mean \\|err\\| | signed range | under-predicted |",
        "|:---|:---|:---|---:|---:|---:|---:|",
    ]
    for group in document["summary"].values():
        for tier, s in group["tiers"].items():
            lines.append(
                f"| {group['source']} | {group['gpu']} | {TIER_NAMES.get(tier, tier)} | "
                f"{s['cases']} | {s['mean_abs_error']:.1%} | {s['min_error']:+.1%} … "
                f"{s['max_error']:+.1%} | {s['under_predicted']} |"
            )
    cases = len(document["cases"])
    predicted = sum(1 for c in document["cases"] if c["expressible"])
    lines.append("")
    lines.append(f"({cases} published cases, {predicted} of them expressible and predicted.)")
    return "\n".join(lines)


def update_readme(document: dict, readme: Path = ROOT / "README.md") -> None:
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme} has no {BEGIN} ... {END} block to fill")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{readme_table(document)}\n{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="a saved `velora validate --format json` document")
    parser.add_argument("--out", default=str(ROOT / "docs" / "validation.md"))
    parser.add_argument("--no-readme", action="store_true", help="leave README.md as it is")
    args = parser.parse_args()
    if args.json:
        document = json.loads(Path(args.json).read_text())
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "validate.json"
            command = [sys.executable, "-m", "velora_cli", "validate", "--format", "json",
                       "-o", str(path)]  # fmt: skip
            subprocess.run(command, cwd=ROOT, check=False)  # exit 1 = out of bounds, still written
            document = json.loads(path.read_text())
    document.setdefault("passed", False)
    text = (
        HEAD + render(document, "markdown").replace("### ", "#### ") + calibration(document) + TAIL
    )
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
    if not args.no_readme:
        update_readme(document)
        print("updated README.md's accuracy table")


if __name__ == "__main__":
    main()
