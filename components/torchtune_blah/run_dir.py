"""A ``blah_qlora`` output_dir: every file name of a run is spelled here, and readers go through ``RunDir``.

    output_dir/
      blah_config.yaml                      the resolved config of the run
      logs/                                 metric logger output
      .checkpointer/                        torchtune's checkpointer output, moved into lora/ (transient)
      embed/ , lora/                        one folder per phase ("stage"):
        pause_embeddings.safetensors          the pause rows (and their spec, in the metadata)
        adapter_model.pt                      lora only: the adapter, torchtune layout (what we load)
        adapter_model.safetensors, adapter_config.json   lora only: the adapter, PEFT layout
        model-*.safetensors                   lora only: the merged model (unless save_adapter_weights_only)
        calibration.json                      blah_eval calibrate=true: the abstention rule and threshold
        checkpoint/training_state.pt          only while the phase runs: what resume_from_checkpoint reads
        phase_complete.json                   written last: the phase is finished, its files are final

The stages a reader can ask for are ``base`` (the base model alone), ``embed``, ``lora`` and
``latest`` (the last finished phase).
"""

import json
import os
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

CONFIG_FILE = "blah_config.yaml"
STAGING_DIR = ".checkpointer"
PAUSE_EMBEDDINGS_FILE = "pause_embeddings.safetensors"
ADAPTER_FILE = "adapter_model.pt"
PEFT_ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
CALIBRATION_FILE = "calibration.json"
TRAINING_STATE_FILE = os.path.join("checkpoint", "training_state.pt")
PHASE_COMPLETE_FILE = "phase_complete.json"

PHASES = ("embed", "lora")
STAGES = ("base",) + PHASES


def phase_complete(phase_dir: str) -> Optional[Dict[str, Any]]:
    """The phase's completion record, or None while it is unfinished."""
    path = os.path.join(phase_dir, PHASE_COMPLETE_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


class RunDir:
    """One run's folder: its config, finished phases, stages and the files of each stage."""

    def __init__(self, path: str) -> None:
        self.path = str(path)

    def __repr__(self) -> str:
        return f"RunDir({self.path!r})"

    @property
    def config_path(self) -> str:
        return os.path.join(self.path, CONFIG_FILE)

    def is_run(self) -> bool:
        return os.path.isfile(self.config_path)

    def read_config(self, key: str = "run_dir") -> DictConfig:
        """The resolved config the run saved; ``key`` names the setting that pointed here."""
        if not self.is_run():
            raise ValueError(f"{key}: {self.config_path} not found; {key} must be a blah_qlora output_dir")
        return OmegaConf.load(self.config_path)

    def stage_dir(self, stage: str) -> str:
        return os.path.join(self.path, stage)

    def finished_phases(self) -> List[str]:
        return [p for p in PHASES if phase_complete(self.stage_dir(p))]

    def resolve_stage(self, stage: str) -> str:
        """``latest`` -> the last finished phase (``base`` when none); a named stage must be finished."""
        finished = self.finished_phases()
        if stage == "latest":
            return finished[-1] if finished else "base"
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES + ('latest',)}, got {stage!r}")
        if stage != "base" and stage not in finished:
            raise ValueError(f"stage={stage}: {self.stage_dir(stage)} holds no finished phase "
                             f"(finished: {finished or 'none'})")
        return stage

    def pause_file(self, stage: str) -> str:
        return os.path.join(self.stage_dir(stage), PAUSE_EMBEDDINGS_FILE)

    def has_pause_rows(self, stage: str) -> bool:
        return stage != "base" and os.path.isfile(self.pause_file(stage))

    def adapter_file(self, stage: str = "lora") -> str:
        return os.path.join(self.stage_dir(stage), ADAPTER_FILE)

    def adapter_config(self, stage: str = "lora") -> Optional[Dict[str, Any]]:
        """The stage's PEFT ``adapter_config.json`` (rank, alpha, targets), None without one."""
        path = os.path.join(self.stage_dir(stage), ADAPTER_CONFIG_FILE)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)

    def load_adapter(self, stage: str, adapter_names: List[str], device: Any = "cpu", key: str = "run_dir"):
        """The stage's adapter tensors, refused unless they are exactly ``adapter_names``."""
        import torch

        path = self.adapter_file(stage)
        adapter = torch.load(path, map_location=device, weights_only=True)
        missing, unexpected = set(adapter_names) - set(adapter), set(adapter) - set(adapter_names)
        if missing or unexpected:
            raise ValueError(f"{key}: {path} does not fit this model's LoRA layers: missing "
                             f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
        return adapter

    def trained_files(self, stage: str) -> List[str]:
        """The files of ``stage`` that hold trained weights (what a calibration's fingerprint hashes)."""
        return [p for p in (self.pause_file(stage), self.adapter_file(stage)) if os.path.isfile(p)]

    def calibration_file(self, stage: str) -> str:
        return os.path.join(self.stage_dir(stage), CALIBRATION_FILE)

    def training_state_file(self, phase: str) -> str:
        return os.path.join(self.stage_dir(phase), TRAINING_STATE_FILE)

    @property
    def staging_dir(self) -> str:
        return os.path.join(self.path, STAGING_DIR)
