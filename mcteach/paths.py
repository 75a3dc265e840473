"""Where the course's files live: the shipped data in the repository's ``data/``, and the cache for long jobs.

``MCTEACH_MODEL`` points the course at another base pipeline folder; ``MCTEACH_CACHE`` moves the cache
(trained benchmark adapters, pretraining checkpoints) from ``~/.cache/mcteach``.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA = REPO_ROOT / "data"
NOTEBOOKS = REPO_ROOT / "notebooks"
#: the embedded tiny Stable Diffusion (a diffusers pipeline folder)
EMBEDDED_MODEL = Path(os.environ.get("MCTEACH_MODEL", DATA / "tiny-sd"))
#: the shipped few-shot concept sets
CONCEPTS_DIR = DATA / "concepts"
#: the shipped sets of the other kinds (notebook 09): places and wearables, held out of base training too
KINDS_DIR = DATA / "kinds"
#: small trained adapters shipped for the notebooks (training them all would exceed a notebook's 5 minutes)
ADAPTERS_DIR = DATA / "adapters"
#: the judge's weights
JUDGE_PATH = DATA / "judge.safetensors"
#: the hand-labelled calibration set of generated images
CALIBRATION_SET = DATA / "calibration_broad_full"
#: the benchmarks' reports (their markdown pages are written beside them)
BENCH_METHODS = DATA / "bench_methods.json"
BENCH_MIXING = DATA / "bench_mixing.json"
BENCH_SWEEP = DATA / "bench_sweep.json"
BENCH_COSTS = DATA / "bench_costs.json"
BENCH_KINDS = DATA / "bench_kinds.json"
EVAL_BASE = DATA / "eval_base.json"
#: long jobs' checkpoints and trained adapters: outside the work tree, kept between sessions
CACHE = Path(os.environ.get("MCTEACH_CACHE", Path.home() / ".cache" / "mcteach"))
