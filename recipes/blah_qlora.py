# torchtune-blah: the two-phase pause-token recipe. The whole training loop is in this file, on
# purpose (torchtune's convention): `tune cp blah_qlora ./my_recipe.py` gives you the loop to edit,
# and `tune run my_recipe.py --config ...` (from its folder) runs your copy.
#
#   tune run blah_qlora --config llama3_8b_blah
#   tune run --nproc_per_node 2 blah_qlora_distributed --config llama3_8b_blah_2gpu   # the same loop, FSDP2
#
# Phase "embed" trains only the pause-token input embeddings (5 x 4096 = 20,480 parameters on
# Llama 3 8B) with the base and the LoRA adapters frozen and switched off: the model learns to
# think before it learns to speak. Phase "lora" loads them, freezes them (as llama-squad did) and
# trains QLoRA adapters. With pause_tokens.num=0 and phases=[lora] this is plain answer-only SFT.
#
# The loop follows torchtune's lora_finetune_single_device step for step (same loss
# normalisation, data order and RNG use), so with zero pause tokens both log the same losses
# (tests/test_recipe_parity.py); across ranks it normalises by all ranks' tokens as
# lora_finetune_distributed does (tests/test_distributed_training.py). The model is set up here
# (_setup_model), the same way on one device and on N: on the meta device, fresh values drawn from
# the seed, then placed. What FSDP2 changes (placing = sharding + loading, collectives, optimizer
# and RNG state) is the `parallel` object handed to the recipe: torchtune_blah.parallel.SingleDevice
# or FSDP2.
#
# Outputs (blah_eval, blah_generate and blah_export read exactly this layout):
#   output_dir/blah_config.yaml                     the resolved config of the run
#   output_dir/embed/pause_embeddings.safetensors   after embed (+ phase_complete.json)
#   output_dir/lora/adapter_model.safetensors       after lora, PEFT layout, with adapter_config.json
#   output_dir/lora/pause_embeddings.safetensors    the pause rows the adapter was trained with
#   output_dir/lora/model-*.safetensors             merged model, unless save_adapter_weights_only
#   output_dir/<phase>/checkpoint/training_state.pt while a phase runs: what resume_from_checkpoint reads

import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, Dict, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
from torchtune import config, modules, training, utils
from torchtune.config._utils import _get_component_from_path
from torchtune.data import padded_collate_packed
from torchtune.modules.peft import disable_adapter, get_merged_lora_ckpt
from torchtune.recipe_interfaces import FTRecipeInterface
from tqdm import tqdm

from torchtune_blah.checkpointing import atomic_write, load_training_state, mark_phase_complete, save_training_state
from torchtune_blah.config_schema import QLoRAConfig
from torchtune_blah.eval.metrics import official_metrics, llama_squad_metrics
from torchtune_blah.eval.run import Answerer, run_prompts
from torchtune_blah.prompt_prefix import first_pause_position, prompt_cut
from torchtune_blah.model import (
    CHECKPOINT_PREFIX,
    TOK_EMBEDDINGS,
    adapter_parameter_names,
    fresh_lora_weights,
    lora_settings,
)
from torchtune_blah.parallel import Parallel, SingleDevice
from torchtune_blah.pause import (
    PAUSE_PARAM,
    add_pause_embeddings,
    as_pause_tokens,
    load_pause_embeddings,
    read_matching_pause_rows,
    save_pause_embeddings,
)
from torchtune_blah.recipe_config import (
    ConfigError,
    check_keys,
    check_qlora_config,
    dataset_pause_kwargs,
    init_from_stage,
)
from torchtune_blah.run_dir import RunDir, phase_complete
from torchtune_blah.torchtune_patches import (
    contiguous_output_chunks,
    rms_norm_fp32_weight,
    unembed_positions,
    uses_chunked_output,
)

log = utils.get_logger("INFO")

__all__ = ["BlahQLoRARecipe", "Config", "TrainingStopped", "run_recipe"]


@dataclass
class Config(QLoRAConfig):
    """Every key of this recipe's config, with its default: those of
    ``torchtune_blah.config_schema.QLoRAConfig`` (sections, types, defaults). A copy of this file
    (``tune cp blah_qlora my_recipe.py``) adds its own keys here, e.g. ``my_flag: bool = False``,
    and reads them as ``self.cfg.my_flag``; a misspelt key is still refused, naming the nearest."""


@dataclass
class Phase:
    """One phase's training state: set up by ``_train_phase``, advanced by ``_train_epoch``
    (``step`` and ``epoch`` are where a checkpoint resumes)."""

    name: str
    dir: str
    dataloader: StatefulDataLoader
    optimizer: torch.optim.Optimizer
    scheduler: Optional[Any]
    trainable: Dict[str, torch.nn.Parameter]
    accum: int
    clip: Optional[float]
    save_every: Optional[int]
    total_steps: int
    epochs: int
    ignore_labels: torch.Tensor
    cut_prompt: bool  # embed.backward_from_first_pause
    step: int = 0
    epoch: int = 0


class TrainingStopped(RuntimeError):
    """A phase stopped on a non-finite loss; the last good checkpoint is kept."""


class BlahQLoRARecipe(FTRecipeInterface):
    """Two phases, one model: pause embeddings first, then QLoRA adapters.

    ``parallel`` is what FSDP2 changes (torchtune_blah.parallel): ``SingleDevice()`` for
    ``tune run blah_qlora``, ``FSDP2(cfg)`` for blah_qlora_distributed. Only rank 0 writes files.
    """

    schema = Config

    def __init__(self, cfg: DictConfig, parallel: Optional[Parallel] = None) -> None:
        # The config read through the schema: a misspelt key fails here, naming it, before anything
        # is built; every key left out has the schema's default.
        self.cfg = cfg = check_keys(cfg, self.schema)
        self._parallel = parallel or SingleDevice()
        self.world_size, self.rank = self._parallel.world_size, self._parallel.rank
        self._is_rank_zero = self.rank == 0
        self._device = utils.get_device(device=cfg.device)
        self._dtype = training.get_dtype(cfg.dtype, device=self._device)
        if self._dtype == torch.float16:
            raise ValueError("fp16 is not supported by blah_qlora; use bf16 or fp32")
        # The tokenizer is cheap and the pause spec needs it (reserved ids): build both,
        # then check the whole config before any weights load.
        self._tokenizer = config.instantiate(cfg.tokenizer)
        self._pause = as_pause_tokens(cfg.pause_tokens, self._tokenizer)  # the one spec: model and data
        self._pause_kwargs = dataset_pause_kwargs(cfg, self._pause, self._tokenizer)
        self._phases = check_qlora_config(cfg, self._pause)
        self._output_dir = str(cfg.output_dir)
        self._run = RunDir(self._output_dir)
        self._resume = cfg.resume_from_checkpoint
        self._log_every_n_steps = cfg.log_every_n_steps
        self._log_peak_memory_stats = cfg.log_peak_memory_stats and self._device.type == "cuda"
        self._save_adapter_weights_only = cfg.save_adapter_weights_only
        self._logits_only_where_loss = cfg.logits_only_where_loss
        self._phase_cfgs = {phase: cfg[phase] for phase in self._phases}
        if "embed" in self._phases and cfg.embed.backward_from_first_pause and (
                self.world_size > 1 or cfg.dataset.get("packed", False)):
            raise ConfigError("embed.backward_from_first_pause needs one process and unpacked data (a pack's "
                              "document mask and FSDP2 are not supported by it yet); set it to false")
        if self._resume:
            self._check_resume_world_size()
        self.seed = training.set_seed(seed=cfg.seed, debug_mode=cfg.cudnn_deterministic_mode)

    def _check_resume_world_size(self) -> None:
        """A checkpoint holds each process's data position and RNG: resume with as many processes."""
        for phase in self._phases:
            path = self._run.training_state_file(phase)
            if not os.path.isfile(path):
                continue
            saved = torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("world_size", 1)
            if saved != self.world_size:
                how = ("tune run blah_qlora" if saved == 1
                       else f"tune run --nproc_per_node {saved} blah_qlora_distributed")
                raise ConfigError(
                    f"resume_from_checkpoint: {path} was written by {saved} process(es), this run has "
                    f"{self.world_size}; resume with `{how}`: each process's data position and RNG state "
                    "are part of the checkpoint")

    def _info(self, message: str) -> None:
        if self._is_rank_zero:
            log.info(message)

    # ------------------------------------------------------------------ setup

    def setup(self, cfg: DictConfig) -> None:
        if self._is_rank_zero:  # (the config as given is what the run records)
            os.makedirs(self._output_dir, exist_ok=True)
            atomic_write(self._run.config_path, lambda tmp: OmegaConf.save(cfg, tmp))
            self._metric_logger = config.instantiate(cfg.metric_logger)
            self._metric_logger.log_config(cfg)
        cfg = self.cfg

        # torchtune's checkpointer loads the base model; its output_dir is a staging
        # area from which the final artifacts are moved into output_dir/<phase>/.
        self._staging_dir = self._run.staging_dir
        self._checkpointer = config.instantiate(cfg.checkpointer, output_dir=self._staging_dir)
        base_state_dict = self._checkpointer.load_checkpoint()[training.MODEL_KEY]
        self._model, self._pause_module = self._setup_model(cfg, base_state_dict)
        del base_state_dict
        # By state-dict names: activation checkpointing puts its wrapper into named_parameters()
        self._adapter_names = [n.replace(CHECKPOINT_PREFIX, "") for n in adapter_parameter_names(self._model)]
        if "lora" in self._phases:
            self._lora_settings = lora_settings(self._model)
        self._activations_ctx = training.get_act_offloading_ctx_manager(
            self._model, cfg.enable_activation_offloading)

        self._loss_fn = config.instantiate(cfg.loss)
        if uses_chunked_output(self._loss_fn):
            contiguous_output_chunks(self._model, self._loss_fn.num_output_chunks)  # (why: torchtune_patches)
        self._dataset = config.instantiate(cfg.dataset, self._tokenizer, **self._pause_kwargs)
        self._packed = cfg.dataset.get("packed", False)
        self._collate = _get_component_from_path(cfg.collate_fn)
        self._shuffle = cfg.shuffle
        self._setup_validation(cfg)
        self._info(f"{type(self).__name__}: phases {self._phases}, {len(self._dataset)} training samples, "
                   f"{self._pause.num} pause tokens {list(self._pause.names)[:5]} ({self._pause.mode} ids "
                   f"{list(self._pause.ids)[:5]}), {self.world_size} process(es)")

    def _setup_model(self, cfg: Config, base_state_dict: Dict[str, torch.Tensor]):
        """The model and its pause module, the same way on one device and under FSDP2.

        Built on the meta device (no memory, no random draws); the fresh LoRA weights and pause rows
        are drawn on the CPU from ``seed`` (torchtune's distributed recipe draws per rank, its
        single-device one interleaves them with the base weights' throwaway init), so one GPU and any
        number of them start from the same values, and the training RNG stream (LoRA dropout)
        starts at the seed; files named by the config replace them; then ``parallel.place`` loads
        everything onto the device (FSDP2: shards first, each rank loads its part).
        """
        with training.set_default_dtype(self._dtype), torch.device("meta"):
            model = config.instantiate(cfg.model)
        if any(hasattr(m, "magnitude") for m in model.modules()):
            raise ConfigError("model: DoRA layers are not supported by blah_qlora (their magnitude is set from "
                              "the loaded base weights, a step this recipe does not take); use LoRA (use_dora: false)")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            adapter = fresh_lora_weights(model, self._dtype)
            pause_module = add_pause_embeddings(model, self._pause, tokenizer=self._tokenizer,
                                                table=base_state_dict[TOK_EMBEDDINGS], **dict(cfg.pause_init or {}))
        adapter = self._start_from_files(cfg, pause_module, list(adapter)) or adapter
        # Everything that may train, trains (FSDP2 shards NF4 weights only when frozen); each phase
        # then narrows it (_set_trainable).
        may_train = set(adapter) | ({PAUSE_PARAM} if pause_module is not None else set())
        for name, param in model.named_parameters():
            param.requires_grad_(name in may_train)
        if cfg.compile:
            training.compile_model(model, verbose=self._is_rank_zero)
        if cfg.enable_activation_checkpointing:
            training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
        self._parallel.place(model, {**base_state_dict, **adapter}, self._device, self._dtype)
        rms_norm_fp32_weight(model)  # the fused kernel, the same output (torchtune_patches says why)
        return model, pause_module

    def _start_from_files(self, cfg: DictConfig, pause_module, adapter_names) -> Optional[Dict[str, torch.Tensor]]:
        """``pause_embeddings_path`` or ``init_from``: pause rows loaded into ``pause_module`` (whole
        tensors, before any sharding); the adapter to start from returned (None: the fresh one)."""
        if cfg.pause_embeddings_path:
            load_pause_embeddings(pause_module, str(cfg.pause_embeddings_path))
            self._info(f"Loaded pause embeddings from {cfg.pause_embeddings_path}")
        if cfg.init_from:
            return self._init_from(init_from_stage(str(cfg.init_from)), pause_module, adapter_names)
        return None

    def _init_from(self, stage_dir: str, pause_module, adapter_names) -> Optional[Dict[str, torch.Tensor]]:
        """Start from a finished run (the human-in-the-loop cycle): its pause rows are loaded into
        ``pause_module``; its adapter, when it has one, is returned to replace the fresh LoRA
        weights. A resumed run then overwrites both with its own training state."""
        if pause_module is not None:
            load_pause_embeddings(pause_module, stage_dir)
        previous, stage = RunDir(os.path.dirname(stage_dir)), os.path.basename(stage_dir)
        adapter = None
        if os.path.isfile(previous.adapter_file(stage)) and adapter_names:
            adapter = previous.load_adapter(stage, adapter_names, key="init_from")
        self._info(f"init_from: starting from {stage_dir} (pause rows{' and adapter' if adapter else ''})")
        return adapter

    def _setup_validation(self, cfg: DictConfig) -> None:
        """In-training validation: blah_eval's answering and scoring on held-out records."""
        self._validation = cfg.validation
        if self._validation is None:
            return
        held_out = config.instantiate(cfg.dataset, self._tokenizer, part="holdout", packed=False, **self._pause_kwargs)
        self._val_records = held_out.records[: self._validation.max_examples or None]
        style, prompts = run_prompts(cfg)  # the prompts the run trains with
        self._val_answerer = Answerer(self._model, self._tokenizer, self._pause, prompt_style=style, prompts=prompts,
                                      max_new_tokens=self._validation.max_new_tokens)
        self._info(f"validation: {len(self._val_records)} held-out questions every "
                   f"{self._validation.every_n_steps} steps")

    def _validate(self, phase: str, step: int) -> None:
        self._model.eval()
        rows = self._answer_validation_records()
        self._model.train()
        ours, official = llama_squad_metrics(rows), official_metrics(rows)
        self._log_metrics({
            f"{phase}/val_exact_match": ours["pct_exact_match"], f"{phase}/val_valid_json": ours["pct_valid_json"],
            f"{phase}/val_official_exact": official["exact"], f"{phase}/val_official_f1": official["f1"],
        }, step=step)
        self._info(f"{phase} step {step}: validation exact match {ours['pct_exact_match']:.2f}% "
                   f"(official exact {official['exact']:.2f}, f1 {official['f1']:.2f})")

    def _answer_validation_records(self) -> list:
        """blah_eval's result rows for the held-out records (FSDP2: each rank answers its share)."""
        return self._parallel.answer(self._model, self._val_records, self._answer)

    def _answer(self, records: list) -> list:
        batch_size = self._validation.batch_size
        return [row for i in range(0, len(records), batch_size)
                for row in self._val_answerer.answer(records[i:i + batch_size], scored=True)]

    def _dataloader(self, batch_size: int) -> StatefulDataLoader:
        # Every rank shuffles with the same seed and takes every world_size-th sample, so
        # world_size ranks x batch b see the same samples per step as one rank x batch world_size*b.
        sampler = StatefulDistributedSampler(self._dataset, num_replicas=self.world_size, rank=self.rank,
                                             shuffle=self._shuffle, seed=self.seed)
        collate = padded_collate_packed if self._packed else partial(
            self._collate, padding_idx=self._tokenizer.pad_id, ignore_idx=self._loss_fn.ignore_index)
        return StatefulDataLoader(self._dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                                  drop_last=True)

    def _set_trainable(self, phase: str, train_pause: bool) -> Dict[str, torch.nn.Parameter]:
        """Freeze everything, then unfreeze what this phase trains."""
        wanted = set(self._adapter_names) if phase == "lora" else set()
        if self._pause_module is not None and (phase == "embed" or train_pause):
            wanted.add(PAUSE_PARAM)
        trainable = {}
        for name, param in self._named_parameters().items():
            param.requires_grad_(name in wanted)
            if name in wanted:
                trainable[name] = param
        return trainable

    def _named_parameters(self) -> Dict[str, torch.nn.Parameter]:
        """Parameters by their state-dict names: activation checkpointing wraps each layer and
        puts ``_checkpoint_wrapped_module.`` into ``named_parameters()``, not into the state dict."""
        return {name.replace(CHECKPOINT_PREFIX, ""): p for name, p in self._model.named_parameters()}

    def _log_metrics(self, metrics: Dict[str, Any], step: int) -> None:
        if self._is_rank_zero:
            self._metric_logger.log_dict(metrics, step=step)

    # ------------------------------------------------------------------ training

    def train(self) -> None:
        for phase in self._phases:
            phase_dir = os.path.join(self._output_dir, phase)
            done = phase_complete(phase_dir)
            if done:
                self._info(f"{phase}: already complete ({done['steps']} steps), loading its outputs")
                self._load_finished_phase(phase, phase_dir)
                continue
            self._train_phase(phase, phase_dir, self._phase_cfgs[phase])

    def _load_finished_phase(self, phase: str, phase_dir: str) -> None:
        if self._pause_module is not None:
            rows, _ = read_matching_pause_rows(self._pause_module, phase_dir)
            self._parallel.set_full_tensor(self._pause_module.pause_weight, rows)
        # A finished lora phase is the last one: nothing after it needs its adapter in memory.

    def _train_phase(self, phase: str, phase_dir: str, pcfg: DictConfig) -> None:
        train_pause = phase == "embed" or bool(pcfg.train_pause_embeddings)
        trainable = self._set_trainable(phase, train_pause)
        num_trainable = sum(p.numel() for p in trainable.values())  # a DTensor's numel is its global size
        detail = (f" ({len(self._pause.ids)} pause rows x {self._pause_module.embedding_dim})"
                  if phase == "embed" else "")
        self._info(f"{phase}: {num_trainable:,} trainable parameters{detail}; everything else frozen")

        batch_size, accum, epochs = pcfg.batch_size, pcfg.gradient_accumulation_steps, pcfg.epochs
        dataloader = self._dataloader(batch_size)
        steps_per_epoch = len(dataloader) // accum
        if steps_per_epoch == 0:
            raise ValueError(f"{phase}: {len(self._dataset)} samples make no full step of batch_size {batch_size} "
                             f"x gradient_accumulation_steps {accum} x {self.world_size} process(es)")
        total_steps = epochs * steps_per_epoch
        if pcfg.max_steps is not None:
            total_steps = min(total_steps, pcfg.max_steps)
        optimizer = config.instantiate(pcfg.optimizer, list(trainable.values()))
        scheduler = (config.instantiate(pcfg.lr_scheduler, optimizer, num_training_steps=total_steps, last_epoch=-1)
                     if pcfg.lr_scheduler is not None else None)
        ph = Phase(name=phase, dir=phase_dir, dataloader=dataloader, optimizer=optimizer, scheduler=scheduler,
                   trainable=trainable, accum=accum, clip=pcfg.clip_grad_norm, save_every=pcfg.save_every_n_steps,
                   total_steps=total_steps, epochs=epochs,
                   ignore_labels=torch.full((batch_size, 1), self._loss_fn.ignore_index, device=self._device),
                   # Only the pause rows train: the prompt before the first pause id needs no backward pass.
                   cut_prompt=phase == "embed" and bool(pcfg.backward_from_first_pause))

        restored_rng, dl_state = None, None
        state = load_training_state(phase_dir) if self._resume else None
        if state is not None:
            for name, tensor in state["trainable"].items():
                self._parallel.set_full_tensor(trainable[name], tensor)
            self._parallel.load_optimizer_state(self._model, optimizer, state["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(state["lr_scheduler"])
            ph.step, ph.epoch, dl_state, restored_rng = state["step"], state["epoch"], state["dataloader"], state["rng"]
            self._info(f"{phase}: resuming at step {ph.step} of {total_steps} (epoch {ph.epoch + 1})")

        # The embed phase trains the input side only: LoRA layers are switched off (not just frozen).
        adapters_off = disable_adapter(self._model) if phase == "embed" and self._adapter_names else nullcontext()
        with adapters_off:
            while ph.step < total_steps and ph.epoch < epochs:
                dataloader.sampler.set_epoch(ph.epoch)
                if dl_state is not None:
                    dataloader.load_state_dict(dl_state)
                    dl_state = None
                batches = iter(dataloader)
                if restored_rng is not None:  # after iter(): creating an iterator draws from the RNG
                    self._parallel.set_rng_state(restored_rng)
                    restored_rng = None
                self._train_epoch(ph, batches)
                ph.epoch += 1
                if ph.step < total_steps:
                    self._save_state(ph, None)

        self._finish_phase(phase, phase_dir, ph.step, num_trainable)

    def _save_state(self, ph: "Phase", dataloader_state: Optional[Dict[str, Any]]) -> None:
        """A checkpoint at ``ph.step`` (resume goes on in ``ph.epoch``). Gathering is collective:
        every rank takes part, rank 0 writes."""
        state = {
            "phase": ph.name, "step": ph.step, "epoch": ph.epoch, "dataloader": dataloader_state,
            "trainable": {n: self._parallel.full_tensor(p).cpu().clone() for n, p in ph.trainable.items()},
            "optimizer": self._parallel.optimizer_state(self._model, ph.optimizer),
            "lr_scheduler": ph.scheduler.state_dict() if ph.scheduler is not None else None,
            "rng": self._parallel.rng_state(), "seed": self.seed, "world_size": self.world_size,
        }
        if self._is_rank_zero:
            save_training_state(ph.dir, state)
        self._parallel.barrier()

    def _train_epoch(self, ph: "Phase", batches) -> None:
        """Steps of one epoch until it ends or the phase's last step; ``ph.step`` advances."""
        pbar = tqdm(total=ph.total_steps, initial=ph.step, desc=f"{ph.name} epoch {ph.epoch + 1}", dynamic_ncols=True,
                    disable=not self._is_rank_zero)
        optimizer, phase = ph.optimizer, ph.name
        # An epoch's leftover micro-batches (fewer than gradient_accumulation_steps) are
        # dropped, not carried into the next epoch's first step: resuming at an epoch
        # boundary then gives exactly the uninterrupted run.
        optimizer.zero_grad(set_to_none=True)
        t0, running_loss, num_tokens = time.perf_counter(), 0, 0
        for idx, batch in enumerate(batches):
            utils.batch_to_device(batch, self._device)
            current_num_tokens = (batch["labels"] != self._loss_fn.ignore_index).sum()
            num_tokens += current_num_tokens
            # embed.backward_from_first_pause: the prompt before the first pause id runs without
            # autograd (torchtune_blah.prompt_prefix); the backward pass stays inside the cut.
            start = first_pause_position(batch["tokens"], self._pause) if ph.cut_prompt else 0
            with prompt_cut(self._model, batch["tokens"], start) as rest:
                current_loss = self._loss_step(batch, ph.ignore_labels, rest, start) * current_num_tokens
                running_loss += current_loss
                current_loss.backward()
            if (idx + 1) % ph.accum != 0:
                continue
            # The step's loss and gradient are normalised by every rank's tokens together. FSDP2
            # averages gradients over ranks; the factor world_size undoes that (torchtune's way).
            num_tokens = self._parallel.all_reduce(num_tokens)
            running_loss = self._parallel.all_reduce(running_loss)
            loss_to_log = running_loss.item() / num_tokens
            if not math.isfinite(loss_to_log):
                raise TrainingStopped(
                    f"{phase}: the loss is {loss_to_log} at step {ph.step + 1}; stopped before applying it. "
                    f"The last good checkpoint in {ph.dir} is kept: lower the learning rate or check the "
                    "data, then rerun with resume_from_checkpoint=true.")
            training.scale_grads(self._model, self.world_size / num_tokens)
            if ph.clip is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_(list(ph.trainable.values()), max_norm=float(ph.clip))
                grad_norm = self._parallel.full_tensor(grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ph.scheduler is not None:
                ph.scheduler.step()
            ph.step += 1
            pbar.update(1)
            pbar.set_description(f"{phase} {ph.epoch + 1}|{ph.step}|Loss: {loss_to_log}")
            if ph.step % self._log_every_n_steps == 0:
                seconds = time.perf_counter() - t0
                metrics = {f"{phase}/loss": loss_to_log, f"{phase}/lr": optimizer.param_groups[0]["lr"],
                           f"{phase}/tokens_per_second_per_gpu": num_tokens / (seconds * self.world_size)}
                if ph.clip is not None:
                    metrics[f"{phase}/grad_norm"] = grad_norm
                if self._log_peak_memory_stats:
                    metrics.update({f"{phase}/{k}": v for k, v in training.get_memory_stats(self._device).items()})
                self._log_metrics(metrics, step=ph.step)
            if self._validation is not None and ph.step % self._validation.every_n_steps == 0:
                self._validate(phase, ph.step)
            running_loss, num_tokens, t0 = 0, 0, time.perf_counter()
            if ph.save_every and ph.step % ph.save_every == 0 and ph.step < ph.total_steps:
                self._save_state(ph, ph.dataloader.state_dict())
            if ph.step >= ph.total_steps:
                break
        pbar.close()

    def _loss_step(self, batch: Dict[str, torch.Tensor], ignore_labels: torch.Tensor, rest=None,
                   start: int = 0) -> torch.Tensor:
        # Shift: position i predicts token i+1 (same as torchtune's recipes); rest: positions start: only.
        labels = batch.pop("labels")
        labels = torch.hstack((labels[..., 1:], ignore_labels[: labels.shape[0]]))[:, start:]
        # logits_only_where_loss: the output projection (and its backward) for the reply's positions
        # only, the same loss (torchtune_blah.torchtune_patches.unembed_positions says why).
        keep = labels != self._loss_fn.ignore_index if self._logits_only_where_loss else None
        with self._activations_ctx, unembed_positions(self._model, keep) if keep is not None else nullcontext():
            logits = rest() if rest is not None else self._model(**batch)
        if keep is not None:
            labels = labels[keep].unsqueeze(0)
        if not isinstance(logits, list):
            labels = labels.reshape(-1)
            logits = logits.reshape(-1, logits.size(-1))
        loss = self._loss_fn(logits, labels)
        del logits
        return loss

    # ------------------------------------------------------------------ artifacts

    def _finish_phase(self, phase: str, phase_dir: str, steps: int, num_trainable: int) -> None:
        rows = self._parallel.full_tensor(self._pause_module.pause_weight) if self._pause_module is not None else None
        if phase == "lora":
            self._save_adapter(phase_dir)
        if self._is_rank_zero:
            os.makedirs(phase_dir, exist_ok=True)
            if rows is not None:
                save_pause_embeddings(self._pause_module, phase_dir, rows=rows)
            mark_phase_complete(phase_dir, {
                "phase": phase, "steps": steps, "trainable_parameters": num_trainable,
                "pause_ids": list(self._pause.ids), "pause_names": list(self._pause.names),
                "num_pause": self._pause.num,
            })
            shutil.rmtree(os.path.join(phase_dir, "checkpoint"), ignore_errors=True)
        self._parallel.barrier()
        self._info(f"{phase}: done after {steps} steps; outputs in {phase_dir}")

    def _save_adapter(self, phase_dir: str) -> None:
        params = self._named_parameters()
        adapter = {n: self._parallel.full_tensor(params[n]).cpu() for n in self._adapter_names}
        merged = None
        if not self._save_adapter_weights_only:
            state_dict = self._parallel.full_model_state_dict(self._model)
            if self._is_rank_zero:
                merged = get_merged_lora_ckpt(
                    state_dict, rank=self._lora_settings["r"], alpha=self._lora_settings["lora_alpha"])
        if not self._is_rank_zero:
            return
        ckpt = {training.ADAPTER_KEY: adapter, training.ADAPTER_CONFIG: dict(self._lora_settings)}
        if merged is not None:
            ckpt[training.MODEL_KEY] = merged
        self._checkpointer.save_checkpoint(ckpt, epoch=0, intermediate_checkpoint=False,
                                           adapter_only=self._save_adapter_weights_only)
        # Move the checkpointer's files from its staging folder into lora/, one rename each.
        os.makedirs(phase_dir, exist_ok=True)
        staged = os.path.join(self._staging_dir, "epoch_0")
        for name in os.listdir(staged):
            os.replace(os.path.join(staged, name), os.path.join(phase_dir, name))
        shutil.rmtree(self._staging_dir, ignore_errors=True)

    def cleanup(self) -> None:
        if self._is_rank_zero:
            self._metric_logger.close()
        self._parallel.cleanup()


def run_recipe(recipe: BlahQLoRARecipe, cfg: DictConfig) -> None:
    """Set up, train both phases, clean up; a run stopped on a non-finite loss exits with status 1."""
    recipe.setup(cfg=cfg)
    try:
        recipe.train()
    except TrainingStopped as stop:
        log.error(str(stop))
        sys.exit(1)
    finally:
        recipe.cleanup()


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    config.log_config(recipe_name="BlahQLoRARecipe", cfg=cfg)
    run_recipe(BlahQLoRARecipe(cfg=cfg), cfg)


if __name__ == "__main__":
    sys.exit(recipe_main())
