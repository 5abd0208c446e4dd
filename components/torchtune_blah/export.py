"""A finished run as a standard Hugging Face model folder, or as a PEFT adapter.

(Longer than our other modules on purpose: both formats share one plan, one set of checks and
one atomic write, and splitting them would spread the export's guarantees over several files.)

``plan_export`` checks everything that can be checked without weights (stage, output folder,
tokenizer, base config) and ``export_run`` then writes the folder into a temporary directory
beside ``output_dir`` and renames it into place, so a crash never leaves half an export.

``format: hf`` (``AutoModelForCausalLM.from_pretrained`` loads it, no custom code):

- weights: LoRA folded into the base (dequantized from NF4 where the run used QLoRA, as the
  model the adapter was trained against), in the run's dtype, safetensors shards + index;
- the input embedding holds the trained pause rows at the pause ids (appended rows in
  ``append`` mode, overwritten reserved rows in ``reserved`` mode);
- the output projection is always untied and keeps the base's table (zero rows for appended
  ids): training never taught the output side the pause tokens, and a tied table would let
  the pause rows' logits through. ``generation_config.json`` also suppresses the pause ids
  and stops at the end of turn.

``format: peft``: the LoRA weights plus the pause rows as PEFT's trainable tokens
(``trainable_token_indices``), which ``PeftModel.from_pretrained`` loads on the unmodified
base (append mode: after ``base.resize_token_embeddings(len(tokenizer))``).

Both folders carry the tokenizer with the pause tokens as special tokens, a chat template
that writes them after the assistant header, ``blah_prompt.json`` (how to prompt the model)
and a README model card.
"""

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from torchtune_blah.chat_format import ChatFormat, chat_format
from torchtune_blah.checkpointing import atomic_json, atomic_text
from torchtune_blah.data.squad import (
    ANSWER_PREFIX,
    MULTI_TURN_FIRST_PROMPT,
    MULTI_TURN_SECOND_PROMPT,
    SINGLE_TURN_PROMPT,
    SYSTEM_PROMPT,
    answer_block,
    load_squad_records,
    squad_messages,
)
from torchtune_blah.eval.abstention import load_calibration, run_fingerprint
from torchtune_blah.eval.folder import METRICS_FILE
from torchtune_blah.hf_tokenizer import (
    TokenizerExportError,
    add_pause_tokens,
    base_hf_tokenizer,
    chat_template,
    check_same_encoding,
    tokenizer_config,
)
from torchtune_blah.pause import NO_PAUSE, PauseTokens, find_pause_embedding, pause_tokens_from_metadata, \
    read_pause_embeddings
from torchtune_blah.run_dir import (ADAPTER_CONFIG_FILE, CALIBRATION_FILE, CONFIG_FILE, PEFT_ADAPTER_FILE, STAGING_DIR,
                                    RunDir, phase_complete)

EXPORT_FORMATS = ("hf", "peft")
PROMPT_FILE = "blah_prompt.json"
MAX_SHARD_BYTES = 4 * 1024 ** 3
# config.json model_type -> how torchtune's state dict maps onto the Hugging Face one
HF_MODEL_TYPES = ("llama", "qwen2")


class ExportError(ValueError):
    pass


@dataclass
class ExportPlan:
    run_dir: str
    stage: str
    output_dir: str
    format: str
    dtype: torch.dtype
    run_cfg: DictConfig
    fmt: ChatFormat
    pause: PauseTokens  # NO_PAUSE: none
    hf_tokenizer: Any  # tokenizers.Tokenizer, pause tokens added
    tokenizer_source: str
    base_config: Dict[str, Any]
    base_dir: str
    eval_metrics: List[Tuple[str, Dict[str, Any]]] = field(default_factory=list)
    calibration: Optional[Dict[str, Any]] = None  # <stage>/calibration.json (blah_eval calibrate=true)

    @property
    def vocab_rows(self) -> int:
        return int(self.base_config["vocab_size"])


def _sample_texts(run_cfg: DictConfig) -> List[str]:
    """Real text to compare the exported tokenizer with the run's: prompts, a few dev questions, a reply."""
    dataset = run_cfg.get("dataset") or {}
    texts = [SYSTEM_PROMPT, SINGLE_TURN_PROMPT, MULTI_TURN_FIRST_PROMPT, MULTI_TURN_SECOND_PROMPT,
             ANSWER_PREFIX, answer_block("Normandy"), answer_block("?"), "Beyoncé, 1990s – \u00e9t\u00e9 🙂"]
    for key in ("system_prompt", "single_turn_prompt"):
        if dataset.get(key):
            texts.append(str(dataset[key]))
    for record in load_squad_records("bundled_sample")[:4]:
        texts += [m.content for m in squad_messages(record, "single_turn")]
    return texts


def plan_export(run_dir: str, output_dir: str, stage: str = "latest", format: str = "hf",
                dtype: Optional[str] = None, eval_dirs: Sequence[str] = ()) -> ExportPlan:
    """Every check that needs no weights: a mistake costs seconds, not a model load."""
    from torchtune import config, training

    if format not in EXPORT_FORMATS:
        raise ExportError(f"format must be one of {EXPORT_FORMATS}, got {format!r}")
    output_dir = str(output_dir)
    if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)):
        raise ExportError(f"output_dir: {output_dir} exists and is not empty; choose a new folder "
                          "(an export never overwrites)")
    run_dir = str(run_dir)
    run = RunDir(run_dir)
    run_cfg = run.read_config()
    stage = run.resolve_stage(str(stage))
    if stage == "base":
        raise ExportError(f"stage=base: {run_dir} has no finished phase to export (the base model is "
                          f"{run_cfg.checkpointer.get('checkpoint_dir')})")
    pause = NO_PAUSE
    if run.has_pause_rows(stage):
        pause = pause_tokens_from_metadata(read_pause_embeddings(run.stage_dir(stage))[1])
    if format == "peft" and pause.num and not pause.distinct:
        raise ExportError("format=peft: PEFT's trainable tokens need one row per pause id; this run repeats "
                          "one <blah> row (pause_tokens.distinct=false). Use format=hf.")

    base_dir = str(run_cfg.checkpointer.get("checkpoint_dir") or "")
    config_path = os.path.join(base_dir, "config.json")
    if not os.path.isfile(config_path):
        raise ExportError(f"checkpointer.checkpoint_dir: {config_path} not found; the export writes a Hugging Face "
                          "model and needs the base's Hugging Face config.json (FullModelHFCheckpointer)")
    with open(config_path) as f:
        base_config = json.load(f)
    if base_config.get("model_type") not in HF_MODEL_TYPES:
        raise ExportError(f"{config_path}: model_type {base_config.get('model_type')!r}; the export knows "
                          f"{HF_MODEL_TYPES}")

    tokenizer = config.instantiate(run_cfg.tokenizer)
    try:
        fmt = chat_format(tokenizer)
        hf_tok, source = base_hf_tokenizer(tokenizer, run_cfg.tokenizer, base_dir, int(base_config["vocab_size"]))
        check_same_encoding(hf_tok, fmt, _sample_texts(run_cfg), source)
        add_pause_tokens(hf_tok, pause, int(base_config["vocab_size"]))
    except (TypeError, TokenizerExportError) as e:
        raise ExportError(f"tokenizer: {e}") from e

    metrics = []
    for directory in eval_dirs or ():
        path = os.path.join(str(directory), METRICS_FILE)
        if not os.path.isfile(path):
            raise ExportError(f"eval_dirs: {path} not found; list blah_eval output folders")
        with open(path) as f:
            metrics.append((os.path.basename(os.path.normpath(str(directory))), json.load(f)))

    calibration = None
    if os.path.isfile(run.calibration_file(stage)):  # refused here if it belongs to other weights
        style = str((run_cfg.get("dataset") or {}).get("prompt_style", "single_turn"))
        calibration = load_calibration(run.calibration_file(stage), run_fingerprint(run_cfg, run_dir, stage), style)

    torch_dtype = training.get_dtype(dtype or run_cfg.get("dtype", "fp32"), device=torch.device("cpu"))
    return ExportPlan(run_dir=run_dir, stage=stage, output_dir=output_dir, format=format, dtype=torch_dtype,
                      run_cfg=run_cfg, fmt=fmt, pause=pause, hf_tokenizer=hf_tok, tokenizer_source=source,
                      base_config=base_config, base_dir=base_dir, eval_metrics=metrics, calibration=calibration)


# ----------------------------------------------------------------------------- weights


def _attention_shape(base_config: Dict[str, Any]) -> Dict[str, int]:
    heads = int(base_config["num_attention_heads"])
    dim = int(base_config["hidden_size"])
    return {"num_heads": heads, "num_kv_heads": int(base_config.get("num_key_value_heads", heads)), "dim": dim,
            "head_dim": int(base_config.get("head_dim") or dim // heads)}


def _is_adapter_key(key: str) -> bool:
    return ".lora_a." in key or ".lora_b." in key or key.endswith(".magnitude")


def merged_hf_state_dict(model: torch.nn.Module, plan: ExportPlan) -> Dict[str, torch.Tensor]:
    """The run's model as a Hugging Face state dict: adapter merged, pause rows in, output untied."""
    from torchao.dtypes.nf4tensor import NF4Tensor
    from torchtune.models.convert_weights import tune_to_hf
    from torchtune.modules.peft import get_merged_lora_ckpt

    from torchtune_blah.model import lora_settings

    state = dict(model.state_dict())
    # QLoRA's state-dict hook dequantizes NF4 weights to bf16; dequantize in the export dtype
    # instead, as the forward pass does (linear_nf4 dequantizes to the activations' dtype).
    for name, param in model.named_parameters():
        if name in state and isinstance(param, NF4Tensor):
            state[name] = param.detach().to(plan.dtype)
    if plan.stage == "lora":
        settings = lora_settings(model)
        state = get_merged_lora_ckpt(state, rank=settings["r"], alpha=settings["lora_alpha"])
    else:  # the adapter never acted at this stage
        state = {k: v for k, v in state.items() if not _is_adapter_key(k)}
    embed = state["tok_embeddings.weight"].to(plan.dtype)
    output = state.get("output.weight", embed).to(plan.dtype).clone()  # tied: a copy of the base table
    module = find_pause_embedding(model)
    if module is not None:
        rows = module.pause_weight.detach().to(plan.dtype)
        if plan.pause.mode == "append":
            embed = torch.cat([embed, rows])
            output = torch.cat([output, torch.zeros_like(rows)])
        else:
            embed = embed.clone()
            embed[list(plan.pause.ids)] = rows
    state["tok_embeddings.weight"], state["output.weight"] = embed, output
    if plan.base_config["model_type"] == "qwen2":  # Qwen2's q/k rows are in Hugging Face's order already
        from torchtune.models.qwen2._convert_weights import qwen2_tune_to_hf

        hf = qwen2_tune_to_hf(state, **_attention_shape(plan.base_config), tie_word_embeddings=False)
    else:
        hf = tune_to_hf(state, **_attention_shape(plan.base_config))
    # contiguous, in the export dtype (no two tensors share storage: the output table was copied above)
    return {k: v.detach().to(plan.dtype).contiguous() for k, v in hf.items()}


def write_safetensors_shards(state: Dict[str, torch.Tensor], folder: str, max_bytes: int = MAX_SHARD_BYTES) -> None:
    """``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``, as transformers writes them."""
    from safetensors.torch import save_file

    shards, current, size = [], {}, 0
    for key in state:
        nbytes = state[key].numel() * state[key].element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = state[key]
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in state.values())
    atomic_json({"metadata": {"total_size": total}, "weight_map": weight_map},
                os.path.join(folder, "model.safetensors.index.json"))


def hf_model_config(plan: ExportPlan, vocab_size: int) -> Dict[str, Any]:
    config = dict(plan.base_config)
    config.update({"vocab_size": vocab_size, "tie_word_embeddings": False,
                   "torch_dtype": str(plan.dtype).replace("torch.", "")})
    return config


# PEFT's names for the pause rows: LoRA + trainable tokens, or trainable tokens alone (embed stage).
PEFT_TOKENS_KEY_WITH_LORA = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
PEFT_TOKENS_KEY_ALONE = "base_model.model.model.embed_tokens.trainable_tokens_delta"


def peft_adapter(plan: ExportPlan) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """adapter_model.safetensors tensors and adapter_config.json for PEFT, from the files the run
    saved (its torchtune-layout adapter, its adapter_config.json, its pause rows): no model load."""
    from torchtune.models.convert_weights import tune_to_peft_adapter_weights

    run = RunDir(plan.run_dir)
    stage_dir = run.stage_dir(plan.stage)
    ids = list(plan.pause.ids)
    rows = read_pause_embeddings(stage_dir)[0] if ids else None
    base = {"base_model_name_or_path": plan.base_dir, "task_type": "CAUSAL_LM", "inference_mode": True}
    if plan.stage == "lora":
        adapter = torch.load(run.adapter_file(plan.stage), map_location="cpu", weights_only=True)
        shape = _attention_shape(plan.base_config)
        if plan.base_config["model_type"] == "qwen2":
            # torchtune's converter permutes q/k lora_b rows for Llama's rotary layout; Qwen2 has
            # Hugging Face's layout already: take only its key names.
            tensors = {next(iter(tune_to_peft_adapter_weights({k: torch.zeros(v.shape)}, **shape))): v
                       for k, v in adapter.items()}
        else:
            tensors = tune_to_peft_adapter_weights(adapter, **shape)
        if ids and plan.pause.mode == "append":
            # The base is resized to the tokenizer before loading: a LoRA on lm_head needs rows for
            # the appended ids too (zero: the adapter adds nothing to the pause tokens' scores).
            for key in [k for k in tensors if ".lm_head.lora_B." in k]:
                tensors[key] = torch.cat([tensors[key], tensors[key].new_zeros(len(ids), tensors[key].shape[1])])
        config = run.adapter_config(plan.stage)  # r, lora_alpha, PEFT target_modules, from torchtune's checkpointer
        config.update(base, lora_dropout=0.0, bias="none", fan_in_fan_out=False)
        if ids:
            config["trainable_token_indices"] = {"embed_tokens": ids}
            tensors[PEFT_TOKENS_KEY_WITH_LORA] = rows
    else:
        if not ids:
            raise ExportError(f"stage={plan.stage} of {plan.run_dir} has no pause tokens and no adapter: nothing for "
                              "PEFT to load")
        config = {**base, "peft_type": "TRAINABLE_TOKENS", "target_modules": ["embed_tokens"], "token_indices": ids}
        tensors = {PEFT_TOKENS_KEY_ALONE: rows}
    return {k: v.to(plan.dtype).contiguous().clone() for k, v in tensors.items()}, config


# ----------------------------------------------------------------------------- the folder


def prompt_spec(plan: ExportPlan) -> Dict[str, Any]:
    """``blah_prompt.json``: everything a program needs to prompt the exported model as training did."""
    dataset = plan.run_cfg.get("dataset") or {}
    sequence = plan.pause.sequence
    names = [plan.pause.name_of(i) for i in sequence]
    return {
        "chat_format": plan.fmt.name,
        "pause_tokens": names,
        "pause_token_ids": sequence,
        "pause_mode": plan.pause.mode if plan.pause.num else None,
        "answer_prefix": ANSWER_PREFIX,
        "prompt_style": str(dataset.get("prompt_style", "single_turn")),
        "system_prompt": dataset.get("system_prompt", SYSTEM_PROMPT),
        "single_turn_prompt": dataset.get("single_turn_prompt", SINGLE_TURN_PROMPT),
        "multi_turn_first_prompt": dataset.get("multi_turn_first_prompt", MULTI_TURN_FIRST_PROMPT),
        "multi_turn_second_prompt": dataset.get("multi_turn_second_prompt", MULTI_TURN_SECOND_PROMPT),
        "end_token_ids": list(plan.fmt.end_ids),
        "suppress_token_ids": list(plan.pause.ids),
        "how_to_prompt": (
            "fill the prompt's {context} and {question} by plain replacement (its JSON braces are literal); "
            "text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) "
            "+ answer_prefix (the chat template already writes the pause tokens after the assistant header); "
            "encode with add_special_tokens=False; decode greedily, never emitting suppress_token_ids, and stop "
            "after the first token whose text contains '}' (the end of the JSON answer) or at an end token. "
            "The answer is the JSON block's \"answer\"; \"?\" means no answer in the context."),
        "abstention": _abstention_spec(plan),
        "run_dir": plan.run_dir,
        "stage": plan.stage,
    }


def _abstention_spec(plan: ExportPlan) -> Dict[str, Any]:
    """How to decide "?" as blah_eval does: greedy, or the run's calibrated threshold rule."""
    calibration = plan.calibration
    if calibration is None:
        return {"rule": "greedy", "how": "answer what greedy decoding writes (the article's rule); no calibration"}
    from torchtune_blah.eval.run import abstention_probe

    return {
        "rule": calibration["rule"], "threshold": calibration["threshold"],
        "calibrated_on": calibration.get("validation"),
        "abstain_token_ids": list(abstention_probe(plan.fmt.tokenizer).abstain_ids),
        "how": ("read P(abstain) = the summed probability of abstain_token_ids (the tokens that start the value as "
                "\"?\" does) where the answer value starts (after '\\n{\\n  \"answer\": '); decode that position "
                "with them suppressed to get the best span, and its probability P(span) = the product of its tokens' "
                "probabilities up to the '}'. "
                "Score p_abstain = P(abstain); abstain_vs_span = P(abstain) / (P(abstain) + P(span)). Answer \"?\" "
                "when the score exceeds threshold, else the span."),
    }


def _training_summary(plan: ExportPlan) -> List[str]:
    lines = []
    for phase in ("embed", "lora"):
        record = phase_complete(RunDir(plan.run_dir).stage_dir(phase))
        if record and (phase == "embed" or plan.stage == "lora"):
            lines.append(f"- `{phase}` phase: {record['steps']} steps, {record['trainable_parameters']:,} trainable "
                         "parameters")
    return lines


def model_card(plan: ExportPlan) -> str:
    from torchtune_blah.eval.report import format_table

    pause = plan.pause
    pause_text = (f"{pause.num} pause tokens {list(pause.names)} ({pause.mode} mode, ids {list(pause.ids)})"
                  if pause.num else "no pause tokens")
    load = ("from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"model = AutoModelForCausalLM.from_pretrained(\"{plan.output_dir}\")\n"
            f"tokenizer = AutoTokenizer.from_pretrained(\"{plan.output_dir}\")")
    if plan.format == "peft":
        load = ("from peft import PeftModel\n"
                "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
                f"tokenizer = AutoTokenizer.from_pretrained(\"{plan.output_dir}\")\n"
                f"base = AutoModelForCausalLM.from_pretrained(\"{plan.base_dir}\")\n"
                + ("base.resize_token_embeddings(len(tokenizer))  # append-mode pause ids lie past the base table\n"
                   if pause.num and pause.mode == "append" else "")
                + f"model = PeftModel.from_pretrained(base, \"{plan.output_dir}\")")
    lines = [
        f"# {os.path.basename(os.path.normpath(plan.output_dir))}",
        "",
        f"Exported by torchtune-blah (`blah_export`, format `{plan.format}`) from the `{plan.stage}` stage of "
        f"`{plan.run_dir}`. Base model: `{plan.base_dir}`. {pause_text}, trained as input embeddings between "
        "question and answer (\"think before you speak\").",
        "",
        "## Training",
        *(_training_summary(plan) or ["- (no phase records)"]),
        "",
        "## Use",
        "```python",
        load,
        "```",
        f"Prompt as `{PROMPT_FILE}` says: the chat template writes the pause tokens after the assistant header; "
        "append the forced prefix `\"\\n```json\"`, decode greedily and stop after the first `}` token. "
        "`generation_config.json` suppresses the pause ids and stops at the end of turn.",
    ]
    if plan.format == "hf":
        lines += ["", "The output projection is untied and keeps the base model's table, so the model cannot score "
                  "the pause tokens from their trained input rows."]
    calibration = plan.calibration
    if calibration is not None:
        articles = ", ".join((calibration.get("validation") or {}).get("articles") or []) or "its validation questions"
        lines += ["", "## Abstention", f"Calibrated on {calibration.get('questions')} validation questions "
                  f"({articles}): answer \"?\" when `{calibration['rule']}` exceeds {calibration['threshold']:.4f}, "
                  f"otherwise the best span (`{PROMPT_FILE}` says how; `calibration.json` has the numbers)."]
    for name, metrics in plan.eval_metrics:
        lines += ["", f"## Evaluation: {name}", "```", format_table(metrics), "```"]
    return "\n".join(lines) + "\n"


def generation_config(plan: ExportPlan) -> Dict[str, Any]:
    run_tokenizer = plan.fmt.tokenizer
    config = {"eos_token_id": list(plan.fmt.end_ids), "pad_token_id": getattr(run_tokenizer, "pad_id", None),
              "do_sample": False}
    if plan.fmt.start_ids:
        config["bos_token_id"] = plan.fmt.start_ids[0]
    if plan.pause.ids:
        config["suppress_tokens"] = list(plan.pause.ids)
    return config


def _write_common_files(plan: ExportPlan, folder: str) -> None:
    template = chat_template(plan.fmt, "".join(n for n in prompt_spec(plan)["pause_tokens"]))
    plan.hf_tokenizer.save(os.path.join(folder, "tokenizer.json"))
    max_len = plan.base_config.get("max_position_embeddings")
    atomic_json(tokenizer_config(plan.hf_tokenizer, plan.fmt, plan.fmt.tokenizer, template, max_len),
                os.path.join(folder, "tokenizer_config.json"))
    atomic_json(generation_config(plan), os.path.join(folder, "generation_config.json"))
    atomic_json(prompt_spec(plan), os.path.join(folder, PROMPT_FILE))
    atomic_text(model_card(plan), os.path.join(folder, "README.md"))
    if plan.calibration is not None:
        atomic_json(plan.calibration, os.path.join(folder, CALIBRATION_FILE))
    atomic_text(OmegaConf.to_yaml(plan.run_cfg), os.path.join(folder, CONFIG_FILE))


def _readable(folder: str) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for name in os.listdir(folder):
        os.chmod(os.path.join(folder, name), 0o666 & ~umask)


def export_run(plan: ExportPlan) -> str:
    """Write the export described by ``plan``; returns ``plan.output_dir``."""
    from safetensors.torch import save_file

    from torchtune_blah.model import load_run_model

    parent = os.path.dirname(os.path.abspath(plan.output_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.normpath(plan.output_dir))}.", suffix=".tmp",
                           dir=parent)
    try:
        if plan.format == "hf":
            # NF4 stays as the run had it: the merge folds the adapter into the dequantized base it trained against.
            model, _ = load_run_model(plan.run_cfg, plan.run_dir, plan.stage, torch.device("cpu"), plan.dtype,
                                      staging_dir=os.path.join(tmp, STAGING_DIR))
            state = merged_hf_state_dict(model, plan)
            del model
            write_safetensors_shards(state, tmp)
            atomic_json(hf_model_config(plan, state["model.embed_tokens.weight"].shape[0]),
                        os.path.join(tmp, "config.json"))
        else:
            tensors, config = peft_adapter(plan)
            save_file(tensors, os.path.join(tmp, PEFT_ADAPTER_FILE), metadata={"format": "pt"})
            atomic_json(config, os.path.join(tmp, ADAPTER_CONFIG_FILE))
        _write_common_files(plan, tmp)
        _readable(tmp)  # mkdtemp/mkstemp make private files; an export is for others to load
        if os.path.isdir(plan.output_dir):
            os.rmdir(plan.output_dir)  # empty (checked by plan_export)
        os.rename(tmp, plan.output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return plan.output_dir
