"""One rule for what a model reads: ``prefix + tokens(text + prompt)``, tokenised together, for features,
zero-shot scoring and fine-tuning; special tokens after the text never reach a causal LM; a BOS survives
truncation. Checked with a SentencePiece-style tokenizer (Metaspace "▁" words, BOS added), where tokenising
the prompt on its own gives an extra "▁" token, a WordPiece tokenizer with [CLS] ... [SEP], and GPT-2's."""

import numpy as np
import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from sentcomp import zeroshot
from sentcomp.data import text
from sentcomp.models import tokenizers as sentcomp_tokenizers

PROMPT = " This movie is"
TEXTS = ["a great film.", "dull and far too long", "It was fine"]
CORPUS = ["this movie is great", "this movie is terrible", "a great film", "it was fine", "dull and far too long",
          "far too long and dull", "the film was great fun", "This movie is. It was fine."] * 20


def _metaspace_tokenizer() -> Tokenizer:
    """A SentencePiece-style BPE built as Llama-2's tokenizer.json is: "▁" prepended to the input and every
    space replaced by "▁" (so " This" alone becomes "▁▁This": tokens "▁" + "▁This"), and a BOS ``<s>`` added
    before every text."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=150, special_tokens=["<unk>", "<s>"]))
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tokenizer


def _wordpiece_tokenizer() -> PreTrainedTokenizerFast:
    """A BERT-style WordPiece tokenizer: ``[CLS] text [SEP]``."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[UNK]", "[CLS]", "[SEP]", "[PAD]"]
    tokenizer.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=120, special_tokens=special))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tokenizer.token_to_id("[CLS]")),
                                                 ("[SEP]", tokenizer.token_to_id("[SEP]"))])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, cls_token="[CLS]", sep_token="[SEP]",
                                   pad_token="[PAD]", unk_token="[UNK]")


@pytest.fixture(scope="module", params=["tokenizers", "transformers"])
def sentencepiece(request):
    raw = _metaspace_tokenizer()
    return raw if request.param == "tokenizers" else PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>")


def _joint(tokenizer, string: str) -> list[int]:
    """The reference: the tokenizer's own encoding of one string, special tokens included."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer.encode(string).ids
    return tokenizer(string)["input_ids"]


def test_the_sentencepiece_trap_is_real(sentencepiece):
    """Tokenised apart, the prompt gains a "▁" token the model never sees in running text."""
    apart = text.encode(sentencepiece, [TEXTS[0]])[0] + text.encode(sentencepiece, [PROMPT])[0]
    together = text.encode(sentencepiece, [TEXTS[0] + PROMPT])[0]
    assert len(apart) == len(together) + 1


def test_features_read_text_and_prompt_tokenised_together_after_the_bos(sentencepiece):
    encoding = text.encode_texts(sentencepiece, TEXTS, max_length=64, prompt=PROMPT + " ")
    for ids, document in zip(encoding.token_ids, TEXTS):
        assert list(ids) == _joint(sentencepiece, document + PROMPT)  # trailing space stripped, as the paper
        assert ids[0] == 1  # <s>


def test_truncation_keeps_the_bos_and_the_prompt(sentencepiece):
    long_text = " ".join(["dull and far too long"] * 20)
    full = _joint(sentencepiece, long_text + PROMPT)
    prompt_tokens = len(_joint(sentencepiece, "x" + PROMPT)) - len(_joint(sentencepiece, "x"))
    start = text.encode_texts(sentencepiece, [long_text], max_length=16, prompt=PROMPT).token_ids[0]
    assert len(start) == 16 and start[0] == 1
    assert list(start[-prompt_tokens:]) == full[-prompt_tokens:]  # the prompt's own tokens, as in running text
    assert list(start[1:]) == full[len(full) - 15:]  # the text's last tokens before them
    end = text.encode_texts(sentencepiece, [long_text], max_length=16, prompt=PROMPT, truncation="end").token_ids[0]
    assert list(end) == full[:16]  # the authors' rule: the first tokens, BOS included, prompt lost


def test_zero_shot_contexts_are_the_feature_inputs(sentencepiece):
    """Zero-shot scores the label words after exactly the sequence features read f(s) at."""
    words = ("great", "terrible")
    rows = zeroshot.build_rows(sentencepiece, TEXTS, PROMPT + " ", words, max_length=64)
    features_input = text.encode_texts(sentencepiece, TEXTS, max_length=64, prompt=PROMPT).token_ids
    for row in rows:
        assert list(row.input_ids[: row.start + 1]) == list(features_input[row.document])


def test_special_tokens_after_the_text_never_reach_a_causal_lm():
    wordpiece = _wordpiece_tokenizer()
    cls, sep = wordpiece.cls_token_id, wordpiece.sep_token_id
    assert text.special_tokens(wordpiece) == ([cls], [sep])
    causal = text.encode_texts(wordpiece, TEXTS, max_length=64, prompt=PROMPT).token_ids
    encoder = text.encode_with_specials(wordpiece, TEXTS, max_length=64, prompt=PROMPT)
    for ids, with_specials, document in zip(causal, encoder, TEXTS):
        assert ids[0] == cls and sep not in ids  # [SEP] is neither at the start nor at the end
        assert list(with_specials) == _joint(wordpiece, document + PROMPT)
    long_text = " ".join(["dull and far too long"] * 20)
    truncated = text.encode_with_specials(wordpiece, [long_text], max_length=12, prompt=" this movie is")[0]
    assert len(truncated) == 12 and truncated[0] == cls and truncated[-1] == sep
    assert list(truncated[-4:-1]) == text.encode(wordpiece, ["this movie is"])[0]


def test_gpt2_inputs_are_unchanged_by_the_joint_rule(tmp_path):
    """Byte-level BPE splits at the space before the prompt: tokenising together or apart is the same."""
    gpt2 = sentcomp_tokenizers.gpt2_tokenizer(tmp_path)
    together = text.encode_texts(gpt2, TEXTS, max_length=64, prompt=PROMPT).token_ids
    for ids, document in zip(together, TEXTS):
        np.testing.assert_array_equal(ids, text.encode(gpt2, [document])[0] + text.encode(gpt2, [PROMPT])[0])
    assert text.special_tokens(gpt2) == ([], [])
