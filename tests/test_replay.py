"""Retraining on corrections with replay (data.replay): what is mixed in, seeded, and the mistakes
refused before any weights load."""

import json
import os

import pytest
from omegaconf import OmegaConf

from conftest import demo_cfg, fast_overrides
from torchtune_blah.data import replay as replay_module
from torchtune_blah.data.replay import ReplayError, check_replay, with_replay
from torchtune_blah.data.squad import load_squad_records
from torchtune_blah.recipe_config import ConfigError


@pytest.fixture
def fake_run(tmp_path, monkeypatch):
    """A run folder whose training records are 40 bundled questions (trained_records replaced)."""
    run = tmp_path / "previous"
    run.mkdir()
    (run / "blah_config.yaml").write_text("seed: 1\n")
    seen = load_squad_records("bundled_sample")[:40]
    monkeypatch.setattr(replay_module, "trained_records", lambda run_dir, tokenizer: list(seen))
    return str(run), seen


def test_replay_mixes_a_seeded_sample_of_what_the_run_trained_on(fake_run):
    run, seen = fake_run
    corrections = load_squad_records("bundled_sample")[35:45]  # 5 of them the run also trained on
    assert check_replay({"from_run": run})["corrections_repeat"] == 2  # the default: each correction twice
    once = {"corrections_repeat": 1}
    mixed = with_replay(corrections, check_replay({"from_run": run, "ratio": 2.0, "seed": 3, **once}), tokenizer=None)
    assert mixed[:10] == corrections and len(mixed) == 30
    replayed = [r.id for r in mixed[10:]]
    assert len(set(replayed)) == 20 and set(replayed) <= {r.id for r in seen} - {r.id for r in corrections}
    again = with_replay(corrections, check_replay({"from_run": run, "ratio": 2.0, "seed": 3, **once}), tokenizer=None)
    other = with_replay(corrections, check_replay({"from_run": run, "ratio": 2.0, "seed": 4, **once}), tokenizer=None)
    assert [r.id for r in again] == [r.id for r in mixed] and [r.id for r in other] != [r.id for r in mixed]
    half = with_replay(corrections, check_replay({"from_run": run, "ratio": 0.5, **once}), tokenizer=None)
    assert len(half) == 15  # below 1: the corrections weigh more
    everything = with_replay(corrections, check_replay({"from_run": run, "ratio": 10, **once}), tokenizer=None)
    assert len(everything) == 10 + 35  # asks for 100, the run trained on 35 others: all of them
    assert with_replay(corrections, check_replay({"from_run": None, "ratio": 2}), tokenizer=None) == corrections
    # corrections_repeat weighs the corrections up: each one k times, the replay still ratio x the distinct ones
    weighted = with_replay(corrections, check_replay({"from_run": run, "ratio": 1.0, "corrections_repeat": 3,
                                                      "seed": 3}), tokenizer=None)
    assert weighted[:30] == corrections * 3 and len(weighted) == 40
    assert not {r.id for r in weighted[30:]} & {r.id for r in corrections}
    # a first run (from_run null, the shipped configs without init_from): nothing repeated, nothing replayed
    assert with_replay(corrections, check_replay({"from_run": None, "corrections_repeat": 2}), tokenizer=None) \
        == corrections


def test_replay_section_mistakes_name_the_key(tmp_path):
    for section, message in [({"from_run": str(tmp_path), "ratio": -0.5}, r"dataset.replay.ratio=-0.5"),
                             ({"from_run": str(tmp_path), "ratio": "lots"}, r"dataset.replay.ratio"),
                             ({"from_run": str(tmp_path), "ration": 1}, r"dataset.replay.ration is not a replay key"),
                             ({"from_run": str(tmp_path)}, r"blah_config.yaml not found"),
                             ({"from_run": str(tmp_path), "seed": 1.5}, r"dataset.replay.seed"),
                             ({"from_run": None, "corrections_repeat": 0}, r"dataset.replay.corrections_repeat=0"),
                             ({"from_run": None, "corrections_repeat": 1.5}, r"corrections_repeat=1.5")]:
        with pytest.raises(ReplayError, match=message):
            check_replay(section)


def test_retraining_mistakes_fail_before_weights_load(tmp_path, tiny_base, fake_run):
    from torchtune_blah.recipes.blah_qlora import BlahQLoRARecipe

    run, _ = fake_run
    empty = tmp_path / "corrections.jsonl"
    empty.write_text("")
    no_question = tmp_path / "bad.jsonl"
    no_question.write_text(json.dumps({"id": "q1", "context": "Some text.", "answers": []}) + "\n")
    data = {"dataset._component_": "torchtune_blah.data.squad_chat_dataset", "dataset.source": "json"}
    for extra, message in [({"dataset.data_files": str(empty)}, "dataset.data_files: .*"),
                           ({"dataset.data_files": str(no_question)}, "dataset.data_files: .*question"),
                           ({"dataset.data_files": str(tmp_path / "missing.jsonl")}, "dataset.data_files"),
                           ({"dataset.data_files": str(no_question), "dataset.replay.ratio": -1},
                            "dataset.replay.ratio=-1"),
                           ({"dataset.replay.from_run": str(tmp_path)}, "dataset.replay.from_run: .* not found")]:
        cfg = demo_cfg(fast_overrides(tmp_path / "o", tiny_base, **{**data, **extra}))
        with pytest.raises(ConfigError, match=message):
            BlahQLoRARecipe(cfg)


def test_shipped_configs_replay_from_init_from():
    from conftest import REPO

    for name in [n for n in os.listdir(os.path.join(REPO, "configs")) if n.endswith(".yaml")]:
        cfg = OmegaConf.load(os.path.join(REPO, "configs", name))
        if "init_from" not in cfg:
            continue
        assert OmegaConf.to_container(cfg.dataset.replay) == {"from_run": "${init_from}", "ratio": 1.0,
                                                              "corrections_repeat": 2, "seed": 0}, name
        cfg.init_from = "/somewhere/run"
        assert cfg.dataset.replay.from_run == "/somewhere/run"


@pytest.mark.slow
def test_trained_records_are_the_ones_the_sampler_drew(trained_run, tokenizer):
    from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
    from torchtune import config

    from torchtune_blah.data.replay import trained_records
    from torchtune_blah.run_dir import RunDir

    run_cfg = RunDir(trained_run).read_config()
    records = trained_records(trained_run, config.instantiate(run_cfg.tokenizer))
    dataset = config.instantiate(run_cfg.dataset, config.instantiate(run_cfg.tokenizer))
    order = list(StatefulDistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=run_cfg.seed))
    # lora: 120 steps of 4 = 480 draws, more than one epoch of the demo data: every record
    assert len(order) < 480 and {r.id for r in records} == {r.id for r in dataset.records}
    # a run of 3 steps of 2 trained on the first 6 of its sampler's order
    short = OmegaConf.merge(run_cfg, OmegaConf.from_dotlist(["lora.max_steps=3", "lora.batch_size=2",
                                                              "embed.max_steps=1", "embed.batch_size=2"]))
    folder = os.path.join(os.path.dirname(trained_run), "short_config")
    os.makedirs(folder, exist_ok=True)
    OmegaConf.save(short, os.path.join(folder, "blah_config.yaml"))
    assert [r.id for r in trained_records(folder, config.instantiate(run_cfg.tokenizer))] == \
        [dataset.records[i].id for i in order[:6]]
