"""`launch.export --onnx [--int8]`: the ONNX model computes the HF model's logits at any batch
and sequence size, the int8 one is a fraction of its size and mostly agrees, errors are one line.

Models are tiny and random (hidden 64, so that weights, not graph, make up the files), built from
configs: a causal Llama trained two steps by the real CLI, a BERT classifier (token_type_ids)
and a Llama classifier (pools its last non-pad token) saved as the HF directory the export
writes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from launch.onnx_export import (
    EvalData,
    OnnxExportError,
    OnnxReport,
    export_onnx,
    onnx_bytes,
    session,
    task_of,
)
from tests.conftest import tiny_config_args

# Shapes unlike the export's sample (2 x 8) and its own check's: the axes are dynamic.
SHAPES = ((5, 17), (1, 3), (2, 40))
WORDS = [f"w{i}" for i in range(300)]
LABELS = ("neg", "neu", "pos")


def padded_inputs(
    vocab: int, pad: int, batch: int, seq: int, seed: int, token_types: bool
) -> dict[str, np.ndarray]:
    """Random ids, rows after the first right-padded to shorter lengths (mask 0 there)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (batch, seq))
    ids[ids == pad] = (pad + 1) % vocab
    mask = np.ones_like(ids)
    for row in range(1, batch):
        length = max(1, seq - 3 * row)
        ids[row, length:], mask[row, length:] = pad, 0
    out = {"input_ids": ids, "attention_mask": mask}
    if token_types:
        types = np.zeros_like(ids)
        types[:, seq // 2 :] = 1
        out["token_type_ids"] = types * mask
    return out


def torch_logits(model: torch.nn.Module, inputs: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits.numpy()


def onnx_logits(path: Path, inputs: dict[str, np.ndarray]) -> np.ndarray:
    return session(path).run(["logits"], inputs)[0]


def write_bert_classifier(directory: Path) -> Path:
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(directory)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={name: i for i, name in enumerate(LABELS)},
    )
    BertForSequenceClassification(config).save_pretrained(directory)
    return directory


def write_llama_classifier(directory: Path) -> Path:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from launch.make_demo import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,  # the classifier pools the last non-pad token
        num_labels=2,
    )
    LlamaForSequenceClassification(config).save_pretrained(directory)
    return directory


def write_rows(path: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    rows = [
        {
            "text": " ".join(rng.choice(WORDS, size=int(rng.integers(2, 30)))),
            "label": LABELS[int(rng.integers(0, len(LABELS)))],
        }
        for _ in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _train_rank(argv: list[str]) -> dict:
    import launch.train as lt

    return lt.run(argv)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_causal_lm_checkpoint_exports_to_onnx_and_int8(tiny_assets, tmp_path, ranks, capsys):
    """The real path: a 2-step training checkpoint through `launch.export --onnx --int8`."""
    from transformers import AutoModelForCausalLM

    from launch.export import main as export_main
    from launch.make_demo import build_tiny_model_dir

    base = build_tiny_model_dir(tmp_path / "base", seed=0, hidden=64, layers=2, heads=4)
    run = tmp_path / "run"
    argv = tiny_config_args(tiny_assets, run, f"model.name_or_path={base}", "train.max_steps=2")
    ranks(_train_rank, 1, argv)
    out = tmp_path / "exported"
    assert export_main([str(run / "checkpoints"), "--output", str(out), "--onnx", "--int8"]) == 0
    printed = capsys.readouterr().out

    onnx_dir = out / "onnx"
    for name in ("model.onnx", "model.int8.onnx", "config.json", "tokenizer.json"):
        assert (onnx_dir / name).is_file(), name
    assert not list(onnx_dir.glob("*.safetensors"))  # the weights are in the graph
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    pad = model.config.pad_token_id
    for i, (batch, seq) in enumerate(SHAPES):
        inputs = padded_inputs(model.config.vocab_size, pad, batch, seq, i, token_types=False)
        want = torch_logits(model, inputs)
        got = onnx_logits(onnx_dir / "model.onnx", inputs)
        assert got.shape == want.shape == (batch, seq, model.config.vocab_size)
        assert np.abs(got - want).max() <= 1e-4, (batch, seq)
    assert onnx_bytes(onnx_dir / "model.int8.onnx") <= 0.4 * onnx_bytes(onnx_dir / "model.onnx")

    # The table: the three sizes, the check, and the eval set's loss under each model (the
    # run's eval_path, its instruction rows encoded as in training).
    for label in ("HF safetensors", "ONNX fp32", "ONNX int8", "int8/fp32 0."):
        assert label in printed, printed
    assert re.search(r"max abs diff fp32 \S+ ok, int8 \S+", printed), printed
    losses = re.search(
        r"eval mean token loss on (\d+) rows: hf (\S+)  onnx (\S+)  int8 (\S+)", printed
    )
    assert losses, printed
    rows, hf, fp32, int8 = int(losses[1]), *map(float, losses.group(2, 3, 4))
    assert rows == 64 and abs(hf - fp32) < 1e-3 and abs(hf - int8) < 0.1 * hf, printed


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_classifier_checkpoint_exports_with_eval_accuracy(tiny_assets, tmp_path, ranks, capsys):
    """A BERT classifier trained two steps (task=sequence_classification): the CLI exports it
    with token_type_ids and prints the accuracy of the three models on the run's eval rows."""
    from transformers import AutoModelForSequenceClassification

    from launch.export import main as export_main

    base = write_bert_classifier(tmp_path / "bert")
    run = tmp_path / "run"
    argv = tiny_config_args(
        tiny_assets,
        run,
        f"model.name_or_path={base}",
        f"data.train_path={write_rows(tmp_path / 'train.jsonl', 64, seed=1)}",
        f"data.eval_path={write_rows(tmp_path / 'eval.jsonl', 40, seed=2)}",
        "task=sequence_classification",
        "data.format=classification",
        "eval.num_generate=0",
        "train.max_steps=2",
    )
    ranks(_train_rank, 1, argv)
    out = tmp_path / "exported"
    assert export_main([str(run / "checkpoints"), "--output", str(out), "--onnx", "--int8"]) == 0
    printed = capsys.readouterr().out
    assert "(BertForSequenceClassification, sequence_classification, opset 18)" in printed
    scores = re.search(r"eval accuracy on 40 rows: hf (\S+)  onnx (\S+)  int8 (\S+)", printed)
    assert scores and scores[1] == scores[2], printed
    assert abs(float(scores[3]) - float(scores[1])) <= 0.1, printed

    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert model.config.label2id == {name: i for i, name in enumerate(LABELS)}
    inputs = padded_inputs(model.config.vocab_size, 0, 3, 21, seed=0, token_types=True)
    got = onnx_logits(out / "onnx" / "model.onnx", inputs)
    assert np.abs(got - torch_logits(model, inputs)).max() <= 1e-4


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_bert_classifier_onnx_matches_and_int8_mostly_agrees(tmp_path):
    model_dir = write_bert_classifier(tmp_path / "bert")
    eval_path = write_rows(tmp_path / "eval.jsonl", 48, seed=0)
    report = export_onnx(model_dir, int8=True, eval_data=EvalData(eval_path))
    assert report.task == "sequence_classification"
    assert report.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    assert report.int8_ratio is not None and report.int8_ratio <= 0.4
    assert report.fp32_bytes == onnx_bytes(model_dir / "onnx" / "model.onnx")

    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    agree = total = 0
    for i, (batch, seq) in enumerate((*SHAPES, (64, 12))):
        inputs = padded_inputs(model.config.vocab_size, 0, batch, seq, i, token_types=True)
        want = torch_logits(model, inputs)
        got = onnx_logits(report.fp32_path, inputs)
        assert got.shape == want.shape == (batch, len(LABELS))
        assert np.abs(got - want).max() <= 1e-4, (batch, seq)
        int8 = onnx_logits(report.int8_path, inputs)
        agree += int((int8.argmax(-1) == got.argmax(-1)).sum())
        total += batch
    assert agree >= 0.9 * total, f"int8 agrees with fp32 on {agree} of {total}"

    # Accuracy of the three on labelled rows (label names through the config's label2id).
    assert report.eval_metric == "accuracy" and report.eval_rows == 48
    assert set(report.eval_scores) == {"hf", "onnx", "int8"}
    assert report.eval_scores["hf"] == report.eval_scores["onnx"]
    assert abs(report.eval_scores["int8"] - report.eval_scores["hf"]) <= 0.1
    assert "eval accuracy on 48 rows: hf" in report.table()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_llama_classifier_onnx_pools_the_last_real_token(tmp_path):
    """A decoder classifier finds its last non-pad token from the ids: still right in ONNX at
    other lengths and paddings. An eval file that cannot be read is one warning, not a failure."""
    model_dir = write_llama_classifier(tmp_path / "llama_cls")
    report = export_onnx(model_dir, eval_data=EvalData(tmp_path / "missing.jsonl"))
    assert report.input_names == ["input_ids", "attention_mask"]
    assert report.int8_path is None and not (model_dir / "onnx" / "model.int8.onnx").exists()
    assert report.eval_warning and "missing.jsonl" in report.eval_warning
    assert report.eval_scores == {} and "eval" not in report.table().split("ok")[-1]

    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    for i, (batch, seq) in enumerate(SHAPES):
        inputs = padded_inputs(
            model.config.vocab_size, model.config.pad_token_id, batch, seq, i, token_types=False
        )
        want = torch_logits(model, inputs)
        got = onnx_logits(report.fp32_path, inputs)
        assert got.shape == (batch, 2)
        assert np.abs(got - want).max() <= 1e-4, (batch, seq)


def _one_line_error(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]


def test_onnx_export_of_a_path_that_is_no_checkpoint_is_one_line(tmp_path, capsys):
    from launch.export import main as export_main

    missing = tmp_path / "no_such_run" / "checkpoints"
    assert export_main([str(missing), "--output", str(tmp_path / "out"), "--onnx"]) == 2
    assert str(missing) in _one_line_error(capsys)
    not_one = tmp_path / "empty"
    not_one.mkdir()
    assert export_main([str(not_one), "--output", str(tmp_path / "out"), "--onnx"]) == 2
    assert str(not_one) in _one_line_error(capsys)


def test_int8_without_onnx_is_refused(tmp_path, capsys):
    from launch.export import main as export_main

    with pytest.raises(SystemExit) as exit_info:
        export_main([str(tmp_path), "--output", str(tmp_path / "out"), "--int8"])
    assert exit_info.value.code == 2
    assert "--int8" in capsys.readouterr().err


def test_architecture_of_neither_task_is_named(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    assert task_of(["LlamaForCausalLM"], "x") == "causal_lm"
    assert task_of(["BertForSequenceClassification"], "x") == "sequence_classification"
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    BertForMaskedLM(config).save_pretrained(tmp_path / "mlm")
    with pytest.raises(OnnxExportError, match=r"mlm: architecture BertForMaskedLM is neither"):
        export_onnx(tmp_path / "mlm")
    assert not (tmp_path / "mlm" / "onnx").exists()  # refused before anything is written
    with pytest.raises(OnnxExportError, match="not an HF model directory"):
        export_onnx(tmp_path)


def test_exporter_failure_is_one_line_naming_the_architecture(tmp_path, monkeypatch):
    model_dir = write_llama_classifier(tmp_path / "llama_cls")

    def broken(*args, **kwargs):
        raise RuntimeError("Failed to export the model with torch.export.\nmany\nmore\nlines")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(OnnxExportError) as info:
        export_onnx(model_dir)
    message = str(info.value)
    assert "\n" not in message and "LlamaForSequenceClassification" in message
    assert str(model_dir) in message and "Failed to export" in message


def test_report_table_names_sizes_and_ratio(tmp_path):
    report = OnnxReport(
        model_dir=tmp_path,
        architecture="LlamaForCausalLM",
        task="causal_lm",
        input_names=["input_ids", "attention_mask"],
        fp32_path=tmp_path / "onnx" / "model.onnx",
        int8_path=tmp_path / "onnx" / "model.int8.onnx",
        hf_bytes=4 * 2**20,
        fp32_bytes=4 * 2**20,
        int8_bytes=2**20,
        checked_shapes=[(1, 5)],
        max_abs_diff=1e-7,
        int8_max_abs_diff=0.02,
        eval_metric="loss",
        eval_rows=3,
        eval_scores={"hf": 2.5, "onnx": 2.5, "int8": 2.51},
    )
    table = report.table()
    assert "ONNX int8           1.00 MB" in table and "(int8/fp32 0.25)" in table
    assert "eval mean token loss on 3 rows: hf 2.5000  onnx 2.5000  int8 2.5100" in table
