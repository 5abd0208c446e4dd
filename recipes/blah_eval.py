# torchtune-blah: evaluate on SQuAD 2.0, llama-squad's way and the official way.
#
#   tune run blah_eval --config llama3_8b_blah_eval run_dir=/tmp/torchtune-blah/llama3_8b
#
# Evaluates the base model, base + pause embeddings, or base + pause embeddings +
# adapter (stage: base | embed | lora | latest) from a blah_qlora output directory:
# the model, tokenizer and base checkpoint come from its blah_config.yaml, the pause
# tokens from its pause_embeddings.safetensors. Prompts are forced through the pause
# ids and "\n```json", decoding is greedy in left-padded batches with a KV cache and
# stops at the first "}" token; answers are parsed leniently (JSON5).
#
# Files in output_dir:
#   predictions.jsonl   one line per question (appended per batch; a rerun resumes)
#   predictions.json    {id: answer} for the official script ("" = abstain)
#   na_probs.json       {id: P(abstain)} for the official script's best thresholds
#   eval_data.json      the evaluated questions in the official format (the script's data file)
#   metrics.json        llama-squad's five numbers + the official script's keys, the abstention rate,
#                       the AUROC of na_prob and of confidence for wrong answers (auroc_wrong), 95%
#                       bootstrap intervals, review_budget (model + expert at 10/20/30/50% reviewed)
#   results.md          one row in the layout of llama-squad's results table (+ the same statistics)
#   risk_coverage.png, na_prob_histogram.png   (with matplotlib, the `plots` extra)
#   review_queue.jsonl  invalid JSON, then the least confident answers, as training records to correct
#   review_budget.png   EM of the model + an expert who answers the least confident X% (vs a random X%)
#   calibration.json    calibrate=true: the abstention rule and threshold chosen on these questions
#                       (also written to <run_dir>/<stage>/calibration.json)
#
# Abstention: abstain_threshold: null answers as the article does (greedy). A number t in [0, 1]
# (with abstain_score: p_abstain | abstain_vs_span | p_no) or `calibrated` masks "?" where the
# answer value starts, decodes the best span, and answers "?" when the score exceeds t
# (torchtune_blah.eval.abstention). calibrate=true on validation questions picks the rule and t.

import os
import random
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import DictConfig, OmegaConf
from torchtune import config, training, utils

from torchtune_blah.checkpointing import atomic_json, atomic_text
from torchtune_blah.config_schema import EvalConfig, typed_config
from torchtune_blah.data.squad import filter_context_words, load_squad_records
from torchtune_blah.eval.abstention import (METRIC_KEYS, abstention_from_config, apply_rule, calibrate,
                                            check_calibration_rows, run_fingerprint)
from torchtune_blah.eval.folder import METRICS_FILE, PREDICTIONS_FILE, QUEUE_FILE, RESULTS_FILE, SETTINGS_FILE
from torchtune_blah.eval.metrics import official_best_thresholds, official_metrics, llama_squad_metrics
from torchtune_blah.eval.report import format_table, official_data, results_row, review_queue
from torchtune_blah.eval.routing import (budget_lines, check_expert_accuracy, check_target_em,
                                         confidence_report, review_budget)
from torchtune_blah.eval.run import Answerer, answer_into, run_prompts
from torchtune_blah.eval.stats import auroc, summary_statistics
from torchtune_blah.pause import read_pause_embeddings
from torchtune_blah.prediction import upgrade_row
from torchtune_blah.resumable import ResumableJsonl, check_settings, jsonl
from torchtune_blah.run_dir import CALIBRATION_FILE, STAGING_DIR, RunDir

log = utils.get_logger("INFO")


@dataclass
class Config(EvalConfig):
    """Every key of this recipe's config, with its default: ``torchtune_blah.config_schema.EvalConfig``'s.
    A copy of this file (``tune cp blah_eval my_eval.py``) adds its own keys here."""


def _run_config(cfg: DictConfig) -> DictConfig:
    """The blah_qlora config of run_dir, with the eval config's model/tokenizer/checkpointer on top."""
    run_cfg = RunDir(cfg.run_dir).read_config() if cfg.run_dir else OmegaConf.create({})
    for key in ("model", "tokenizer", "checkpointer"):
        if cfg[key] is not None:
            run_cfg[key] = cfg[key]
        if run_cfg.get(key) is None:
            raise ValueError(f"{key} is missing: give run_dir, or {key} in the eval config")
    return run_cfg


def _stage(cfg: DictConfig) -> str:
    stage = str(cfg.stage)
    if not cfg.run_dir:
        if stage not in ("base", "latest"):
            raise ValueError(f"stage={stage} needs run_dir (a blah_qlora output_dir)")
        return "base"
    return RunDir(cfg.run_dir).resolve_stage(stage)


class BlahEvalRecipe:
    """setup() loads the run's model (torchtune_blah.model.load_run_model), evaluate() answers and scores."""

    schema = Config

    def __init__(self, cfg: DictConfig) -> None:
        # Read through the schema: a misspelt key fails here, naming it; every key left out has its default.
        self._cfg = cfg = typed_config(cfg, self.schema, "blah_eval")
        # Under `tune run --nproc_per_node N` (torchrun): data parallel, every rank a whole model.
        self._world_size, self._rank = _init_distributed(cfg.device)
        self._device = utils.get_device(device=cfg.device)
        self._dtype = training.get_dtype(cfg.dtype, device=self._device)
        self._run_cfg = _run_config(cfg)
        self._stage = _stage(cfg)
        self._prompt_style, self._prompts = run_prompts(self._run_cfg, cfg.prompt_style)
        self._output_dir = str(cfg.output_dir)
        self._batch_size = cfg.batch_size
        data = cfg.dataset
        self._records = load_squad_records(data.source, data_files=data.data_files, split=data.split)
        self._records = filter_context_words(self._records, data.max_context_words)
        if data.shuffle_seed is not None:
            random.Random(int(data.shuffle_seed)).shuffle(self._records)
        if data.max_examples:
            self._records = self._records[: int(data.max_examples)]
        self._check_pause_settings(cfg)
        self._calibrate, self._calibrate_metric = cfg.calibrate, cfg.calibrate_metric
        if self._calibrate:
            if cfg.abstain_threshold is not None or cfg.abstain_score is not None:
                raise ValueError("calibrate=true chooses the abstention rule and threshold on these questions; "
                                 "drop abstain_threshold / abstain_score")
            if self._calibrate_metric not in METRIC_KEYS:
                raise ValueError(f"calibrate_metric={self._calibrate_metric!r}: must be one of {tuple(METRIC_KEYS)}")
            check_calibration_rows([{"has_answer": r.has_answer} for r in self._records])
            # Answer every question with its best span (never abstain), then choose.
            self._abstention = {"rule": "p_abstain", "threshold": 1.0, "source": "calibrate"}
        else:
            self._abstention = abstention_from_config(cfg, self._run_cfg, cfg.run_dir, self._stage,
                                                      self._prompt_style)
        self._settings = {"run_dir": str(cfg.run_dir), "stage": self._stage,
                          "prompt_style": self._prompt_style, "batch_size": self._batch_size,
                          "max_new_tokens": cfg.max_new_tokens,
                          "ids": [r.id for r in self._records]}
        if self._abstention is not None:  # (absent for greedy, so older evaluations still resume)
            self._settings["abstention"] = self._abstention
        self._run_fields = {"run_dir": str(cfg.run_dir or ""), "stage": self._stage}
        self._expert_accuracy = check_expert_accuracy(cfg.expert_accuracy)
        self._target_em = check_target_em(cfg.review_target_em)

    def _check_pause_settings(self, cfg: DictConfig) -> None:
        """The pause tokens come from the run's artifacts; a config that names others is a mistake."""
        wanted = cfg.pause_tokens
        if wanted is None or self._stage == "base":
            return
        _, meta = read_pause_embeddings(os.path.join(str(cfg.run_dir), self._stage))
        for key in ("num", "mode", "distinct"):
            if key in wanted and wanted[key] != meta[key]:
                raise ValueError(f"pause_tokens.{key}={wanted[key]!r} but {cfg.run_dir}/{self._stage} was trained "
                                 f"with {key}={meta[key]!r}; drop pause_tokens from the eval config (the run's "
                                 "pause_embeddings.safetensors says what they are)")

    def setup(self) -> None:
        settings_path = os.path.join(self._output_dir, SETTINGS_FILE)
        check_settings(settings_path, self._settings, "an evaluation")
        os.makedirs(self._output_dir, exist_ok=True)
        _barrier(self._world_size)  # every rank has checked before rank 0 writes
        if self._rank == 0:
            atomic_json(self._settings, settings_path)
        abstention = (self._abstention["rule"], self._abstention["threshold"]) if self._abstention else None
        self._answerer = Answerer.load(
            self._run_cfg, str(self._cfg.run_dir or ""), self._stage, self._device, self._dtype,
            staging_dir=os.path.join(self._output_dir, f"{STAGING_DIR}-rank{self._rank}"),
            quantize_base=self._cfg.quantize_base, prompt_style=self._prompt_style, prompts=self._prompts,
            max_new_tokens=self._settings["max_new_tokens"], abstention=abstention)
        self._pause = self._answerer.pause
        # Batches of questions of similar length (less padding); the files list them in input order.
        self._batch_order = self._answerer.by_prompt_length(self._records)
        pause_text = f"{self._pause.num} pause tokens ({self._pause.mode})" if self._pause.num else "no pause tokens"
        log.info(f"blah_eval: stage {self._stage}, {pause_text}, {self._prompt_style}, "
                 f"{len(self._records)} questions")

    def _predictions_path(self, rank: int) -> str:
        name = PREDICTIONS_FILE if self._world_size == 1 else \
            f"predictions.rank{rank}-of-{self._world_size}.jsonl"
        return os.path.join(self._output_dir, name)

    def _output(self, rank: int) -> ResumableJsonl:
        """This rank's predictions file; rows of an earlier version's file are read in today's shape."""
        return ResumableJsonl(self._predictions_path(rank), self._batch_order, self._batch_size,
                              shard=(rank, self._world_size),
                              upgrade=lambda row, record: upgrade_row(row, record, self._run_fields))

    def evaluate(self) -> Optional[Dict[str, Any]]:
        """Answer every question (this rank's share of the batches), then, on rank 0, merge and score."""
        output = self._output(self._rank)
        rows = answer_into(output, lambda batch: self._answerer.answer(batch, scored=True), show=self._rank == 0)
        if self._world_size == 1:
            by_id = {r["id"]: r for r in rows}
            rows = [by_id[r.id] for r in self._records]
            atomic_text(jsonl(rows), output.path)  # (appended in batch order)
            return self._write_results(rows)
        _barrier(self._world_size)
        if self._rank != 0:
            return None
        # The shards hold whole batches of the one batch list: in question order, they are the
        # rows a single process writes, so the merged files are the same, byte for byte.
        rows = {}
        for rank in range(self._world_size):
            shard = self._output(rank)
            if not shard.complete():
                raise RuntimeError(f"{shard.path} is incomplete after every rank finished")
            rows.update(shard.done)
        ordered = [rows[r.id] for r in self._records]
        atomic_text(jsonl(ordered), os.path.join(self._output_dir, PREDICTIONS_FILE))
        return self._write_results(ordered)

    def _write_results(self, rows: List[Dict[str, Any]]) -> Dict[str, Any]:
        out = self._output_dir
        abstention = self._abstention
        if self._calibrate:
            rows, abstention = self._write_calibration(rows)
        metrics = {
            "stage": self._stage, "run_dir": self._settings["run_dir"], "prompt_style": self._prompt_style,
            "num_pause_tokens": self._pause.num,
            "abstention": abstention or {"rule": "greedy", "threshold": None, "source": "the article's rule"},
            "llama_squad": llama_squad_metrics(rows),
            # best_exact / best_f1 (+ _thresh): the official script's, thresholds chosen on these very
            # questions, an oracle, never the result.
            "official": {**official_metrics(rows), **official_best_thresholds(rows)},
            "summary": summary_statistics(rows),
        }
        # How well the confidence finds the wrong answers, and what sending the least confident to an
        # expert buys against a random share (eval.routing).
        confidence = confidence_report(rows)
        metrics["summary"].update(auroc_wrong=confidence["auroc_wrong"])
        metrics["summary"]["ci95"]["auroc_wrong"] = confidence["ci95"]
        metrics["confidence"] = confidence
        metrics["review_budget"] = review_budget(rows, self._expert_accuracy, target_em=self._target_em)
        if abstention is not None:
            no_answer = [not r["has_answer"] for r in rows]
            metrics["auroc_by_score"] = {rule: auroc([r["abstain_scores"][rule] for r in rows], no_answer)
                                         for rule in rows[0]["abstain_scores"]} if rows else {}
            if rows and all("greedy_answer" in r for r in rows):
                greedy = apply_rule(rows, "p_abstain", None)
                # What greedy decoding answers, read off the same pass ("?" where it was the argmax).
                metrics["greedy_same_pass"] = {"llama_squad": llama_squad_metrics(greedy), "official": official_metrics(greedy),
                                               "summary": summary_statistics(greedy)}
        atomic_json(metrics, os.path.join(out, METRICS_FILE))
        atomic_json({r["id"]: r["prediction"] for r in rows}, os.path.join(out, "predictions.json"))
        atomic_json({r["id"]: r["na_prob"] for r in rows}, os.path.join(out, "na_probs.json"))
        # The evaluated questions in the official format, so the official script can score
        # exactly this set (it expects a prediction for every question of its data file).
        atomic_json(official_data(self._records), os.path.join(out, "eval_data.json"))
        name = self._cfg.model_name or f"{os.path.basename(self._settings['run_dir'])} ({self._stage})"
        atomic_text(results_row(name, metrics["llama_squad"], metrics["summary"], metrics["official"])
                    + "\n" + "\n".join(budget_lines(metrics["review_budget"])) + "\n",
                    os.path.join(out, RESULTS_FILE))
        self._write_plots(rows, name)
        queue = review_queue(rows, limit=self._cfg.review_queue_size)
        atomic_text(jsonl(queue), os.path.join(out, QUEUE_FILE))
        print(format_table(metrics))
        return metrics

    def _write_calibration(self, rows: List[Dict[str, Any]]):
        """Choose the rule and threshold on these questions; write calibration.json here and with
        the run; return the rows decided by it."""
        chosen = calibrate(rows, self._calibrate_metric)
        run_dir = self._cfg.run_dir
        data = self._cfg.dataset
        chosen.update(prompt_style=self._prompt_style,
                      fingerprint=run_fingerprint(self._run_cfg, str(run_dir or ""), self._stage),
                      validation={"source": str(data.source), "split": str(data.split),
                                  "articles": sorted({r.title for r in self._records if r.title})},
                      eval_dir=self._output_dir)
        atomic_json(chosen, os.path.join(self._output_dir, CALIBRATION_FILE))
        if run_dir:
            path = RunDir(run_dir).calibration_file(self._stage)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_json(chosen, path)
            log.info(f"calibration: {chosen['rule']} > {chosen['threshold']:.4f} abstains; written to {path}")
        decided = apply_rule(rows, chosen["rule"], chosen["threshold"])
        atomic_text(jsonl(decided), os.path.join(self._output_dir, PREDICTIONS_FILE))
        return decided, {"rule": chosen["rule"], "threshold": chosen["threshold"],
                         "source": "calibrate (chosen on these questions)"}

    def _write_plots(self, rows: List[Dict[str, Any]], name: str) -> None:
        from torchtune_blah.eval.plots import write_plots

        try:
            write_plots(rows, self._output_dir, f"{name}: {len(rows)} questions", self._expert_accuracy)
        except ImportError:
            log.info("no plots: matplotlib is not installed (pip install 'torchtune-blah[plots]')")


def _init_distributed(device: str) -> Tuple[int, int]:
    """(world size, rank); joins the process group torchrun describes (``parallel.init_process_group``)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 1, 0
    import torch.distributed as dist

    from torchtune_blah.parallel import init_process_group

    init_process_group(device)
    return dist.get_world_size(), dist.get_rank()


def _barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    config.log_config(recipe_name="BlahEvalRecipe", cfg=cfg)
    recipe = BlahEvalRecipe(cfg)
    recipe.setup()
    recipe.evaluate()
    if recipe._world_size > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(recipe_main())
