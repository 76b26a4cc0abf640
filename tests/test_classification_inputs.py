"""What a classifier is trained on is what it is served: sentence pairs keep their segment
ids, decoder classifiers keep their pad id in every saved model, RoBERTa-style models export,
and label values users have (booleans, pandas floats) are read as names or ids."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, RobertaConfig, RobertaForSequenceClassification

from data.config import DataConfig
from data.loader import collate_right_pad
from data.packing import pad_right
from data.templates import RowError, encode_classification, label_id
from tests.classify_fixtures import write_tiny_bert
from trainer.model.attention_inputs import model_inputs

CPU = torch.device("cpu")
PAIRS = [
    ("the plot was good", "it is great"),
    ("bad", "the chair was very ugly and so sad"),
    ("a paper", None),  # a single text (in a micro-batch with pairs): segment 0 throughout
]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return write_tiny_bert(tmp_path_factory.mktemp("bert"))


def test_sentence_pairs_train_with_the_segment_ids_the_tokenizer_serves(bert):
    from transformers import BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(bert)
    cfg = DataConfig(
        train_path="unused.jsonl",
        format="classification",
        text_pair_field="pair",
        labels=["neg", "neu", "pos"],
    )
    single = cfg.model_copy(update={"text_pair_field": None})  # a dataset of single texts
    items = [
        (i, encode_classification({"text": a, "pair": b, "label": "pos"}, tokenizer, c))
        for i, (a, b, c) in enumerate([(*PAIRS[0], cfg), (*PAIRS[1], cfg), (*PAIRS[2], single)])
    ]
    assert items[0][1].token_type_ids is not None and 1 in items[0][1].token_type_ids
    assert items[2][1].token_type_ids is None
    pairs = tokenizer([PAIRS[0][0], PAIRS[1][0]], [PAIRS[0][1], PAIRS[1][1]], padding=True)
    served = torch.tensor(pairs["token_type_ids"])
    width = served.shape[1]
    for batch in (collate_right_pad(items, 0), pad_right(items, 0)):
        types = batch["token_type_ids"]
        assert torch.equal(types[:2, :width], served)  # the pairs, as served
        assert not types[:2, width:].any() and not types[2].any()  # pads, the single text: 0
    model = BertForSequenceClassification.from_pretrained(bert).eval()
    batch = collate_right_pad(items[:2], 0)
    with torch.no_grad():
        trained_on = model(**model_inputs(batch, CPU, "transformers")).logits
        serving = model(
            **tokenizer(
                [PAIRS[0][0], PAIRS[1][0]],
                [PAIRS[0][1], PAIRS[1][1]],
                padding=True,
                return_tensors="pt",
            )
        ).logits
    assert torch.allclose(trained_on, serving, atol=1e-6)


def test_a_roberta_classifier_exports_without_segment_ids():
    """RoBERTa, XLM-R, CamemBERT: one segment (type_vocab_size 1); a segment 1 in the export's
    sample inputs indexed past its table."""
    from launch.onnx_export import input_names_for, sample_inputs

    config = RobertaConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=40,
        type_vocab_size=1,
        num_labels=2,
    )
    model = RobertaForSequenceClassification(config).eval()
    names = input_names_for(model)
    assert names == ["input_ids", "attention_mask"]
    with torch.no_grad():
        out = model(**dict(zip(names, sample_inputs(config, names, 2, 8, 0), strict=True)))
    assert out.logits.shape == (2, 2)


@pytest.mark.parametrize("config_pad", [None, 3], ids=["no-pad-id", "another-pad-id"])
def test_a_decoder_classifier_is_built_with_a_pad_id_for_every_later_copy(tmp_path, config_pad):
    """Llama configs carry no pad id (or one the tokenizer does not pad with); the merged model
    and the export are built from the config, so build_model sets the collators' pad id where
    they all come from, and a padded row pools its last real token."""

    from launch.make_demo import build_tiny_model_dir
    from trainer.config import ModelConfig
    from trainer.model.load import build_model

    llama = build_tiny_model_dir(tmp_path / "llama", seed=0, hidden=32, layers=1, heads=2)
    config = json.loads((llama / "config.json").read_text())
    config.pop("pad_token_id", None)
    if config_pad is not None:
        config["pad_token_id"] = config_pad
    (llama / "config.json").write_text(json.dumps(config))
    model = build_model(
        ModelConfig(name_or_path=str(llama)),
        CPU,
        task="sequence_classification",
        labels=["a", "b"],
    )
    tokenizer = AutoTokenizer.from_pretrained(llama)
    expected = tokenizer.pad_token_id
    assert model.config.pad_token_id == (
        expected if expected is not None else tokenizer.eos_token_id
    )
    assert model.config.pad_token_id != config_pad
    ids = torch.tensor([[5, 6, 7], [5, 6, model.config.pad_token_id]])
    mask = (ids != model.config.pad_token_id).long()
    with torch.no_grad():
        both = model(input_ids=ids, attention_mask=mask).logits
        alone = model(input_ids=ids[1:, :2]).logits
    torch.testing.assert_close(both[1], alone[0], rtol=0, atol=1e-5)  # the last real token


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, 1), (False, 0), ("true", 1), (1.0, 1), (0, 0)],
)
def test_boolean_and_integral_float_labels_are_read(value, expected):
    assert label_id(value, ["false", "true"], "label") == expected


@pytest.mark.parametrize("value", [0.5, [1], {"a": 1}])
def test_other_label_values_are_wrong_type_rows(value):
    with pytest.raises(RowError) as e:
        label_id(value, ["false", "true"], "label")
    assert e.value.kind == "wrong_type"


@pytest.mark.parametrize(
    ("labels", "message"),
    [(["a"], "at least 2"), (["a", "b", "a"], "repeated: a"), (["a", " "], "blank")],
)
def test_bad_label_lists_are_named(labels, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        DataConfig(train_path="t.jsonl", format="classification", labels=labels)


@pytest.mark.parametrize(
    ("resume", "expected"),
    [("auto", ["a", "c"]), ("never", ["a", "b", "c"])],
)
def test_a_resumed_classifier_keeps_its_checkpoint_label_ids(tmp_path, resume, expected):
    """The data gained label "b" since the checkpoint: discovery alone would renumber "c"
    under the restored head."""
    from launch.train import classifier_labels

    for step, labels in ((2, ["a", "x"]), (4, ["a", "c"])):
        ckpt = tmp_path / "checkpoints" / f"step_{step:08d}"
        ckpt.mkdir(parents=True)
        (ckpt / "config.yaml").write_text(f"data:\n  labels: [{', '.join(labels)}]\n")
    rows = [{"text": f"t{i}", "label": name} for i, name in enumerate("abcab")]
    assert classifier_labels(_labels_cfg(tmp_path, rows, resume), None) == expected


def test_a_resumed_classifier_does_not_need_every_label_in_the_data(tmp_path):
    """The data now holds one class (or new ones): the checkpoint's labels are used as they
    are, the data is not scanned for labels, and discovery's 'at least 2 labels' does not
    apply."""
    from launch.train import classifier_labels

    ckpt = tmp_path / "checkpoints" / "step_00000004"
    ckpt.mkdir(parents=True)
    (ckpt / "config.yaml").write_text("data:\n  labels: [neg, pos]\n")
    rows = [{"text": "good", "label": "pos"}] * 3
    assert classifier_labels(_labels_cfg(tmp_path, rows, "auto"), None) == ["neg", "pos"]


def _labels_cfg(tmp_path, rows, resume):
    from types import SimpleNamespace

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return SimpleNamespace(
        run_dir=str(tmp_path),
        checkpoint=SimpleNamespace(dir=None, resume=resume),
        data=DataConfig(train_path=str(data), format="classification"),
    )


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_long_classification_rows_follow_data_overlong(bert, overlong):
    tokenizer = AutoTokenizer.from_pretrained(bert)
    cfg = DataConfig(
        train_path="t.jsonl",
        format="classification",
        labels=["neg", "pos"],
        seq_len=8,
        overlong=overlong,
    )
    row = {"text": "the plot was good and it is so very great and nice", "label": "pos"}
    if overlong == "drop":
        with pytest.raises(RowError) as e:
            encode_classification(row, tokenizer, cfg)
        assert e.value.kind == "too_long"
        return
    sample = encode_classification(row, tokenizer, cfg)
    assert sample.cut and len(sample) == 8  # counted as truncated by the readers
    assert sample.input_ids[-1] == tokenizer.sep_token_id  # cut by the tokenizer: [SEP] kept
    assert sample.labels[-1] == 1
    short = encode_classification({"text": "good", "label": "pos"}, tokenizer, cfg)
    assert not short.cut


def test_a_pair_tokenizer_with_two_segments_on_a_one_segment_model_is_named(bert):
    """A BERT tokenizer (segment ids 0 and 1 for a pair) with a RoBERTa-family model
    (type_vocab_size=1): a one-line error naming the model and tokenizer keys, not an index
    error inside the forward; the model's own two-segment BERT passes."""
    from transformers import BertForSequenceClassification

    from trainer.config import ModelConfig
    from trainer.model.load import ModelLoadError, check_segment_ids

    tokenizer = AutoTokenizer.from_pretrained(bert)
    one_segment = RobertaForSequenceClassification(
        RobertaConfig(
            vocab_size=len(tokenizer) + 2,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            type_vocab_size=1,
        )
    )
    cfg = ModelConfig(name_or_path="roberta-dir", tokenizer=str(bert))
    with pytest.raises(ModelLoadError, match="type_vocab_size=1") as e:
        check_segment_ids(one_segment, tokenizer, cfg)
    assert "model.tokenizer=" in str(e.value) and "\n" not in str(e.value)
    check_segment_ids(BertForSequenceClassification.from_pretrained(bert), tokenizer, cfg)
