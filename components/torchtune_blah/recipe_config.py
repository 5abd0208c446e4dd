"""Config checks for ``blah_qlora``, run before any weights load.

Every error names the config key and says how to fix it: a typo in a phase
block or a pause-embeddings file from another run should cost seconds, not the
minutes of loading an 8B model.
"""

import json
import os
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf

from torchtune_blah.config_schema import ConfigError, QLoRAConfig, check_component_keys, typed_config
from torchtune_blah.pause import PAUSE_EMBEDDINGS_FILE, PauseTokens, as_pause_tokens, read_pause_embeddings
from torchtune_blah.run_dir import PHASE_COMPLETE_FILE, PHASES, RunDir, phase_complete

__all__ = ["ConfigError", "check_keys", "check_qlora_config", "dataset_pause_kwargs", "init_from_stage"]


def check_keys(cfg: DictConfig, schema: Any = QLoRAConfig, recipe: str = "blah_qlora") -> DictConfig:
    """``cfg`` read through the recipe's ``schema`` (``config_schema.typed_config``: unknown keys
    refused, defaults filled in) and every ``dataset`` key one its builder takes: checked first,
    before anything is built. Returns the typed config the recipe reads."""
    typed = typed_config(cfg, schema, recipe)
    check_component_keys(typed.get("dataset"), "dataset")
    return typed


def dataset_pause_kwargs(cfg: DictConfig, pause: PauseTokens, tokenizer: Any) -> dict:
    """The pause tokens have one owner, the top-level ``pause_tokens`` the model's rows are made
    from: the recipe hands that section to a dataset builder that takes one (``{"pause_tokens":
    section}``, as plain values: torchtune merges keyword arguments into the config; empty for a
    builder without the argument). A ``dataset.pause_tokens`` that says
    otherwise (3 tokens for the data, 5 rows in the model: rows 3-4 would never train) is refused
    here, before anything loads."""
    import inspect

    from torchtune.config._utils import _get_component_from_path

    data = cfg.dataset
    try:
        builder = _get_component_from_path(str(data._component_))
        takes = "pause_tokens" in inspect.signature(builder).parameters
    except (ImportError, AttributeError, TypeError, ValueError):
        return {}  # (check_component_keys names a builder that cannot be imported)
    if "pause_tokens" in data:
        try:
            theirs = as_pause_tokens(data.pause_tokens, tokenizer)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"dataset.pause_tokens: {e}") from None
        if (theirs.ids, theirs.names, theirs.mode, theirs.distinct) != (pause.ids, pause.names, pause.mode,
                                                                         pause.distinct):
            raise ConfigError(
                f"dataset.pause_tokens gives {theirs.num} pause token(s) {list(theirs.names)[:5]} (ids "
                f"{list(theirs.ids)[:5]}, mode {theirs.mode}) but pause_tokens, which the model's rows are made "
                f"from, gives {pause.num} {list(pause.names)[:5]} (ids {list(pause.ids)[:5]}, mode {pause.mode}); "
                "write dataset.pause_tokens: ${pause_tokens} (or leave it out: the recipe passes its own)")
    return {"pause_tokens": OmegaConf.to_container(cfg.pause_tokens, resolve=True)} if takes else {}


def _is_inside(child: str, parent: str) -> bool:
    child, parent = os.path.realpath(child), os.path.realpath(parent)
    return child == parent or child.startswith(parent + os.sep)


def base_model_config(cfg: DictConfig) -> Optional[dict]:
    """The base checkpoint's Hugging Face ``config.json``, when there is one to read."""
    directory = cfg.checkpointer.get("checkpoint_dir")
    path = os.path.join(str(directory), "config.json") if directory else None
    if path and os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return None


def check_phases(cfg: DictConfig) -> list:
    phases = cfg.get("phases")
    if not isinstance(phases, (list, ListConfig)) or not phases:
        raise ConfigError(f"phases must be a non-empty list drawn from {list(PHASES)}, got {phases!r}")
    phases = [str(p) for p in phases]
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        raise ConfigError(f"phases: unknown phase {unknown[0]!r}; the phases are {list(PHASES)}")
    if len(set(phases)) != len(phases) or phases != sorted(phases, key=PHASES.index):
        raise ConfigError(f"phases must list each phase once, embed before lora; got {phases}")
    for phase in phases:
        block = cfg.get(phase)
        if not isinstance(block, (dict, DictConfig)):
            raise ConfigError(f"phase {phase!r} is selected but the config has no '{phase}:' block")
        if "optimizer" not in block:
            raise ConfigError(f"{phase}.optimizer is missing")
        for key in ("batch_size", "gradient_accumulation_steps", "epochs"):
            value = block.get(key, 1)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{phase}.{key} must be an integer >= 1, got {value!r}")
        for key in ("max_steps", "save_every_n_steps"):
            value = block.get(key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{phase}.{key} must be null or an integer >= 1, got {value!r}")
        if phase == "embed" and block.get("train_pause_embeddings") is not None:
            raise ConfigError("embed.train_pause_embeddings: the embed phase always trains them; remove the key")
    return phases


def check_pause_file(path: str, pause: PauseTokens, dim: Optional[int], key: str = "pause_embeddings_path") -> None:
    if os.path.isdir(path):
        path = os.path.join(path, PAUSE_EMBEDDINGS_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"{key}: {path} does not exist; point it at the embed phase's output "
                          f"(<output_dir>/embed/{PAUSE_EMBEDDINGS_FILE})")
    _, meta = read_pause_embeddings(path)
    wrong = []
    if meta["mode"] != pause.mode:
        wrong.append(f"pause_tokens.mode: file has {meta['mode']!r}, config has {pause.mode!r}")
    if meta["num"] != pause.num or len(meta["ids"]) != len(pause.ids):
        wrong.append(f"pause_tokens.num / distinct: file has {meta['num']} tokens on {len(meta['ids'])} rows, "
                     f"config has {pause.num} on {len(pause.ids)}")
    elif meta["ids"] != list(pause.ids):
        wrong.append(f"pause token ids: file has {meta['ids']}, config gives {list(pause.ids)}")
    if dim is not None and meta["dim"] != dim:
        wrong.append(f"embedding dim: file has {meta['dim']}, the base model has {dim}")
    if wrong:
        raise ConfigError(f"{key}: {path} does not match this config:\n  " + "\n  ".join(wrong))


def init_from_stage(run_dir: str) -> str:
    """The finished stage of a previous run that ``init_from`` starts from: its last finished phase."""
    run = RunDir(run_dir)
    finished = run.finished_phases()
    if not finished:
        raise ConfigError(f"init_from: {run_dir} has no finished phase (embed/ or lora/ with {PHASE_COMPLETE_FILE}); "
                          "point it at a finished blah_qlora output_dir")
    return run.stage_dir(finished[-1])


def check_init_from(cfg: DictConfig, pause: PauseTokens, dim: Optional[int]) -> Optional[str]:
    """``init_from``: a finished run whose pause rows (and adapter) this run starts from, e.g. to
    retrain on reviewed corrections. Its pause tokens must be this config's, its LoRA rank and
    alpha the model's. Returns the stage folder to start from."""
    run_dir = cfg.get("init_from")
    if not run_dir:
        return None
    run_dir = str(run_dir)
    run = RunDir(run_dir)
    if not run.is_run():
        raise ConfigError(f"init_from: {run.config_path} not found; init_from must be a blah_qlora output_dir")
    if _is_inside(run_dir, str(cfg.output_dir)) or _is_inside(str(cfg.output_dir), run_dir):
        raise ConfigError("init_from must be another run's output_dir, not this run's")
    stage_dir = init_from_stage(run_dir)
    if pause.num:
        check_pause_file(stage_dir, pause, dim, key="init_from")
    adapter = run.adapter_config(os.path.basename(stage_dir))
    if adapter is not None:
        for key, model_key in (("r", "lora_rank"), ("lora_alpha", "lora_alpha")):
            if model_key in cfg.model and float(cfg.model[model_key]) != float(adapter[key]):
                raise ConfigError(f"init_from: {stage_dir} has an adapter with {key}={adapter[key]} but "
                                  f"model.{model_key}={cfg.model[model_key]}; use the previous run's LoRA settings")
    return stage_dir


def check_training_data(cfg: DictConfig) -> None:
    """Our dataset builders' replay section, and local files (e.g. reviewed corrections) that hold
    no usable question: refused here, not after the model has loaded."""
    from torchtune_blah.data.replay import ReplayError, check_replay
    from torchtune_blah.data.squad import load_squad_records

    data = cfg.dataset
    if not str(data.get("_component_", "")).startswith("torchtune_blah.data."):
        return
    replay = data.get("replay")
    try:
        check_replay(OmegaConf.to_container(replay, resolve=True) if isinstance(replay, DictConfig) else replay)
    except ReplayError as e:
        raise ConfigError(str(e)) from None
    if data.get("source") == "json":
        try:
            load_squad_records("json", data_files=OmegaConf.to_object(data.get("data_files"))
                               if isinstance(data.get("data_files"), ListConfig) else data.get("data_files"))
        except (ValueError, OSError) as e:
            raise ConfigError(f"dataset.data_files: {e}") from None


def check_qlora_config(cfg: DictConfig, pause: PauseTokens) -> list:
    """Validate a ``blah_qlora`` config; returns the phases to run."""
    phases = check_phases(cfg)
    for key in ("output_dir", "model", "tokenizer", "checkpointer", "dataset"):
        if cfg.get(key) is None:
            raise ConfigError(f"{key} is missing from the config")
    check_training_data(cfg)
    checkpoint_dir = cfg.checkpointer.get("checkpoint_dir")
    if checkpoint_dir and _is_inside(str(cfg.output_dir), str(checkpoint_dir)):
        raise ConfigError(f"output_dir ({cfg.output_dir}) is inside checkpointer.checkpoint_dir ({checkpoint_dir}); "
                          "choose an output_dir outside the base model's folder")

    base = base_model_config(cfg)
    dim = base.get("hidden_size") if base else None
    if base and pause.mode == "append" and pause.num and base.get("vocab_size") != pause.vocab_size:
        raise ConfigError(f"pause_tokens.vocab_size={pause.vocab_size} but the base model has "
                          f"vocab_size={base.get('vocab_size')} ({checkpoint_dir}/config.json); "
                          f"set pause_tokens.vocab_size={base.get('vocab_size')}")

    if "embed" in phases and pause.num == 0:
        raise ConfigError("phases includes 'embed' but pause_tokens.num is 0: there is nothing to train. "
                          "Set pause_tokens.num, or phases=[lora] for plain answer-only QLoRA SFT")
    path = cfg.get("pause_embeddings_path")
    if path and "embed" in phases:
        raise ConfigError("pause_embeddings_path is for phases=[lora] alone; the embed phase of this run writes "
                          "its own. Remove one of them")
    init_from = check_init_from(cfg, pause, dim)
    if init_from and path:
        raise ConfigError("init_from and pause_embeddings_path both give the pause rows; remove one of them")
    if phases == ["lora"] and pause.num > 0 and not init_from:
        if path:
            check_pause_file(str(path), pause, dim)
        elif not cfg.lora.get("train_pause_embeddings", False):
            raise ConfigError(
                f"phases=[lora] with {pause.num} pause tokens needs pause_embeddings_path=<run>/embed "
                "(the embed phase's output); frozen pause rows would stay at their initial values. "
                "Or set lora.train_pause_embeddings=true, or pause_tokens.num=0 for plain SFT")
    if phases == ["lora"] and pause.num == 0 and path:
        raise ConfigError("pause_embeddings_path is set but pause_tokens.num is 0; remove one of them")

    validation = cfg.get("validation")
    if validation is not None:
        if not isinstance(validation.get("every_n_steps"), int) or validation.every_n_steps < 1:
            raise ConfigError("validation.every_n_steps must be an integer >= 1 (or validation: null)")
        if not cfg.dataset.get("holdout_fraction"):
            raise ConfigError("validation needs a held-out split: set dataset.holdout_fraction (llama-squad's: 0.005)")

    resume = bool(cfg.get("resume_from_checkpoint", False))
    started = [p for p in phases if os.path.isdir(os.path.join(str(cfg.output_dir), p))
               and os.listdir(os.path.join(str(cfg.output_dir), p))]
    if started and not resume:
        raise ConfigError(
            f"{os.path.join(str(cfg.output_dir), started[0])} already holds a run. Set resume_from_checkpoint=true "
            "to continue it, or choose another output_dir (nothing is overwritten)")
    if resume and not started:
        raise ConfigError(f"resume_from_checkpoint=true but {cfg.output_dir} holds no phase of this run to resume")
    if resume:
        for phase in phases:
            done = phase_complete(os.path.join(str(cfg.output_dir), phase))
            if done and phase == "embed" and done.get("pause_ids") != list(pause.ids):
                raise ConfigError(f"resume_from_checkpoint: {cfg.output_dir}/embed was trained with pause ids "
                                  f"{done.get('pause_ids')}, the config gives {list(pause.ids)}")
    return phases

