"""SIGKILL mid-phase, resume, and end exactly where an uninterrupted run ends."""

import os
import shutil
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import fast_overrides
from torchtune_blah.run_dir import TRAINING_STATE_FILE
from torchtune_blah.pause import read_pause_embeddings

pytestmark = pytest.mark.slow  # trainings killed and resumed in subprocesses: the full suite only (python -m pytest -q)

TUNE = shutil.which("tune")


def _args(out, tiny_base, **extra):
    # 20 steps a phase, a checkpoint every 2: a wide window to kill in. Dropout 0.1 on
    # the LoRA path makes the RNG state part of what must be restored.
    return ["run", "blah_qlora", "--config", "demo_cpu_blah", *fast_overrides(
        out, tiny_base, **{"embed.max_steps": 20, "lora.max_steps": 20, "model.lora_dropout": 0.1, **extra})]


def _kill_after_checkpoint(args, cwd, phase_dir):
    state_file = os.path.join(phase_dir, TRAINING_STATE_FILE)
    proc = subprocess.Popen([TUNE, *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not os.path.exists(state_file):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.005)
    proc.kill()  # SIGKILL: no cleanup, no final save
    proc.wait()
    assert not os.path.exists(os.path.join(phase_dir, "phase_complete.json")), "killed too late"


def test_sigkill_and_resume_matches_an_uninterrupted_run(tmp_path, tiny_base):
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    done = subprocess.run([TUNE, *_args(reference, tiny_base)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    _kill_after_checkpoint(_args(interrupted, tiny_base), tmp_path, str(interrupted / "embed"))
    # Resume: finishes embed from its checkpoint; killed again inside lora.
    _kill_after_checkpoint(_args(interrupted, tiny_base, resume_from_checkpoint=True), tmp_path,
                           str(interrupted / "lora"))
    assert (interrupted / "embed" / "phase_complete.json").exists()
    state = torch.load(interrupted / "lora" / TRAINING_STATE_FILE, weights_only=False)
    assert 0 < state["step"] < 20
    resumed = subprocess.run([TUNE, *_args(interrupted, tiny_base, resume_from_checkpoint=True)], cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "lora: resuming at step" in resumed.stderr and "embed: already complete" in resumed.stderr

    for phase in ("embed", "lora"):
        ref_rows, _ = read_pause_embeddings(str(reference / phase))
        got_rows, _ = read_pause_embeddings(str(interrupted / phase))
        torch.testing.assert_close(got_rows, ref_rows, rtol=0, atol=1e-6)
    ref_adapter = load_file(str(reference / "lora" / "adapter_model.safetensors"))
    got_adapter = load_file(str(interrupted / "lora" / "adapter_model.safetensors"))
    assert ref_adapter.keys() == got_adapter.keys()
    for key in ref_adapter:
        torch.testing.assert_close(got_adapter[key], ref_adapter[key], rtol=0, atol=1e-6)
    # training actually moved the adapter: the comparison is not between two zero tensors
    assert any(v.abs().sum() > 0 for k, v in ref_adapter.items() if "lora_B" in k)
