"""Several processes with ``accelerate launch``: two CPU processes (gloo) train a LoRA to the weights of one
process with the same global batch (``engine.train`` splits each step's batch: every process draws the same
examples and keeps its slice, DDP averages the gradients).

The runs differ only in the order of float sums (a batch of 2 per process instead of 4 in one; gloo's gradient
all-reduce), so they agree to a tolerance, not bit for bit. Measured on 2 CPU cores, LoRA on the tiny architecture
with random weights, batch 4, relative to the size of the update (a LoRA's B starts at zero, so B is the update):

| run | losses: max rel. diff | norm(B2 - B1) / norm(B1) | max abs(W2 - W1) / max abs(B1), any weight |
|---|---|---|---|
| 3 steps, lr 1e-2 (this test) | 1.1e-7 | 2.2e-5 | 2.2e-3 |
| 5 steps, lr 2e-3 | 1.0e-7 | 1.5e-5 | 1.3e-3 |
| 3 steps, each process drawing its own examples (a wrong split) | 4.0e-2 | 1.2 | 2.0 |

The largest single difference is ~100 times the overall one: AdamW divides each gradient by the root of its running
square, so an element whose gradient is close to zero turns float noise into a step of up to lr. Hence two
tolerances: the whole update within ``MAX_RMS`` (50 times the measured), every element within ``MAX_ELEMENT``
(10 times); a wrong split fails both by orders of magnitude.

Run by pytest (about 45 s on 2 cores); the same file is the script each process runs."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
STEPS, BATCH, LR = 3, 4, 1e-2
MAX_LOSS = 1e-5  # relative, per step
MAX_RMS = 1e-3  # norm(B_2 - B_1) / norm(B_1)
MAX_ELEMENT = 2e-2  # max |W_2 - W_1| / max |B_1|, over every LoRA weight (A and B)


def train_lora(out):
    """LoRA on the koala, the tiny architecture with random weights (seed 0), STEPS steps of a global batch of
    BATCH; the main process writes out/run.json (losses, number of processes) beside the adapter."""
    from accelerate import Accelerator

    from mcteach.methods.catalog import train_concept
    from mcteach.sd import pretrain, tiny
    from mcteach.world import scenes

    tokenizer = tiny.build_tokenizer(scenes.vocabulary_words(scenes.BASE_CLASSES))
    vae, text_encoder, unet, _ = tiny.build_components(tokenizer, seed=0)
    pipe = pretrain.assemble(tokenizer, vae, text_encoder, unet)
    accelerator = Accelerator()
    r = train_concept(pipe, "koala", "lora", out=out, steps=STEPS, batch_size=BATCH, lr=LR, progress=False,
                      accelerator=accelerator)
    if accelerator.is_main_process:
        (Path(out) / "run.json").write_text(json.dumps({"losses": r.losses, "processes": accelerator.num_processes}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, processes: int) -> subprocess.CompletedProcess:
    """This file as a script on ``processes`` CPU processes, one thread each, this checkout first on the path.

    Several: ``accelerate launch`` with every setting on the command line (no `accelerate config` file is read:
    HF_HOME points to an empty folder). Not ``--cpu --num_processes 2``: without MPI that starts *one* process
    (accelerate 1.15's simple launcher); ``--multi_gpu`` starts them with torchrun, and ACCELERATE_USE_CPU=true
    makes them CPU processes of one gloo group (on a machine with GPUs too)."""
    env = {**os.environ, "HF_HOME": str(out.parent / "hf-home"), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    cmd = [sys.executable, __file__, str(out)]
    if processes > 1:
        cmd[1:1] = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    "--main_process_port", str(free_port())]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def differences(one: dict, two: dict) -> tuple[float, float]:
    """(norm(B_two - B_one) / norm(B_one) over every B, max abs(two - one) / max abs(B_one) over every weight)."""
    assert one.keys() == two.keys()
    bs = [k for k in one if "lora_B" in k]
    rms = torch.cat([(two[k] - one[k]).flatten() for k in bs]).norm() / torch.cat([one[k].flatten() for k in bs]).norm()
    element = max((two[k] - one[k]).abs().max().item() for k in one) / max(one[k].abs().max().item() for k in bs)
    return rms.item(), element


def test_two_processes_train_the_weights_of_one(tmp_path):
    started = time.time()
    for name, n in (("one", 1), ("two", 2)):
        run = launch(tmp_path / name, n)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    runs = [json.loads((tmp_path / d / "run.json").read_text()) for d in ("one", "two")]
    assert [r["processes"] for r in runs] == [1, 2]
    weights = [load_file(tmp_path / d / "pytorch_lora_weights.safetensors") for d in ("one", "two")]
    rms, element = differences(*weights)
    (one, two) = (torch.tensor(r["losses"]) for r in runs)
    loss = ((two - one).abs() / one.abs()).max().item()
    print(f"\n2 processes vs 1: losses {loss:.1e}, B {rms:.1e}, largest element {element:.1e} (relative); "
          f"{time.time() - started:.0f} s")
    assert len(one) == len(two) == STEPS and loss <= MAX_LOSS
    assert rms <= MAX_RMS and element <= MAX_ELEMENT
    assert all(weights[0][k].abs().max() > 0 for k in weights[0] if "lora_B" in k)  # training moved every B


def test_a_batch_that_does_not_split_is_refused(random_pipe, tmp_path, monkeypatch):
    from accelerate import Accelerator

    from mcteach.methods.catalog import train_concept

    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
    with pytest.raises(ValueError, match="batch_size 3 does not split over 2 processes"):
        train_concept(random_pipe, "koala", "lora", out=tmp_path, steps=1, batch_size=3, progress=False)


if __name__ == "__main__":  # one process of `accelerate launch tests/test_accelerate.py OUT`
    train_lora(sys.argv[1])
