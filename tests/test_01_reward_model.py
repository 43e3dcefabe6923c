"""01_reward_model.ipynb run top to bottom with papermill.

- offline preset, its own defaults: held-out pairwise accuracy >= 0.95 read from metrics.json; positive text
  scores above negative text (labels not inverted); a second run loads the checkpoint instead of retraining;
- the imdb code path with a tiny random DistilBERT and a tiny IMDb-format folder: LoRA lands on q_lin/v_lin
  and nothing else of the encoder moves, the head trains, save + reload scores like the model in memory;
- the seed's `last_layer` comparison moves only the last layer and the head;
- an interrupted training resumes from its last epoch, for the length it started with, and ends with the
  weights of an uninterrupted one;
- a bad config field fails before any model is loaded, with a message naming it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import utils
from tests import tiny
from tests.notebook import kill_notebook_when, run_notebook

pm = pytest.importorskip("papermill")
from safetensors.torch import load_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "01_reward_model.ipynb"
pytestmark = pytest.mark.slow


def run(workdir: Path, name: str, **parameters) -> tuple[str, float]:
    """Execute 01 in `workdir`; return its printed output and wall time."""
    return run_notebook("01_reward_model", workdir, **parameters)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


# ------------------------------------------------------------------------------------------------------
# offline preset
# ------------------------------------------------------------------------------------------------------


def test_offline_preset_reaches_095_and_reloads_without_retraining(tmp_path):
    ck = tmp_path / "ck"
    text, first = run(tmp_path, "first", PRESET="offline", CHECKPOINTS=str(ck))
    folder = ck / "reward_model"
    metrics_file = folder / "metrics.json"
    m = json.loads(metrics_file.read_text())
    print(
        f"offline: accuracy {m['pairwise_accuracy']:.4f}, gap {m['reward_gap']:.3f} "
        f"(+{m['mean_reward_positive']:.3f} / {m['mean_reward_negative']:.3f}), "
        f"train {m['train_seconds']:.0f} s, notebook {first:.0f} s"
    )
    for key in ("pairwise_accuracy", "mean_reward_positive", "mean_reward_negative", "reward_gap"):
        assert isinstance(m[key], float), key
    assert m["pairwise_accuracy"] >= 0.95
    assert m["mean_reward_positive"] > m["mean_reward_negative"]
    assert m["reward_gap"] == pytest.approx(m["mean_reward_positive"] - m["mean_reward_negative"], rel=1e-5)
    assert (m["preset"], m["mode"], m["epochs"]) == ("offline", "lora", len(m["history"]) - 1)
    assert m["train_seconds"] > 0 and m["reload_max_abs_diff"] < 1e-4
    assert m["model"]["lora_targets"] == ["query", "value"]  # MiniLM is a BERT
    assert not (ck / "reward_model_progress").exists()  # cleaned up once the model is saved

    # the checkpoint as 02-04 use it: plain transformers, positive reviews score higher (labels not inverted)
    model, tok = utils.load_reward_model(str(folder))
    scores = utils.score_texts(
        model, tok, ["A brilliant, moving film. Highly recommended.", "An awful, boring mess. Avoid it."]
    )
    assert scores[0] > scores[1]

    # second run: the finished checkpoint is loaded, not retrained, and gives the same figures
    before = metrics_file.read_bytes()
    text, second = run(tmp_path, "second", PRESET="offline", CHECKPOINTS=str(ck))
    assert "not retrained" in text and "epoch 1:" not in text
    assert metrics_file.read_bytes() == before
    recomputed, stored = re.search(r"held-out accuracy ([\d.]+) \(stored ([\d.]+)\)", text).groups()
    assert recomputed == stored
    assert second < first


# ------------------------------------------------------------------------------------------------------
# imdb code path with tiny random models
# ------------------------------------------------------------------------------------------------------

TINY = dict(epochs=2, batch_size=4, batches_per_epoch=3, val_pairs=8, eval_batch_size=8, max_length=64)


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_assets")
    return {
        "distilbert": tiny.save_tiny_reward(d / "distilbert", arch="distilbert"),
        "bert": tiny.save_tiny_reward(d / "bert", arch="bert"),
        "data": tiny.save_tiny_reviews(d / "data"),
    }


def tiny_overrides(assets, arch="distilbert", **kw):
    return {"reward_base": assets[arch], "data": assets["data"], **TINY, **kw}


@pytest.fixture(scope="module")
def tiny_lora_run(tiny_assets, tmp_path_factory):
    """One uninterrupted imdb-path run on the tiny DistilBERT: (checkpoint folder, printed output)."""
    d = tmp_path_factory.mktemp("tiny_lora")
    # with a local-folder STORE: trains, and the store receives the finished model
    overrides = tiny_overrides(tiny_assets)
    text, _ = run(d, "lora", PRESET="imdb", CHECKPOINTS="ck", OVERRIDES=overrides, STORE=str(d / "drive"))
    return d / "ck" / "reward_model", text  # CHECKPOINTS is relative: it lands in the papermill cwd


def test_imdb_path_lora_on_distilbert(tiny_assets, tiny_lora_run):
    folder, text = tiny_lora_run
    m = json.loads((folder / "metrics.json").read_text())
    assert m["preset"] == "imdb" and m["mode"] == "lora" and m["epochs"] == 2
    assert "is stored in" in text
    stored = folder.parent.parent / "drive" / "reward_model"
    assert (stored / "metrics.json").read_bytes() == (folder / "metrics.json").read_bytes()
    card = (stored / "README.md").read_text()  # the model card went with it
    assert card.startswith("---\n") and "| pairwise_accuracy |" in card and tiny_assets["distilbert"] in card
    assert m["model"]["lora_targets"] == ["q_lin", "v_lin"]
    assert m["model"]["head"] == ["pre_classifier", "classifier"]
    assert m["mixed_precision"] == "no"  # no GPU here: 'auto' must not ask for fp16 on the CPU
    assert m["reload_max_abs_diff"] < 1e-6  # save + reload scores like the merged model in memory
    assert json.loads((folder / "reward_config.json").read_text())["reward_base"] == tiny_assets["distilbert"]

    # merged LoRA: the query/value projections of every layer moved, nothing else in the encoder did
    base, trained = weights(Path(tiny_assets["distilbert"])), weights(folder)
    assert set(trained) == set(base)
    moved = {k for k in base if not torch.equal(base[k], trained[k])}
    lora = {k for k in base if re.search(r"\.(q_lin|v_lin)\.weight$", k)}
    head = {k for k in base if k.startswith(("pre_classifier.", "classifier."))}
    assert len(lora) == 4 and lora <= moved  # 2 layers x (query, value)
    assert head <= moved
    assert moved == lora | head

    # the folder is what 02 loads: one output named 'reward', deterministic scores
    model, tok = utils.load_reward_model(str(folder))
    assert model.config.num_labels == 1 and model.config.id2label[0] == "reward"
    texts = ["great wonderful film", "awful boring plot"]
    assert torch.equal(utils.score_texts(model, tok, texts), utils.score_texts(model, tok, texts))


def test_finished_checkpoint_is_loaded_unless_forced(tiny_assets, tiny_lora_run, tmp_path):
    import shutil

    folder, _ = tiny_lora_run
    shutil.copytree(folder.parent, tmp_path / "ck")
    metrics_file = tmp_path / "ck" / "reward_model" / "metrics.json"
    before = metrics_file.read_bytes()
    text, _ = run(tmp_path, "load", PRESET="imdb", CHECKPOINTS="ck", OVERRIDES=tiny_overrides(tiny_assets))
    assert "not retrained" in text and "epoch 1:" not in text
    assert metrics_file.read_bytes() == before
    recomputed, stored = re.search(r"held-out accuracy ([\d.]+) \(stored ([\d.]+)\)", text).groups()
    assert recomputed == stored

    # FORCE_RETRAIN trains again, and on the CPU lands on the same weights (everything is seeded)
    overrides = tiny_overrides(tiny_assets)
    text, _ = run(tmp_path, "force", PRESET="imdb", CHECKPOINTS="ck", OVERRIDES=overrides, FORCE_RETRAIN=True)
    assert "epoch 1:" in text and "epoch 2:" in text
    a, b = weights(tmp_path / "ck" / "reward_model"), weights(folder)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_last_layer_mode_moves_only_last_layer_and_head(tiny_assets, tmp_path):
    overrides = tiny_overrides(tiny_assets, arch="bert", mode="last_layer", epochs=1)
    run(tmp_path, "last_layer", PRESET="imdb", CHECKPOINTS="ck", OVERRIDES=overrides)
    folder = tmp_path / "ck" / "reward_model"
    m = json.loads((folder / "metrics.json").read_text())
    assert m["mode"] == "last_layer" and m["model"]["head"] == ["bert.pooler", "classifier"]
    base, trained = weights(Path(tiny_assets["bert"])), weights(folder)
    moved = {k for k in base if not torch.equal(base[k], trained[k])}
    allowed = ("bert.encoder.layer.1.", "bert.pooler.", "classifier.")  # the tiny BERT has 2 layers
    assert moved and all(k.startswith(allowed) for k in moved), sorted(moved)
    assert any(k.startswith("bert.encoder.layer.1.") for k in moved)
    assert any(k.startswith("classifier.") for k in moved)


def test_interrupted_training_resumes_to_the_same_model(tiny_assets, tiny_lora_run, tmp_path):
    # session 1 runs out of time after its first epoch: progress saved, no finished model
    overrides = tiny_overrides(tiny_assets, time_budget_minutes=1e-9)
    text, _ = run(tmp_path, "session1", PRESET="imdb", CHECKPOINTS="ck", OVERRIDES=overrides)
    folder = tmp_path / "ck" / "reward_model"
    assert "rerun this notebook to continue" in text
    assert not (folder / "metrics.json").exists()
    progress = torch.load(tmp_path / "ck" / "reward_model_progress" / "progress.pt", weights_only=True)
    assert progress["epoch"] == 1

    # session 2 continues from epoch 1 and ends where the uninterrupted run ended, bit for bit on the CPU.
    # Its OVERRIDES leave out the run's length: it goes on for the 2 x 3 batches it started with, not for
    # the imdb default schedule's (the defaults may change between sessions, as they did in this version)
    length = ("epochs", "batches_per_epoch")
    overrides = {k: v for k, v in tiny_overrides(tiny_assets).items() if k not in length}
    text, _ = run(tmp_path, "session2", PRESET="imdb", CHECKPOINTS="ck", OVERRIDES=overrides)
    assert "keeps its own {'epochs': 2, 'batches_per_epoch': 3}" in text
    assert "resuming after epoch 1 of 2" in text
    resumed = json.loads((folder / "metrics.json").read_text())
    uninterrupted_folder, _ = tiny_lora_run
    uninterrupted = json.loads((uninterrupted_folder / "metrics.json").read_text())
    assert resumed["resumed_from_epoch"] == 1 and uninterrupted["resumed_from_epoch"] is None
    a, b = weights(folder), weights(uninterrupted_folder)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["history"] == uninterrupted["history"]


def test_bad_config_field_is_named_before_loading(tiny_assets, tmp_path):
    overrides = tiny_overrides(tiny_assets, mode="full")
    with pytest.raises(pm.PapermillExecutionError, match=r"RewardConfig\.mode='full'"):
        run(tmp_path, "bad", PRESET="imdb", CHECKPOINTS="ck", OVERRIDES=overrides)
    assert not (tmp_path / "ck").exists()  # nothing was trained or written


def test_a_dead_session_resumes_from_the_store(tiny_assets, tmp_path):
    """01 killed (SIGKILL, kernel and all) after the store got an epoch's progress, its local files lost
    (a new Kaggle session): the rerun pulls the progress, continues from that epoch and ends with the
    weights of an uninterrupted run, bit for bit on the CPU."""
    import shutil

    overrides = tiny_overrides(tiny_assets, epochs=4, batches_per_epoch=6)
    (tmp_path / "whole").mkdir()
    run(tmp_path / "whole", "whole", PRESET="imdb", CHECKPOINTS="ck", OVERRIDES=overrides)
    work, drive = tmp_path / "dead", tmp_path / "drive"
    work.mkdir()
    every_epoch = {**overrides, "store_progress_minutes": 0}  # each epoch's progress to the store
    params = {"PRESET": "imdb", "CHECKPOINTS": "ck", "OVERRIDES": every_epoch, "STORE": str(drive)}
    progress = drive / "reward_model_progress" / "progress.pt"
    kill_notebook_when(NOTEBOOK, work, params, progress.exists, timeout=300)
    assert progress.exists() and not (drive / "reward_model" / "metrics.json").exists()
    stored_epoch = torch.load(progress, weights_only=True)["epoch"]

    shutil.rmtree(work / "ck", ignore_errors=True)  # the new session has nothing local
    text, _ = run(work, "again", **params)
    resumed = int(re.search(r"resuming after epoch (\d) of 4", text).group(1))
    print(f"killed with epoch {stored_epoch} in the store; resumed after epoch {resumed}")
    assert resumed >= stored_epoch >= 1
    a, b = weights(work / "ck" / "reward_model"), weights(tmp_path / "whole" / "ck" / "reward_model")
    assert all(torch.equal(a[k], b[k]) for k in a)
