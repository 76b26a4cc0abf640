"""Sequence classification through the same loop (issue 13): rank/accumulation equivalence, the
exported classifier, LoRA and frozen-encoder training, bad rows, label discovery."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data.build import discover_labels
from data.config import DataConfig
from data.loader import DataError, InstructionDataset
from tests.classify_fixtures import labelled_rows, write_jsonl, write_tiny_bert
from tests.test_distributed_training import assert_close_rel, read_losses


@pytest.fixture(scope="module")
def clf(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clf")
    write_tiny_bert(root / "model")
    write_jsonl(labelled_rows(256, 0), root / "train.jsonl")
    write_jsonl(labelled_rows(48, 1), root / "eval.jsonl")
    return root


def clf_args(root: Path, run_dir: Path, *extra: str) -> list[str]:
    config = {
        "run_dir": str(run_dir),
        "seed": 3,
        "task": "sequence_classification",
        "model": {"name_or_path": str(root / "model")},
        "data": {
            "train_path": str(root / "train.jsonl"),
            "eval_path": str(root / "eval.jsonl"),
            "format": "classification",
            "seq_len": 64,
        },
        "train": {"micro_batch_size": 8, "grad_accum_steps": 1, "max_steps": 6},
        "optim": {"lr": 3.0e-3, "weight_decay": 0.1},
        "schedule": {"warmup_steps": 2},
        "logging": {"every_steps": 1, "progress_bar": "off"},
    }
    path = run_dir.parent / f"{run_dir.name}.json"  # YAML is a superset of JSON
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config))
    return [str(path), *extra]


def _train_rank(argv: list[str]) -> dict:
    import launch.train as lt

    return lt.run(argv)


@pytest.mark.timeout(300)
def test_two_ranks_equal_one_rank_with_double_accumulation(clf, tmp_path, ranks):
    """Acceptance 1: per-example cross-entropy normalized by the global number of examples of
    the step: 2 ranks x accumulation 2 equal 1 rank x 4 (rows of 4 to 64 tokens)."""
    two, one = tmp_path / "two", tmp_path / "one"
    ranks(_train_rank, 2, clf_args(clf, two, "train.grad_accum_steps=2"))
    ranks(_train_rank, 1, clf_args(clf, one, "train.grad_accum_steps=4"))
    losses_two, losses_one = read_losses(two), read_losses(one)
    assert len(losses_two) == len(losses_one) == 6
    for a, b in zip(losses_two, losses_one, strict=True):
        assert abs(a - b) <= 1e-5 * abs(b), (losses_two, losses_one)
    w_two = load_file(two / "model" / "model.safetensors")
    w_one = load_file(one / "model" / "model.safetensors")
    for name in w_one:
        if "attention.self.key.bias" in name:
            # Softmax ignores a shift of every score: the key bias gets a zero gradient in exact
            # arithmetic, so it holds only rounding noise (~1e-8) that no relative test fits.
            assert float((w_two[name] - w_one[name]).abs().max()) <= 1e-6
            continue
        assert_close_rel(w_two[name], w_one[name], 1e-5)
    initial = load_file(clf / "model" / "model.safetensors")
    assert not torch.equal(initial["classifier.weight"], w_one["classifier.weight"])


@pytest.mark.timeout(300)
def test_the_exported_classifier_names_its_labels_and_eval_reports_them(clf, tmp_path, ranks):
    """Acceptance 4 (HF part) and item 4: the model loads with
    AutoModelForSequenceClassification and its id2label; eval gives loss, accuracy, macro-F1
    and a confusion matrix (summary.json, TensorBoard)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModelForSequenceClassification

    run = tmp_path / "run"
    summary = ranks(_train_rank, 1, clf_args(clf, run, "eval.at_start=true"))[0]
    model = AutoModelForSequenceClassification.from_pretrained(run / "model")
    assert model.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    assert model.config.label2id == {"neg": 0, "neu": 1, "pos": 2}
    last = summary["eval"][-1]
    assert {"eval/loss", "eval/accuracy", "eval/macro_f1"} <= set(last)
    matrix = last["confusion_matrix"]
    assert len(matrix) == 3 and sum(map(sum, matrix)) == 48
    assert last["eval/accuracy"] == sum(matrix[i][i] for i in range(3)) / 48
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    assert "eval/confusion_matrix" in acc.Tags()["images"]
    assert "eval/macro_f1" in acc.Tags()["scalars"]


def _trained_tensors(run: Path, initial: dict[str, torch.Tensor]) -> set[str]:
    final = load_file(run / "model" / "model.safetensors")
    return {k for k in initial if not torch.equal(initial[k], final[k])}


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("extra", "trains"),
    [
        (
            ("method=lora", "lora.target_modules=[query,value]", "output.merge_adapter=true"),
            {"query", "value", "classifier"},
        ),
        (("freeze.encoder=true",), {"classifier"}),
    ],
    ids=["lora", "frozen-encoder"],
)
def test_lora_and_frozen_encoder_train_only_their_part_and_resume_bitwise(
    clf, tmp_path, extra, trains
):
    """Acceptance 3: LoRA changes only the adapted projections (merged) and the head; the
    frozen encoder only the head; a run SIGKILLed mid-accumulation resumes bit for bit."""
    from tests.launcher import run_torchrun, torchrun_env
    from tests.test_checkpoint_resume import last_losses

    common = ("train.grad_accum_steps=2", "checkpoint.every_steps=2", *extra)

    def train(run_dir: Path, fault: str | None = None):
        env = torchrun_env(**({"FTTRAIN_FAULT": fault} if fault else {}))
        argv = ["-m", "launch.train", *clf_args(clf, run_dir, *common)]
        return run_torchrun(argv, nproc=2, timeout=240, env=env)

    straight, crashy = tmp_path / "straight", tmp_path / "crashy"
    proc = train(straight)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert train(crashy, fault="micro_step:5:1").returncode != 0
    proc = train(crashy)
    assert proc.returncode == 0 and "resume: continuing from" in proc.stdout, proc.stdout[-3000:]
    assert last_losses(crashy) == last_losses(straight)

    lora = "method=lora" in extra
    out = "model-merged" if lora else "model"
    initial = load_file(clf / "model" / "model.safetensors")
    a = load_file(crashy / out / "model.safetensors")
    b = load_file(straight / out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)
    changed = {k for k in initial if not torch.equal(initial[k], b[k])}
    assert changed, "nothing trained"
    assert all(any(part in k for part in trains) for k in changed), sorted(changed)
    assert any("classifier" in k for k in changed)


@pytest.mark.parametrize("strict", [False, True], ids=["lenient", "strict"])
def test_bad_classification_rows_are_counted_by_kind_or_named_by_line(tmp_path, strict):
    """Acceptance 5: missing label, unknown label, empty text, wrong label type."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(write_tiny_bert(tmp_path / "model"))
    rows = labelled_rows(200, 0)
    rows[3] = {"text": "a good day"}  # no label
    rows[7] = {"text": "a good day", "label": "great"}  # not a label name
    rows[9] = {"text": "   ", "label": "pos"}  # empty text
    rows[11] = {"text": "fine", "label": 7}  # an id out of range
    rows[13] = {"text": "fine", "label": 1.5}  # wrong type
    path = write_jsonl(rows, tmp_path / "train.jsonl")
    cfg = DataConfig(
        train_path=str(path),
        format="classification",
        labels=["neg", "neu", "pos"],
        bad_rows="strict" if strict else "lenient",
        max_bad_fraction=0.1,
    )
    if strict:
        with pytest.raises(DataError) as e:
            InstructionDataset(path, tok, cfg)
        assert f"{path}:4: missing_field: missing field 'label'" in str(e.value)
        return
    data = InstructionDataset(path, tok, cfg)
    c = data.counts
    assert c["rows_skipped"] == 5 and c["rows_kept"] == 195
    assert c["skipped_missing_field"] == 1 and c["skipped_empty_text"] == 1
    assert c["skipped_unknown_label"] == 2 and c["skipped_wrong_type"] == 1


def test_labels_are_discovered_sorted_or_as_ids_and_bad_label_sets_are_named(tmp_path):
    def labels_of(values):
        path = write_jsonl([{"text": "x", "label": v} for v in values], tmp_path / "t.jsonl")
        return discover_labels(DataConfig(train_path=str(path), format="classification"))

    assert labels_of(["pos", "neg", "pos", "neu"]) == ["neg", "neu", "pos"]
    assert labels_of([1, 0, 1, 3]) == ["0", "1", "2", "3"]
    with pytest.raises(DataError, match="mixes label names .* and integer ids"):
        labels_of(["pos", 1])
    with pytest.raises(DataError, match="at least 2"):
        labels_of(["pos", "pos"])
    assert labels_of([True, False, True]) == ["false", "true"]  # booleans are names
    assert labels_of([1.0, 0.0, 2.0]) == ["0", "1", "2"]  # integral floats (pandas) are ids


@pytest.mark.parametrize(
    ("overrides", "culprit"),
    [
        (["data.format=instruction"], "data.format"),
        (["data.packing=true"], "data.packing"),
        (["eval.num_generate=4"], "eval.num_generate"),
        (["method=lora", "freeze.encoder=true"], "freeze"),  # LoRA trains adapters + head
        (["data.labels=[pos]"], "data.labels"),  # one class: nothing to learn
        (["data.labels=[pos,neg,pos]"], "data.labels"),
    ],
)
def test_settings_that_do_not_fit_the_task_are_config_errors(clf, tmp_path, overrides, culprit):
    from trainer.config import ConfigError, load_config

    argv = clf_args(clf, tmp_path / "run", *overrides)
    with pytest.raises(ConfigError) as e:
        load_config(argv[0], argv[1:])
    assert culprit in str(e.value)


@pytest.mark.timeout(300)
def test_qlora_trains_a_decoder_classifier_and_saves_its_head(clf, tmp_path, ranks):
    """Acceptance 3 (QLoRA for decoder classifiers): a Llama body, 4-bit, a new score head;
    the pad token is set for pooling the last real token; the adapter keeps the trained head."""
    from safetensors import safe_open

    from launch.make_demo import build_tiny_model_dir

    llama = build_tiny_model_dir(tmp_path / "llama", seed=0, hidden=32, layers=2, heads=2)
    run = tmp_path / "run"
    argv = clf_args(clf, run, f"model.name_or_path={llama}", "method=qlora")
    summary = ranks(_train_rank, 1, argv)[0]
    losses = read_losses(run)
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert summary["eval"][-1]["confusion_matrix"]
    adapter = json.loads((run / "model" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS"
    with safe_open(str(run / "model" / "adapter_model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert any("score" in n for n in names) and any("lora_" in n for n in names)
