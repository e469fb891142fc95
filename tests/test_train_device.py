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
