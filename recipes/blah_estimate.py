# torchtune-blah: will a config fit the GPU, and how fast will it run? Estimated on a CPU, before
# renting a GPU or downloading the weights.
#
#   tune run blah_estimate --config llama3_8b_blah                  # any blah_qlora config or tune cp copy
#   tune run blah_estimate --config llama3_3_70b_blah gpus=4        # FSDP2 over 4 GPUs (per-GPU numbers)
#   tune run blah_estimate --config llama3_8b_blah layers=2         # a quick look: 2 of the 32 layers
#
# The model is built as blah_qlora builds it (the config's model builder, dtype, NF4 base, LoRA,
# pause rows, activation checkpointing, chunked output), on fake tensors: shapes without data, so
# neither the checkpoint nor the tokenizer file is read. Then, per configured phase, one optimizer
# step on a batch of the config's longest sequences (tokenizer.max_seq_len, the phase's batch
# size, its gradient accumulation), then one in-training validation batch and one blah_eval
# answering batch with their KV caches. Memory is counted by category and FLOPs by torch's flop
# counter (torchtune_blah.estimate: how). Printed as a table, written to <estimate_dir>/estimate.json
# and estimate.md. What it leaves out: docs/training.md#what-fits-where.
#
# Keys read beyond the training config's own: layers (build only the first N decoder layers), gpus
# (FSDP2 over N GPUs: parameters, gradients and optimizer state divided by N), cards (GB sizes to
# judge), gpu (whose tokens/s the table shows), cuda_allowance_gib, eval_batch_size and
# eval_max_new_tokens (blah_eval's answering; llama3_8b_blah_eval: 16 and 64), reply_tokens (the
# supervised tokens at the end of each sequence), estimate_dir.

import json
import os
import sys
from contextlib import nullcontext
from numbers import Number
from typing import Any, Dict, List

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torchtune import config, modules, training, utils
from torchtune.config._utils import _get_component_from_path
from torchtune.generation import get_causal_mask_from_padding_mask, get_position_ids_from_padding_mask
from torchtune.modules.common_utils import local_kv_cache
from torchtune.modules.peft import disable_adapter

from torchtune_blah.checkpointing import atomic_write
from torchtune_blah.config_schema import ConfigError
from torchtune_blah.estimate import (CARDS_GB, CUDA_ALLOWANCE_GIB, GPU_PEAK_TFLOPS, Estimate, GiB, assumed_mfu,
                                     bnb_8bit_state_bytes, compiled_loss_memory, count_flops, fake_tensors,
                                     fewer_layers, format_table, gradient_bytes, is_bnb_8bit, measure,
                                     ShapesOnlyTokenizer, storage_bytes, tensors_without_device_on_meta)
from torchtune_blah.generation import last_logits
from torchtune_blah.model import CHECKPOINT_PREFIX, adapter_parameter_names, build_model
from torchtune_blah.pause import PAUSE_PARAM, as_pause_tokens
from torchtune_blah.prompt_prefix import prompt_cut
from torchtune_blah.recipe_config import check_phases
from torchtune_blah.run_dir import PHASES
from torchtune_blah.torchtune_patches import (
    contiguous_output_chunks,
    unembed_last_position,
    unembed_positions,
    uses_chunked_output,
)

log = utils.get_logger("INFO")
_IGNORE = -100


def _positive_int(cfg: DictConfig, key: str, default: Any = None) -> int:
    value = OmegaConf.select(cfg, key, default=default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    return value


def check_estimate_config(cfg: DictConfig) -> Dict[str, Any]:
    """Everything the estimate reads, checked before anything is built; errors name the key."""
    component = OmegaConf.select(cfg, "model._component_")
    if not component:
        raise ConfigError("model._component_ is missing: name the model builder, e.g. "
                          "torchtune.models.llama3.qlora_llama3_8b")
    try:
        _get_component_from_path(str(component))
    except Exception as e:
        raise ConfigError(f"model._component_: {component!r} is not a model builder this install can import "
                          f"({type(e).__name__}: {e})") from None
    if OmegaConf.select(cfg, "tokenizer.max_seq_len") is None:
        raise ConfigError("tokenizer.max_seq_len is missing: the estimate runs sequences of that length "
                          "(set it, e.g. tokenizer.max_seq_len=4096)")
    max_seq_len = _positive_int(cfg, "tokenizer.max_seq_len")
    cards = cfg.get("cards", list(CARDS_GB))
    if not isinstance(cards, (list, ListConfig)) or not cards:
        raise ConfigError(f"cards must be a list of card sizes in GB, e.g. cards=[16,24], got {cards!r}")
    for card in cards:
        if isinstance(card, bool) or not isinstance(card, Number) or card <= 0:
            raise ConfigError(f"cards: {card!r} is not a card size in GB (a positive number), e.g. cards=[16,24]")
    gpu = str(cfg.get("gpu", "rtx4090"))
    if gpu not in GPU_PEAK_TFLOPS:
        raise ConfigError(f"gpu must be one of {sorted(GPU_PEAK_TFLOPS)}, got {gpu!r}")
    allowance = cfg.get("cuda_allowance_gib", CUDA_ALLOWANCE_GIB)
    if isinstance(allowance, bool) or not isinstance(allowance, Number) or allowance < 0:
        raise ConfigError(f"cuda_allowance_gib must be a number >= 0, got {allowance!r}")
    # blah_qlora's checks of the phases and their blocks (batch sizes, accumulation), its default phases
    phases = check_phases(cfg if cfg.get("phases") is not None else OmegaConf.merge(cfg, {"phases": list(PHASES)}))
    layers = cfg.get("layers")
    return {
        "max_seq_len": max_seq_len, "cards": [c if isinstance(c, int) else float(c) for c in cards], "gpu": gpu,
        "allowance": float(allowance),
        "phases": phases, "gpus": _positive_int(cfg, "gpus", 1),
        "layers": None if layers is None else _positive_int(cfg, "layers"),
        "reply_tokens": _positive_int(cfg, "reply_tokens", 32),
        "eval_batch_size": _positive_int(cfg, "eval_batch_size", 16),
        "eval_max_new_tokens": _positive_int(cfg, "eval_max_new_tokens", 64),
    }


class BlahEstimateRecipe:
    """Build the configured model on fake tensors and measure each phase's step and answering."""

    def __init__(self, cfg: DictConfig) -> None:
        self._opts = check_estimate_config(cfg)
        self._cfg = cfg
        self._dtype = training.get_dtype(cfg.get("dtype", "bf16"), device=torch.device("cpu"))
        self._device = torch.device("cpu")  # fake CPU tensors stand in for the GPU's
        self._pause = as_pause_tokens(cfg.get("pause_tokens"), ShapesOnlyTokenizer())
        self._estimates: List[Estimate] = []
        self._compiled = bool(cfg.get("compile", False))

    # ------------------------------------------------------------------ the model, as blah_qlora builds it

    def _build(self) -> None:
        cfg = self._cfg
        with fewer_layers(cfg.model, self._opts["layers"]):
            self._model, self._pause_module = build_model(
                cfg.model, None, self._pause, self._device, self._dtype, pause_init=cfg.get("pause_init"),
                tokenizer=ShapesOnlyTokenizer())
        if cfg.get("enable_activation_checkpointing", False):
            training.set_activation_checkpointing(self._model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
        self._loss_fn = config.instantiate(cfg.loss) if cfg.get("loss") else torch.nn.CrossEntropyLoss()
        if uses_chunked_output(self._loss_fn):
            contiguous_output_chunks(self._model, self._loss_fn.num_output_chunks)
        self._adapter_names = [n.replace(CHECKPOINT_PREFIX, "") for n in adapter_parameter_names(self._model)]
        self._vocab = self._model.tok_embeddings.num_embeddings
        self._num_layers = len(self._model.layers)
        self._parameters = storage_bytes(list(self._model.parameters()) + list(self._model.buffers()))

    def _named_parameters(self) -> Dict[str, torch.nn.Parameter]:
        return {n.replace(CHECKPOINT_PREFIX, ""): p for n, p in self._model.named_parameters()}

    def _set_trainable(self, phase: str, train_pause: bool) -> List[torch.nn.Parameter]:
        wanted = set(self._adapter_names) if phase == "lora" else set()
        if self._pause_module is not None and (phase == "embed" or train_pause):
            wanted.add(PAUSE_PARAM)
        trainable = []
        for name, param in self._named_parameters().items():
            param.requires_grad_(name in wanted)
            param.grad = None
            if name in wanted:
                trainable.append(param)
        return trainable

    # ------------------------------------------------------------------ one optimizer step per phase

    def _batch(self, batch_size: int) -> Dict[str, Any]:
        """``batch_size`` rows of max_seq_len tokens: prompt, pause ids, then the supervised reply."""
        length, reply = self._opts["max_seq_len"], self._opts["reply_tokens"]
        tokens = torch.randint(0, self._vocab, (batch_size, length), device=self._device)
        start = max(length - reply - self._pause.num, 1)
        if self._pause.num:
            ids = torch.tensor(self._pause.sequence, device=self._device)
            tokens[:, start:start + self._pause.num] = ids
        labels = torch.full((batch_size, length), _IGNORE, device=self._device)
        labels[:, length - reply:] = tokens[:, length - reply:]
        return {"tokens": tokens, "labels": labels, "start": start}

    def _micro_batch(self, batch: Dict[str, Any], cut: bool) -> None:
        """blah_qlora's _loss_step and backward on one micro-batch."""
        tokens, labels = batch["tokens"], batch["labels"]
        start = batch["start"] if cut else 0
        ignore = torch.full((tokens.shape[0], 1), _IGNORE, device=self._device)
        num_tokens = (labels != _IGNORE).sum()
        shifted = torch.hstack((labels[..., 1:], ignore))[:, start:]
        # logits_only_where_loss (blah_qlora's default): the reply's positions only, which _batch puts
        # last in every row, so a slice names them (a boolean mask would give fake tensors an unknown size)
        reply = self._opts["reply_tokens"]
        keep = (slice(tokens.shape[1] - reply - 1 - start, tokens.shape[1] - 1 - start)
                if self._cfg.get("logits_only_where_loss", True) else None)
        with prompt_cut(self._model, tokens, start, shared=0) as rest, \
                unembed_positions(self._model, keep) if keep is not None else nullcontext():
            logits = rest() if rest is not None else self._model(tokens)
            if keep is not None:
                shifted = shifted[:, keep].reshape(1, -1)
            if not isinstance(logits, list):
                shifted = shifted.reshape(-1)
                logits = logits.reshape(-1, logits.size(-1))
            loss = self._loss_fn(logits, shifted) * num_tokens
            del logits
            loss.backward()

    def _phase(self, phase: str) -> Estimate:
        pcfg = self._cfg[phase]
        batch_size = int(pcfg.get("batch_size", 1))
        accum = int(pcfg.get("gradient_accumulation_steps", 1))
        train_pause = phase == "embed" or bool(pcfg.get("train_pause_embeddings", False))
        cut = phase == "embed" and bool(pcfg.get("backward_from_first_pause", False))
        trainable = self._set_trainable(phase, train_pause)
        if not trainable:
            raise ConfigError(f"{phase}: nothing to train (no pause tokens, or a model without LoRA layers)")
        component = str(pcfg.optimizer._component_)
        estimate = Estimate(name=f"{phase}: batch {batch_size} x {self._opts['max_seq_len']} tokens"
                                 f"{', prompt cut' if cut else ''}, x{accum} accumulated")
        if is_bnb_8bit(component):  # cannot run on fake tensors: its state counted exactly, its update not run
            optimizer = None
            estimate.notes.append(f"{component}: state counted (2 bytes per element + block statistics), "
                                  "update not run")
        else:
            # On CUDA torch's optimizers default to their foreach path (its temporaries count); on CPU not.
            gpu_default = ({"foreach": True} if component.startswith("torch.optim.")
                           and not {"foreach", "fused"} & set(pcfg.optimizer) else {})
            optimizer = config.instantiate(pcfg.optimizer, trainable, **gpu_default)
        clip = pcfg.get("clip_grad_norm")
        batch = self._batch(batch_size)
        adapters_off = (disable_adapter(self._model) if phase == "embed" and self._adapter_names else nullcontext())

        def step() -> None:
            training.scale_grads(self._model, torch.tensor(1.0 / batch_size, device=self._device))
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(trainable, max_norm=float(clip))
            if optimizer is not None:
                optimizer.step()

        self._model.train()
        with adapters_off, tensors_without_device_on_meta(), compiled_loss_memory(self._loss_fn, self._compiled):
            self._micro_batch(batch, cut)  # the gradients exist from here on
            step()  # and the optimizer state
            # Steady state: a micro-batch while gradients and optimizer state are alive.
            estimate.activations = measure(lambda: self._micro_batch(batch, cut))
            estimate.flops = accum * count_flops(lambda: self._micro_batch(batch, cut))
            estimate.step_temporaries = measure(step)
        estimate.tokens = accum * batch_size * self._opts["max_seq_len"]
        estimate.parameters = self._parameters
        estimate.gradients = gradient_bytes(trainable)
        estimate.optimizer_state = (bnb_8bit_state_bytes(trainable) if optimizer is None else storage_bytes(
            t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)))
        for p in trainable:
            p.grad = None
        return estimate

    # ------------------------------------------------------------------ answering

    def _answering(self, name: str, batch_size: int, max_new_tokens: int) -> Estimate:
        """generation.greedy_generate's memory: a pre-fill of the batch's prompts (max_seq_len
        each) into a KV cache of prompt + max_new_tokens, the last position unembedded, then one
        decoding step (its data-dependent bookkeeping cannot run without data)."""
        prompt, total = self._opts["max_seq_len"], self._opts["max_seq_len"] + max_new_tokens
        estimate = Estimate(name=f"{name}: batch {batch_size}, {prompt} + {max_new_tokens} tokens")
        self._model.eval()
        for p in self._model.parameters():
            p.requires_grad_(False)

        def answer() -> None:
            tokens = torch.randint(0, self._vocab, (batch_size, prompt), device=self._device)
            real = torch.ones((batch_size, total), dtype=torch.bool, device=self._device)
            masks = get_causal_mask_from_padding_mask(real, target_seq_len=total)
            positions = get_position_ids_from_padding_mask(real)
            with torch.inference_mode(), unembed_last_position(self._model), local_kv_cache(
                    self._model, batch_size=batch_size, device=self._device, dtype=self._dtype,
                    decoder_max_seq_len=total):
                logits = last_logits(self._model(tokens, mask=masks[:, :prompt], input_pos=positions[:, :prompt]))
                next_ids = torch.softmax(logits.float(), dim=-1).argmax(dim=-1)
                last_logits(self._model(next_ids[:, None], mask=masks[:, prompt:prompt + 1],
                                        input_pos=positions[:, prompt:prompt + 1]))

        with tensors_without_device_on_meta():
            estimate.activations = measure(answer)
            estimate.flops = count_flops(answer)
        estimate.tokens = batch_size * (prompt + 1)
        estimate.parameters = self._parameters
        return estimate

    # ------------------------------------------------------------------ FSDP2 and the report

    def _per_gpu(self, estimate: Estimate, sharded: bool) -> Estimate:
        """FSDP2 over ``gpus`` GPUs (blah_qlora_distributed; not run here, counted from the model):
        parameters, gradients and optimizer state are sharded, and each GPU also holds whole the
        unit being computed and the one prefetched (the two largest units: a decoder layer, or a
        ``custom_sharded_layers`` table). Answering is not sharded: in-training validation
        gathers the whole model on every GPU (torchtune_blah.parallel.FSDP2.answer), and blah_eval
        runs a whole model per process."""
        gpus = self._opts["gpus"]
        if gpus == 1:
            return estimate
        if sharded:
            units = [storage_bytes(list(layer.parameters())) for layer in self._model.layers]
            for name in self._cfg.get("custom_sharded_layers") or []:
                module = getattr(self._model, str(name), None)
                if module is not None:
                    units.append(storage_bytes(list(module.parameters())))
            whole = sum(sorted(units)[-2:])
            estimate.parameters = estimate.parameters // gpus + whole
            estimate.gradients //= gpus
            estimate.optimizer_state //= gpus
            estimate.notes.append(f"FSDP2 over {gpus} GPUs: parameters, gradients and optimizer state / {gpus}, "
                                  f"plus the two largest units whole ({whole / GiB:.2f} GiB); counted, not run")
        else:
            estimate.notes.append(f"{gpus} GPUs: each holds the whole model while answering")
        return estimate

    def run(self, fake: bool = True) -> List[Estimate]:
        """Every row of the estimate. ``fake=False``: the same steps on real tensors (small models
        only: the tests check that fake tensors count what real ones hold)."""
        opts = self._opts
        with fake_tensors() if fake else nullcontext():
            with tensors_without_device_on_meta():  # building too: a buffer made without device= is caught
                self._build()
            for phase in opts["phases"]:
                self._estimates.append(self._per_gpu(self._phase(phase), sharded=True))
            validation = self._cfg.get("validation")
            if validation is not None:
                self._estimates.append(self._per_gpu(self._answering(
                    "validation answering", int(validation.get("batch_size", 8)),
                    int(validation.get("max_new_tokens", 64))), sharded=False))
            self._estimates.append(self._per_gpu(self._answering(
                "blah_eval answering", opts["eval_batch_size"], opts["eval_max_new_tokens"]),
                sharded=False))
        return self._estimates

    def report(self) -> Dict[str, Any]:
        opts, cfg = self._opts, self._cfg
        layers = f"{self._num_layers} layers" + (" (layers= override: not the whole model)" if opts["layers"] else "")
        header = (f"blah_estimate: {cfg.model._component_}, {layers}, {cfg.get('dtype', 'bf16')}, "
                  f"activation checkpointing {'on' if cfg.get('enable_activation_checkpointing') else 'off'}, "
                  f"{opts['gpus']} GPU(s); per GPU; GiB")
        table = format_table(self._estimates, opts["cards"], opts["allowance"], opts["gpu"])
        notes = [f"- tokens/s: at {assumed_mfu():.1%} of the GPU's bf16 peak, the utilisation torchtune's "
                 "published QLoRA Llama 3.1 8B reaches on an RTX 4090 (2,413 tokens/s, compile on); "
                 "all tokens of the sequences, not only the supervised ones"]
        if cfg.get("compile", False):
            notes.append("- compile: true is not run on fake tensors: the loss keeps what compile keeps "
                         "(torchtune_blah.estimate.compiled_loss_memory), the layers are counted eager")
        if cfg.get("enable_activation_offloading", False):
            notes.append("- enable_activation_offloading: not modelled (activations counted as if on the GPU)")
        notes += [f"- {e.name.split(':')[0]}: {n}" for e in self._estimates for n in e.notes]
        text = "\n".join([header, "", table, ""] + notes)
        return {"config": {"model": str(cfg.model._component_), "layers": self._num_layers, **opts},
                "assumed_mfu": assumed_mfu(), "estimates": [e.as_dict(opts["cards"], opts["allowance"])
                                                            for e in self._estimates], "text": text}


def write_report(report: Dict[str, Any], folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    data = {k: v for k, v in report.items() if k != "text"}
    atomic_write(os.path.join(folder, "estimate.json"),
                 lambda tmp: open(tmp, "w").write(json.dumps(data, indent=2) + "\n"))
    atomic_write(os.path.join(folder, "estimate.md"), lambda tmp: open(tmp, "w").write(report["text"] + "\n"))


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    recipe = BlahEstimateRecipe(cfg)
    recipe.run()
    report = recipe.report()
    print(report["text"])
    folder = str(cfg.get("estimate_dir") or os.path.join(str(cfg.get("output_dir", ".")), "estimate"))
    write_report(report, folder)
    log.info(f"blah_estimate: written to {folder}/estimate.json and estimate.md")


if __name__ == "__main__":
    sys.exit(recipe_main())
