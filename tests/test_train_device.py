"""The trainers' shared --device option (training/schedule.py): cpu by default, and a device that cannot be used
here is refused by the parser before any work starts. (CPU runs with --device cpu given explicitly are checked
bit for bit against the default in test_train_vae.py.)"""
from __future__ import annotations

import pytest
import torch

from training import train_instruct, train_text, train_unet, train_vae

REQUIRED = {train_vae: [], train_text: [], train_unet: ["--vae", "vae"], train_instruct: ["--base", "base"]}


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
@pytest.mark.parametrize("trainer", REQUIRED, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_cuda_without_cuda_is_a_clear_parser_error(trainer, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        trainer.main(["--out", str(out), "--steps", "1", "--device", "cuda", *REQUIRED[trainer]])
    assert exit_.value.code == 2  # argparse's usage error
    err = capsys.readouterr().err
    assert "--device cuda: CUDA is not available" in err and "--device cpu" in err
    assert not out.exists()  # refused before the run folder (or anything else) was made


def test_device_defaults_to_cpu_and_unknown_devices_are_refused(capsys):
    assert train_vae.parse_args(["--out", "x", "--steps", "1"]).device == "cpu"
    assert train_vae.parse_args(["--out", "x", "--steps", "1", "--device", "cpu"]).device == "cpu"
    with pytest.raises(SystemExit):
        train_vae.parse_args(["--out", "x", "--steps", "1", "--device", "gpu"])
    assert "--device gpu: not a torch device" in capsys.readouterr().err


_TWO_PROCESSES = '''
import copy, json, sys, torch
sys.path.insert(0, sys.argv[1])
from training import checkpoint, train_text, train_vae

real, rows = checkpoint.save_state, []

def save_state(acc, out, summary):  # each process's weight sums and next batch draw, gathered at every checkpoint
    sums = [float(sum(p.detach().double().sum() for p in m.parameters())) for m in acc._models]
    draw = copy.deepcopy(acc._custom_objects[0].rng).random()
    rows.append(acc.gather(torch.tensor([[*sums, draw]], dtype=torch.float64)).tolist())
    real(acc, out, summary)

checkpoint.save_state = save_state
out = sys.argv[2]
quiet = ["--threads", "1", "--no-progress", "--checkpoint-every", "1", "--eval-every", "100", "--steps", "2"]
train_vae.main(["--out", out + "/vae", "--tiny", "--batch", "2", "--eval-world", "4", "--scale-images", "8", "--bf16",
                *quiet])
train_text.main(["--out", out + "/text", "--tiny", "--batch", "8", *quiet])
if torch.distributed.get_rank() == 0:
    open(out + "/rows.json", "w").write(json.dumps(rows))
'''


@pytest.mark.slow
def test_two_processes_train_in_step_and_draw_their_own_batches(tmp_path):
    """What `accelerate launch` does on several GPUs, on this CPU: two processes (torchrun, gloo) run the VAE trainer
    (bf16) and then the text trainer in the same processes. At every checkpoint both hold the same weights (their
    gradients are averaged), while each draws its own batches (--seed + process index)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "two.py"
    script.write_text(_TWO_PROCESSES)
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                           str(root), str(tmp_path)], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert len(rows) == 6  # 2 steps + the final save, for each trainer
    for first, second in rows:
        assert first[:-1] == second[:-1]  # the same weights on both processes
        assert first[-1] != second[-1]  # different batch generators
    assert rows[0][0][:-1] != rows[1][0][:-1]  # and the weights did train
