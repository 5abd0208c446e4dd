# torchtune-blah: answer new, unlabeled questions with a trained run.
#
#   tune run blah_generate --config blah_generate run_dir=/tmp/torchtune-blah/smollm2_135m \
#     context="..." question="..." explain=true
#   tune run blah_generate --config blah_generate run_dir=... questions=questions.jsonl
#
# The same model, prompts, pause tokens, stop rule and abstention probability as blah_eval
# (torchtune_blah.eval.run), without gold answers; abstain_threshold=calibrated (or a number) uses
# the calibrated rule of torchtune_blah.eval.abstention. Rows are appended to
# output_dir/generations.jsonl one finished batch at a time; a rerun resumes
# (torchtune_blah.resumable).

import os
import sys
from dataclasses import dataclass
from typing import List

from omegaconf import DictConfig
from torchtune import config, training, utils
from tqdm import tqdm

from torchtune_blah.chat_format import chat_format
from torchtune_blah.checkpointing import atomic_json, atomic_text
from torchtune_blah.config_schema import GenerateConfig, typed_config
from torchtune_blah.data.squad import ANSWER_PREFIX, SquadRecord, load_questions_jsonl, question_id
from torchtune_blah.eval.abstention import abstention_from_config
from torchtune_blah.eval.run import EXPLAIN_PROMPT, Answerer, answer_into, run_prompts
from torchtune_blah.prediction import Prediction, upgrade_row
from torchtune_blah.resumable import ResumableJsonl, check_settings, jsonl
from torchtune_blah.run_dir import STAGING_DIR, RunDir

log = utils.get_logger("INFO")
OUTPUT_FILE = "generations.jsonl"


@dataclass
class Config(GenerateConfig):
    """Every key of this recipe's config, with its default: ``torchtune_blah.config_schema.GenerateConfig``'s.
    A copy of this file (``tune cp blah_generate my_generate.py``) adds its own keys here."""


def _questions(cfg: DictConfig) -> List[SquadRecord]:
    one = cfg.context is not None or cfg.question is not None
    if bool(cfg.questions) == one:
        raise ValueError("give either questions=<file.jsonl> or both context=... and question=...")
    if not one:
        return load_questions_jsonl(str(cfg.questions))
    context, question = cfg.context, cfg.question
    for name, value in (("context", context), ("question", question)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{name} must be a non-empty text (quote it on the command line: {name}=\"...\")")
    return [SquadRecord(id=question_id(context, question), context=context, question=question, answers=())]


class _Streamer:
    """Prints one reply's tokens as they come (decoding the whole reply each time, so multi-byte
    characters split across tokens print once complete)."""

    def __init__(self, fmt):
        self.fmt, self.tokens, self.printed = fmt, [], ""

    def __call__(self, row: int, token: int) -> None:
        if token in self.fmt.end_ids:
            return
        self.tokens.append(token)
        text = self.fmt.decode(self.tokens)
        if not text.endswith("\ufffd"):
            print(text[len(self.printed):], end="", flush=True)
            self.printed = text


class BlahGenerateRecipe:
    schema = Config

    def __init__(self, cfg: DictConfig) -> None:
        # Read through the schema: a misspelt key fails here, naming it; every key left out has its default.
        self._cfg = cfg = typed_config(cfg, self.schema, "blah_generate")
        self._run_dir = str(cfg.run_dir)
        run = RunDir(self._run_dir)
        self._run_cfg = run.read_config()
        self._stage = run.resolve_stage(str(cfg.stage))
        # device and dtype: the run's unless given (None)
        self._device = utils.get_device(device=cfg.device or self._run_cfg.get("device", "cpu"))
        self._dtype = training.get_dtype(cfg.dtype or self._run_cfg.get("dtype", "fp32"), device=self._device)
        self._prompt_style, self._prompts = run_prompts(self._run_cfg, cfg.prompt_style)
        self._records = _questions(cfg)
        self._abstention = abstention_from_config(cfg, self._run_cfg, self._run_dir, self._stage, self._prompt_style)
        one_question = cfg.questions is None
        self._stream = bool(one_question if cfg.stream is None else cfg.stream)  # (None: stream one question)
        self._batch_size = 1 if self._stream else cfg.batch_size
        self._output_dir = str(cfg.output_dir)
        self._settings = {
            "run_dir": self._run_dir, "stage": self._stage, "prompt_style": self._prompt_style,
            "explain": cfg.explain,
            "explain_prompt": EXPLAIN_PROMPT if cfg.explain_prompt is None else str(cfg.explain_prompt),
            "max_new_tokens": cfg.max_new_tokens, "max_explain_tokens": cfg.max_explain_tokens,
        }
        if self._abstention is not None:  # (absent for greedy, so older outputs still resume)
            self._settings["abstention"] = self._abstention

    def setup(self) -> None:
        path = os.path.join(self._output_dir, "generate_settings.json")
        check_settings(path, self._settings, "answers made")
        os.makedirs(self._output_dir, exist_ok=True)
        atomic_json(self._settings, path)
        abstention = (self._abstention["rule"], self._abstention["threshold"]) if self._abstention else None
        self._answerer = Answerer.load(
            self._run_cfg, self._run_dir, self._stage, self._device, self._dtype,
            staging_dir=os.path.join(self._output_dir, STAGING_DIR), quantize_base=self._cfg.quantize_base,
            prompt_style=self._prompt_style, prompts=self._prompts, max_new_tokens=self._settings["max_new_tokens"],
            abstention=abstention)
        self._fmt = chat_format(self._answerer.tokenizer)

    def _answer(self, batch: List[SquadRecord]) -> List[Prediction]:
        settings = self._settings
        if self._stream:
            print(f"\nQuestion: {batch[0].question}\nReply: {ANSWER_PREFIX}", end="", flush=True)
        replies = self._answerer.replies(batch, on_token=_Streamer(self._fmt) if self._stream else None)
        rows = self._answerer.rows(batch, replies, scored=False)
        if settings["explain"]:
            if self._stream:
                print(f"\n\n{settings['explain_prompt']}\n", end="", flush=True)
            explanations = self._answerer.explain(batch, replies, explain_prompt=settings["explain_prompt"],
                                                  max_new_tokens=settings["max_explain_tokens"],
                                                  on_token=_Streamer(self._fmt) if self._stream else None)
            for row, explanation in zip(rows, explanations):
                row["explanation"] = explanation
        if self._stream:
            print(f"\n\nAnswer: {rows[0]['model_answer']!r}   P(no answer in the context) = {rows[0]['na_prob']:.3f}")
        return rows

    def generate(self) -> List[Prediction]:
        # Batches of questions of similar length (less padding); the file lists them in input order.
        output = ResumableJsonl(os.path.join(self._output_dir, OUTPUT_FILE),
                                self._answerer.by_prompt_length(self._records), self._batch_size,
                                upgrade=lambda row, record: upgrade_row(row, record, self._settings))

        def show(rows: List[Prediction]) -> None:
            for row in rows:
                tqdm.write(f"{row['id']}: {row['model_answer']!r}  P(no answer)={row['na_prob']:.3f}  "
                           f"({row['question'][:60]})")

        by_id = {r["id"]: r for r in answer_into(output, self._answer, show=not self._stream,
                                                 on_rows=None if self._stream else show)}
        rows = [by_id[r.id] for r in self._records]
        atomic_text(jsonl(rows), output.path)
        abstained = sum(r["prediction"] == "" for r in rows)
        log.info(f"blah_generate: {len(rows)} answers ({abstained} 'not in the context') in {output.path}")
        return rows


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    config.log_config(recipe_name="BlahGenerateRecipe", cfg=cfg)
    recipe = BlahGenerateRecipe(cfg)
    recipe.setup()
    recipe.generate()


if __name__ == "__main__":
    sys.exit(recipe_main())
