"""GPU checks, ``pytest -m gpu`` (skipped without CUDA): SD 1.5's architecture with random weights, 512 px images.

- one fp16 training run of each method (a few steps, gradient checkpointing on) peaks at <= 14 GB of GPU memory,
  what a 15 GB Colab T4 leaves: ``bench_mixing.training_cost`` with ``bench_mixing.GPU_RUNS``' settings (DreamBooth with 8-bit
  Adam, skipped without bitsandbytes);
- the masking processor costs at most 10% more time per UNet call than diffusers' default processor at 64x64
  latents (``bench_mixing.gpu_processor_timing``).

Each test prints its numbers (``pytest -m gpu -s``) and records them (``--junitxml``); ``mcteach bench mixing
--gpu-report`` prints them all as the README's markdown tables."""

import pytest

from mcteach.bench import mixing as bench_mixing
from mcteach.cli import main as cli_main
from mcteach.methods.catalog import METHODS

MAX_GB = 14.0
MAX_RATIO = 1.10


@pytest.fixture(scope="module")
def sd15():
    return bench_mixing.sd15_pipe()


@pytest.mark.gpu
@pytest.mark.parametrize("method", list(METHODS))
def test_an_fp16_training_step_fits_in_14_gb(sd15, method, record_property):
    if bench_mixing.GPU_RUNS[method].get("use_8bit_adam"):
        pytest.importorskip("bitsandbytes", reason="DreamBooth fits in 14 GB with 8-bit Adam: pip install bitsandbytes")
    r = bench_mixing.training_cost(sd15, method, **bench_mixing.GPU_RUNS[method])
    print(f"\n{method}: peak {r['peak_gb']:.2f} GB, {r['step_s']:.3f} s/step (batch {r['batch_size']}, "
          f"{r['optimizer']}, {r['skipped']} of {r['steps']} steps skipped by the fp16 loss scaler)")
    for key in ("peak_gb", "step_s", "skipped"):
        record_property(key, r[key])
    assert r["skipped"] < r["steps"]  # at least one optimizer step: its state counts in the peak
    assert r["peak_gb"] <= MAX_GB


@pytest.mark.gpu
def test_masking_costs_at_most_10_percent_at_512_px(sd15, record_property):
    t = bench_mixing.gpu_processor_timing(sd15)
    print(f"\ndefault processor {t['seconds']['default'] * 1000:.1f} ms per UNet call (batch 2, 64x64 latents, fp16); "
          + ", ".join(f"{k}: {v:.3f}x" for k, v in t["ratio"].items() if k != "default"))
    for key, ratio in t["ratio"].items():
        record_property(key, ratio)
    assert t["ratio"]["tokens + self-attention masks"] <= MAX_RATIO


def test_the_gpu_report_is_a_markdown_table(monkeypatch):
    timing = {"seconds": {"default": 0.05}, "latent": 64,
              "ratio": {"default": 1.0, "tokens + self-attention masks": 1.04,
                        "regional prompts + self-attention masks": 1.08}}
    report = {"device": "NVIDIA T4", "torch": "2.13.0", "timing": {"sd15": timing}, "training": [
        {"method": "lora", "peak_gb": 5.04, "step_s": 0.51, "batch_size": 2, "optimizer": "torch.optim.AdamW"},
        {"method": "dreambooth", "error": "needs bitsandbytes (8-bit Adam) to fit"}]}
    lines = bench_mixing.gpu_table(report).splitlines()
    assert lines[0].startswith("NVIDIA T4, torch 2.13.0;")
    assert "| lora | 2 | AdamW | 5.0 GB | 0.51 |" in lines
    assert "| dreambooth | | | needs bitsandbytes (8-bit Adam) to fit | |" in lines
    assert "| SD 1.5 size, fp16 on the GPU | 64x64 | 50 ms (1.00x) | 1.04x | 1.08x |" in lines
    monkeypatch.setattr(bench_mixing.torch.cuda, "is_available", lambda: False)
    assert cli_main(["bench", "mixing", "--gpu-report"]) == 2  # a clear refusal without CUDA
