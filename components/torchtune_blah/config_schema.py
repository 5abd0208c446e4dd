"""The keys each recipe's config may have, as typed sections (OmegaConf structured configs).

torchtune's command line creates any key it is given: ``datset.x=1`` or ``+dataset.x=1`` (a new
top-level key named ``+dataset``) is accepted silently, and a misspelt ``abstain_treshold`` would
leave the greedy rule on. Each recipe therefore reads its whole config through one dataclass
(``typed_config``) before anything loads: an unknown key or a value of the wrong type is a
``ConfigError`` naming the key (and the nearest known one), and every key left out takes the
dataclass's default, the one place defaults live. Sections that hold a torchtune ``_component_``
(``model``, ``tokenizer``, ``optimizer`` ...) are checked by instantiation, and ``dataset`` by
the signature of its builder.

Each recipe file declares its own schema, a subclass of the one here (``class Config(QLoRAConfig)``
in recipes/blah_qlora.py): a copy made with ``tune cp`` adds its keys there.
"""

import difflib
import importlib
import inspect
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException


class ConfigError(ValueError):
    pass


Component = Optional[Dict[str, Any]]  # a `_component_` block; its own keys are checked when it is built


@dataclass
class PauseTokensSection:  # torchtune_blah.pause.pause_tokens()
    num: int = 5
    distinct: bool = True
    mode: str = "append"
    vocab_size: Optional[int] = None
    reserved_tokens: Optional[List[str]] = None
    first_reserved: int = 10


@dataclass
class PauseInitSection:  # torchtune_blah.pause.add_pause_embeddings()
    init: str = "mean"
    init_std: float = 0.02
    init_token: Optional[Any] = None


@dataclass
class PhaseSection:  # the embed: and lora: blocks
    optimizer: Component = None
    epochs: int = 1
    max_steps: Optional[int] = None
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    lr_scheduler: Component = None
    clip_grad_norm: Optional[float] = None
    save_every_n_steps: Optional[int] = None
    train_pause_embeddings: Optional[bool] = None  # lora only
    backward_from_first_pause: Optional[bool] = None  # embed only (torchtune_blah.prompt_prefix)


@dataclass
class ValidationSection:  # in-training validation of blah_qlora
    every_n_steps: Optional[int] = None
    max_examples: Optional[int] = None
    batch_size: int = 8
    max_new_tokens: int = 64


@dataclass
class QLoRAConfig:  # blah_qlora and blah_qlora_distributed
    output_dir: Optional[str] = None
    model: Component = None
    tokenizer: Component = None
    checkpointer: Component = None
    dataset: Component = None
    loss: Component = None
    metric_logger: Component = None
    phases: List[str] = field(default_factory=lambda: ["embed", "lora"])
    pause_tokens: PauseTokensSection = field(default_factory=PauseTokensSection)
    pause_init: Optional[PauseInitSection] = None
    pause_embeddings_path: Optional[str] = None
    init_from: Optional[str] = None
    embed: Optional[PhaseSection] = None
    lora: Optional[PhaseSection] = None
    validation: Optional[ValidationSection] = None
    seed: Optional[int] = None
    shuffle: bool = True
    device: str = "cuda"
    dtype: str = "bf16"
    resume_from_checkpoint: bool = False
    save_adapter_weights_only: bool = False
    enable_activation_checkpointing: bool = False
    enable_activation_offloading: bool = False
    compile: bool = False
    logits_only_where_loss: bool = True  # blah_qlora: output projection only where the loss is taken
    collate_fn: str = "torchtune.data.padded_collate_sft"
    log_every_n_steps: int = 1
    log_peak_memory_stats: bool = False
    cudnn_deterministic_mode: Optional[bool] = None
    custom_sharded_layers: Optional[List[str]] = None  # blah_qlora_distributed
    fsdp_cpu_offload: bool = False
    fsdp_reshard_after_forward: bool = True


@dataclass
class EvalDatasetSection:  # blah_eval's questions
    source: str = "rajpurkar/squad_v2"
    data_files: Optional[Any] = None
    split: str = "validation"
    max_context_words: Optional[int] = None
    max_examples: Optional[int] = None
    shuffle_seed: Optional[int] = None


@dataclass
class EvalConfig:  # blah_eval
    run_dir: Optional[str] = None
    stage: str = "latest"
    output_dir: Optional[str] = None
    dataset: EvalDatasetSection = field(default_factory=EvalDatasetSection)
    prompt_style: Optional[str] = None
    batch_size: int = 8
    max_new_tokens: int = 64
    quantize_base: Optional[bool] = None
    abstain_threshold: Optional[Any] = None  # null | a number in [0, 1] | calibrated (checked in eval.abstention)
    abstain_score: Optional[str] = None
    calibrate: bool = False
    calibrate_metric: str = "exact"
    calibration_file: Optional[str] = None
    review_queue_size: Optional[int] = 20  # rows of review_queue.jsonl; null: every question
    expert_accuracy: float = 1.0  # review_budget: how often the expert is right (checked in eval.routing)
    review_target_em: float = 80.0  # review_budget: the share of review that reaches this EM
    model_name: Optional[str] = None
    device: str = "cuda"
    dtype: str = "bf16"
    model: Component = None  # without run_dir: score a base model alone
    tokenizer: Component = None
    checkpointer: Component = None
    pause_tokens: Optional[Dict[str, Any]] = None  # refused if it disagrees with the run's


@dataclass
class GenerateConfig:  # blah_generate
    run_dir: Optional[str] = None
    stage: str = "latest"
    output_dir: Optional[str] = None
    questions: Optional[str] = None
    context: Optional[str] = None
    question: Optional[str] = None
    explain: bool = False
    explain_prompt: Optional[str] = None  # None: eval.run.EXPLAIN_PROMPT
    stream: Optional[bool] = None  # None: stream when answering one question
    prompt_style: Optional[str] = None
    batch_size: int = 8
    max_new_tokens: int = 64
    max_explain_tokens: int = 256
    quantize_base: Optional[bool] = None
    abstain_threshold: Optional[Any] = None
    abstain_score: Optional[str] = None
    calibration_file: Optional[str] = None
    device: Optional[str] = None
    dtype: Optional[str] = None


@dataclass
class ExportConfig:  # blah_export
    run_dir: Optional[str] = None
    stage: str = "latest"
    output_dir: Optional[str] = None
    format: str = "hf"
    dtype: Optional[str] = None
    eval_dirs: Optional[List[str]] = None


def _known(schema: Any, path: str) -> List[str]:
    """The keys the section at ``path`` (a dotted key, "" for the top) may have."""
    cls = schema
    for part in [p for p in path.split(".") if p]:
        if not is_dataclass(cls):
            return []
        types = {f.name: f.type for f in fields(cls)}
        cls = types.get(part)
        args = getattr(cls, "__args__", None)  # Optional[X]
        if args:
            cls = next((a for a in args if is_dataclass(a)), cls)
    return [f.name for f in fields(cls)] if is_dataclass(cls) else []


def check_config(cfg: DictConfig, schema: Any, recipe: str) -> None:
    """Refuse keys ``schema`` does not have and values of the wrong type, naming the key."""
    typed_config(cfg, schema, recipe)


def typed_config(cfg: DictConfig, schema: Any, recipe: str) -> DictConfig:
    """``cfg`` read through ``schema``: every key checked (unknown keys and wrong types refused,
    naming the key), every key left out at the schema's default. ``cfg`` itself is not changed."""
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), cfg)
    except ConfigKeyError as e:
        full = str(e.full_key or e.key)
        parent, _, key = full.rpartition(".")
        known = _known(schema, parent)
        near = difflib.get_close_matches(key.lstrip("+"), known, n=1)
        hint = f"; did you mean {(parent + '.' if parent else '') + near[0]}?" if near else ""
        plus = (" (a leading '+' on the command line creates a new key: write dataset.x=1, not +dataset.x=1)"
                if key.startswith("+") else "")
        raise ConfigError(f"{full} is not a {recipe} key{hint}{plus}. Known keys{' of ' + parent if parent else ''}: "
                          f"{', '.join(known)}") from None
    except OmegaConfBaseException as e:
        message = str(e).splitlines()[0]
        raise ConfigError(f"{e.full_key}: {message}") from None


def check_component_keys(section: Optional[DictConfig], name: str, skip_first: int = 1) -> None:
    """Refuse keys that ``section``'s ``_component_`` does not take (for builders whose keys would
    otherwise fail only after the model has loaded: the dataset)."""
    if section is None or "_component_" not in section:
        return
    module, _, attr = str(section._component_).rpartition(".")
    try:
        builder = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{name}._component_={section._component_!r} cannot be imported: {e}") from None
    parameters = list(inspect.signature(builder).parameters.values())[skip_first:]
    # A builder with **kwargs passes other keys on (squad_chat_dataset: to datasets.load_dataset),
    # so there only a near miss of a named key is taken for a typo.
    passes_on = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    known = [p.name for p in parameters if p.kind is not inspect.Parameter.VAR_KEYWORD]
    for key in section.keys():
        if key != "_component_" and key not in known:
            near = difflib.get_close_matches(str(key).lstrip("+"), known, n=1, cutoff=0.8 if passes_on else 0.6)
            if passes_on and not near:
                continue
            hint = f"; did you mean {name}.{near[0]}?" if near else ""
            raise ConfigError(f"{name}.{key} is not a key of {section._component_}{hint}. Known: {', '.join(known)}")
