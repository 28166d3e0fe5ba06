"""Table 1's zero-shot column at k = 0 under the task's prompt is read off the prompt row's feature pass
(sentcomp.evaluators.zeroshot.scores_from_extraction): the same scores as a pass of its own."""

from __future__ import annotations

import numpy as np
import pytest

from sentcomp import models, zeroshot
from sentcomp.evaluators import columns, task_data
from sentcomp.evaluators import zeroshot as zeroshot_column
from sentcomp.launcher.config_files import EXPERIMENTS_DIR, load_config


@pytest.mark.slow  # ~1 min on 2 loaded cores (one smoke-sized extraction and two scoring passes)
def test_prompt_row_features_give_the_k0_zero_shot_scores(tmp_path):
    config = load_config(f"{EXPERIMENTS_DIR}/table1.py:smoke")  # random GPT-2, the real GPT-2 tokenizer
    lm = models.from_config(config)
    data = task_data.prepare_task("rotten_tomatoes", config)
    task = data.task
    words = zeroshot_column.prompt_zeroshot_words(task, config)
    assert {"great", "terrible"} <= set(words)  # every verbalizer at k = 0 under the prompt
    _, _, data.prompt_extraction = columns.row_features(lm, task, data.texts, ["f"], task.prompt, config, tmp_path,
                                                       words)
    texts = data.pairs[0][1].texts
    shared = zeroshot_column.scores_from_extraction(lm, data.prompt_extraction, data.texts, texts, task.prompt, words,
                                                    config)
    own_pass = zeroshot.score_words(lm, texts, task.prompt, words, progress=False,
                                    **zeroshot_column.score_options(config))
    assert shared is not None and shared.words == own_pass.words
    np.testing.assert_allclose(shared.texts, own_pass.texts, atol=1e-5, rtol=0)
    np.testing.assert_allclose(shared.content_free, own_pass.content_free, atol=1e-6, rtol=0)
    # a word the extraction lacks, or one of several tokens, cannot be read off it: the caller runs its own pass
    for words in (["great", "unwatchable"], ["great", "Xylophonically"]):
        assert zeroshot_column.scores_from_extraction(lm, data.prompt_extraction, data.texts, texts, task.prompt, words,
                                                      config) is None
