"""A rerun with other settings refuses or redoes exactly the changed phases and those after
them; a rerun with the same settings resumes; ``config.yaml`` always describes the results."""

import json
import os
import shutil

import keras
import pytest
from helpers import snapshot
from test_pipeline import tiny_config, tiny_net

from metamix_tf import config as config_lib
from metamix_tf import pipeline, run_state

PHASES = ("pretrain", "search", "finetune")


def small_config(model_dir, **overrides):
    values = {
        "data": {"max_train_examples": 128, "max_eval_examples": 64},
        "pretrain": {"epochs": 1},
        "search": {"epochs": 1, "warmup_epochs": 0},
        "finetune": {"epochs": 1},
    }
    return tiny_config(model_dir, **config_lib.merge(values, overrides))


def run(config, **kwargs):
    """``pipeline.run`` on the tiny net; returns the summary and the phases that trained."""
    trained = []
    keras.utils.clear_session()
    summary = pipeline.run(config, "all", model_fn=tiny_net, verbose=False,
                           on_epoch_end=lambda phase, epoch, record: trained.append(phase),
                           **kwargs)
    return summary, sorted(set(trained), key=PHASES.index)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run of every phase (about 20 s on 2 idle cores)."""
    model_dir = tmp_path_factory.mktemp("finished")
    _, trained = run(small_config(model_dir))
    assert trained == list(PHASES)
    return model_dir


@pytest.fixture
def run_dir(finished, tmp_path):
    """A copy of the finished run, to change."""
    model_dir = tmp_path / "run"
    shutil.copytree(finished, model_dir)
    return model_dir


# -- with training ---------------------------------------------------------------------------


def test_same_settings_resume_without_training(run_dir):
    before = snapshot(run_dir)
    summary, trained = run(small_config(run_dir))
    assert trained == []
    after = snapshot(run_dir)
    # summary.json is rewritten, config.yaml names the copy's directory: nothing else moves
    assert {k: v for k, v in after.items() if k not in ("summary.json", "config.yaml")} == \
        {k: v for k, v in before.items() if k not in ("summary.json", "config.yaml")}
    assert config_lib.load([str(run_dir / "config.yaml")]) == small_config(run_dir)
    assert summary["final_val_acc"] == json.loads(
        (run_dir / "finetune.done").read_text())["val_acc"]


@pytest.mark.parametrize("overrides,keys,redo", [
    ({"search": {"target_avg_bits": 3.0}}, ["search.target_avg_bits"], "search, finetune"),
    ({"pretrain": {"learning_rate": 1e-2}, "finetune": {"epochs": 2}},
     ["pretrain.learning_rate", "finetune.epochs"], "pretrain, search, finetune"),
    ({"model": {"name": "resnet18"}}, ["model.name"], "pretrain, search, finetune"),
])
def test_changed_settings_refuse_and_change_nothing(run_dir, overrides, keys, redo):
    before = snapshot(run_dir)
    with pytest.raises(run_state.SettingsChangedError) as info:
        run(small_config(run_dir, **overrides))
    message = str(info.value)
    assert "\n" not in message
    for key in keys:
        assert key in message
    assert "--model_dir" in message and "--overwrite" in message
    assert f"to redo {redo}." in message
    assert snapshot(run_dir) == before  # config.yaml included


def test_overwrite_redoes_exactly_the_changed_phase_and_after(run_dir):
    before = snapshot(run_dir)
    # kd_temperature without a teacher trains the same weights: the point is which phases run
    config = small_config(run_dir, finetune={"kd_temperature": 2.0})
    summary, trained = run(config, overwrite=True)
    assert trained == ["finetune"]
    after = snapshot(run_dir)
    for name in ("pretrain.done", "pretrain.settings.json", "float.keras", "search.done",
                 "search.settings.json", "search.keras", "bits.json"):
        assert after[name] == before[name], name
    for name in ("finetune.done", "finetune.settings.json", "config.yaml"):
        assert after[name] != before[name], name
    assert config_lib.load([str(run_dir / "config.yaml")]).finetune.kd_temperature == 2.0
    assert json.loads((run_dir / "finetune.settings.json").read_text())[
        "finetune.kd_temperature"] == 2.0
    # and now the same settings again resume
    _, trained = run(config)
    assert trained == []


def test_an_explicit_earlier_phase_still_sees_later_results(run_dir):
    """--phase=search with a changed finetune setting would leave finetune.done and
    config.yaml disagreeing: refused as well."""
    before = snapshot(run_dir)
    config = small_config(run_dir, finetune={"epochs": 3})
    with pytest.raises(run_state.SettingsChangedError, match="finetune.epochs: 1 -> 3"):
        pipeline.run(config, "search", model_fn=tiny_net, verbose=False)
    assert snapshot(run_dir) == before


# -- bookkeeping only (no training) ----------------------------------------------------------


def fake_run(model_dir, config, phases=PHASES, legacy=False):
    os.makedirs(model_dir, exist_ok=True)
    config_lib.save(config, os.path.join(model_dir, "config.yaml"))
    for phase in phases:
        (model_dir / f"{phase}.done").write_text("{}")
        if not legacy:
            run_state.record(config, phase, str(model_dir))


@pytest.mark.parametrize("section,key,value,stale", [
    ("data", "batch_size", 32, PHASES),
    ("model", "dropout", 0.1, PHASES),
    ("quant", "candidate_bits", [2, 4], ("search", "finetune")),
    ("search", "cost_weight", 1.0, ("search", "finetune")),
    ("finetune", "learning_rate", 1e-3, ("finetune",)),
])
def test_stale_phases_follow_the_sections_each_phase_depends_on(tmp_path, section, key,
                                                                  value, stale):
    fake_run(tmp_path, small_config(tmp_path))
    changed = small_config(tmp_path, **{section: {key: value}})
    assert run_state.stale_phases(changed, overwrite=True) == stale
    with pytest.raises(run_state.SettingsChangedError, match=rf"{section}\.{key}: "):
        run_state.stale_phases(changed)


def test_keys_that_do_not_change_results_are_not_compared(tmp_path):
    fake_run(tmp_path, small_config(tmp_path))
    moved = small_config(tmp_path, jit_compile=True, data={"eval_batch_size": 32})
    assert run_state.stale_phases(moved) == ()


def test_phases_without_results_are_not_compared(tmp_path):
    fake_run(tmp_path, small_config(tmp_path), phases=("pretrain",))
    assert run_state.stale_phases(small_config(tmp_path, search={"cost_weight": 1.0})) == ()
    with pytest.raises(run_state.SettingsChangedError, match="redo pretrain, search"):
        run_state.stale_phases(small_config(tmp_path, pretrain={"epochs": 5}))


def test_run_directory_without_settings_files_is_compared_with_its_config_yaml(tmp_path):
    fake_run(tmp_path, small_config(tmp_path), legacy=True)
    assert run_state.stale_phases(small_config(tmp_path)) == ()
    with pytest.raises(run_state.SettingsChangedError, match="search.target_avg_bits"):
        run_state.stale_phases(small_config(tmp_path, search={"target_avg_bits": 3.0}))


def test_clear_removes_the_phase_outputs_and_keeps_the_rest(tmp_path):
    fake_run(tmp_path, small_config(tmp_path))
    for name in ("float.keras", "search.keras", "bits.json", "final.keras", "summary.json"):
        (tmp_path / name).write_text("x")
    (tmp_path / "ckpt" / "search").mkdir(parents=True)
    removed = run_state.clear(str(tmp_path), ("search", "finetune"))
    assert {os.path.basename(p) for p in removed} >= {"search.done", "search.keras",
                                                      "bits.json", "final.keras", "search"}
    left = set(os.listdir(tmp_path))
    assert {"pretrain.done", "float.keras", "config.yaml", "ckpt"} <= left
    assert not left & {"search.done", "finetune.done", "bits.json", "summary.json"}
