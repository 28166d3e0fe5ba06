"""BERT family: parity with HF transformers' PyTorch BertModel / BertForMaskedLM, the offline MiniLM encoder,
and the paper's baseline features (sentcomp.baselines)."""

import shutil

import numpy as np
import pytest
import torch
import transformers

from sentcomp import baselines
from sentcomp.errors import SentcompError
from sentcomp.models import bert, load

TINY = dict(hidden_size=36, num_attention_heads=3, num_hidden_layers=2, intermediate_size=50,
            max_position_embeddings=40, type_vocab_size=2)


def _save(model, directory, tokenizer_from=None):
    model.save_pretrained(directory)
    if tokenizer_from is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            shutil.copy(f"{tokenizer_from}/{name}", directory / name)
    return directory


def _random_batch(vocab_size, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, size=(3, 13)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 4:] = 0
    return ids, mask


@pytest.mark.parametrize("hidden_act,head", [("gelu", "masked_lm"), ("gelu_new", "base")])
def test_matches_transformers(tmp_path, hidden_act, head):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=97, hidden_act=hidden_act, **TINY)
    model = (transformers.BertForMaskedLM(config) if head == "masked_lm" else transformers.BertModel(config)).eval()
    with torch.no_grad():  # random LayerNorm affine parameters so the check covers them
        for name, parameter in model.named_parameters():
            if "LayerNorm" in name:
                parameter.normal_(1.0 if name.endswith("weight") else 0.0, 0.3)
    lm = load(str(_save(model, tmp_path)))
    assert lm.family == "bert" and bert.has_mlm_head(lm.params) == (head == "masked_lm")

    ids, mask = _random_batch(97)
    ours = np.asarray(lm.hidden(ids, mask))
    encoder = model.bert if head == "masked_lm" else model
    with torch.no_grad():
        theirs = encoder(input_ids=torch.tensor(ids, dtype=torch.long),
                         attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4, rtol=0)
    if head == "masked_lm":
        with torch.no_grad():
            transformed = model.cls.predictions.transform(torch.tensor(theirs)).numpy()
        np.testing.assert_allclose(np.asarray(bert.mlm_transform(lm.config, lm.params, ours))[real],
                                   transformed[real], atol=1e-4, rtol=0)
        np.testing.assert_array_equal(np.asarray(lm.phi), model.bert.embeddings.word_embeddings.weight.detach().numpy())
    else:
        with pytest.raises(SentcompError, match="no masked-LM head"):
            bert.mlm_transform(lm.config, lm.params, ours)


def test_paper_baseline_feature_with_prompt_matches_transformers(tmp_path):
    """The [CLS]-after-MLM-transform feature of ``text + prompt`` (prompt before [SEP]), batched over 8 devices."""
    torch.manual_seed(1)
    minilm = bert.all_minilm_l6_v2_path()
    config = transformers.BertConfig(vocab_size=30522, **TINY)
    model = transformers.BertForMaskedLM(config).eval()
    lm = load(str(_save(model, tmp_path, tokenizer_from=minilm)))
    texts = ["a gripping, funny film", "dull", "one of the best movies of the year, with a great cast and score"]
    prompt = " This movie is "

    ours = baselines.bert_features(lm, texts, prompt=prompt, batch_size=8, progress=False)
    mean = baselines.bert_features(lm, texts, prompt=prompt, pooling="mean", batch_size=8, progress=False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm)
    for text, feature, mean_feature in zip(texts, ours, mean):
        encoded = tokenizer(text + prompt.rstrip(), return_tensors="pt")
        assert tokenizer.convert_ids_to_tokens(encoded["input_ids"][0])[-4:] == ["this", "movie", "is", "[SEP]"]
        with torch.no_grad():
            states = model.bert(**encoded).last_hidden_state
            expected = model.cls.predictions.transform(states[:, 0])[0].numpy()
        np.testing.assert_allclose(feature, expected, atol=1e-4, rtol=0)
        np.testing.assert_allclose(mean_feature, states[0].mean(0).numpy(), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_offline_minilm_has_no_mlm_head_and_falls_back(tmp_path):
    lm = load("all-minilm-l6-v2")
    assert lm.name == "all-minilm-l6-v2"  # named by the alias, not the resolved directory
    assert lm.family == "bert" and lm.config.hidden_size == 384 and not bert.has_mlm_head(lm.params)
    texts = ["the movie was wonderful", "the plot made no sense at all"]
    with pytest.warns(UserWarning, match="no masked-LM head.*pooling='cls'"):
        features = baselines.bert_features(lm, texts, prompt=" This movie is ", batch_size=8, cache_dir=tmp_path,
                                           progress=False)
    assert features.shape == (2, 384) and np.all(np.isfinite(features))
    assert not np.allclose(features[0], features[1])
    with pytest.warns(UserWarning):  # second call: read back from the cache, same values
        again = baselines.bert_features(lm, texts, prompt=" This movie is ", batch_size=8, cache_dir=tmp_path,
                                        progress=False)
    np.testing.assert_array_equal(features, again)
    assert len(list(tmp_path.glob("bert-*.npy"))) == 1


@pytest.mark.slow
def test_bad_inputs_are_clear(tmp_path):
    lm = bert.init(bert.BertConfig(vocab_size=50, **TINY), mlm_head=False)
    with pytest.raises(SentcompError, match="pooling must be one of"):
        baselines.resolve_pooling(lm, "max")
    with pytest.raises(SentcompError, match="is not divisible"):
        bert.BertConfig(hidden_size=10, num_attention_heads=3)
    with pytest.raises(SentcompError, match="position_embedding_type"):
        bert.config_from_hf({"position_embedding_type": "relative_key"})
