"""experiments/checkpoints.py: validation cross-entropy and Table-1 probes across a series of checkpoints.

The series is written here: tiny random GPT-NeoX models (two of one size, one of another) saved by transformers'
``save_pretrained`` with sentcomp's byte-level tokenizer, given to the experiment's smoke variant as local
directories. The first run is interrupted by a checkpoint directory that does not exist yet; the second,
after it is written, finishes without redoing the finished checkpoints.
"""

import json

import numpy as np
import pytest

from sentcomp.errors import SentcompError
from sentcomp.launcher import config_files, runner
from sentcomp.models import hf, tokenizers
from sentcomp.results import layout

# directory -> (MLP width, seed): the last checkpoint is a bigger model (same feature size, so the probes' shapes
# and compiled programs are shared)
SERIES = {"neox_step_10": (32, 0), "neox_step_20": (32, 1), "neox_step_30": (64, 2)}


def tiny_neox(directory, mlp_width: int, seed: int):
    """A random GPT-NeoX (byte-level vocabulary, one layer, d = 16) saved with its tokenizer in ``directory``."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=257, hidden_size=16, intermediate_size=mlp_width, num_hidden_layers=1,
                           num_attention_heads=2, max_position_embeddings=128, rotary_pct=0.5,
                           eos_token_id=256, bos_token_id=256, tie_word_embeddings=False)
    model = GPTNeoXForCausalLM(config).eval()
    model.save_pretrained(directory)
    tokenizers.byte_tokenizer().save_pretrained(directory)
    return model


def read_json(path):
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """(workdir, {directory name: torch model}, runs.jsonl line counts of the first checkpoints' stages before
    the re-run) of the experiment on SERIES: refused while the last checkpoint is missing, then run, then its last
    checkpoint's stages undone (as if killed there) and run again."""
    root = tmp_path_factory.mktemp("series")
    names = list(SERIES)
    models = {name: tiny_neox(root / name, *SERIES[name]) for name in names[:-1]}
    spec = f"experiments/checkpoints.py:smoke,revisions={'+'.join(str(root / n) for n in names)}"
    config = config_files.load_config(spec)
    workdir = root / "run"
    with pytest.raises(SentcompError, match="does not exist"):  # the last checkpoint is not there yet:
        runner.run_program(config, workdir)
    assert not workdir.exists()  # refused before any stage ran or the workdir was claimed
    models[names[-1]] = tiny_neox(root / names[-1], *SERIES[names[-1]])
    runner.run_program(config, workdir)
    for stage in (f"loss_{names[-1]}", f"table1_{names[-1]}", "compare", "."):
        (workdir / stage / layout.DONE_FILE).unlink()
    starts = {stage: len((workdir / stage / "runs.jsonl").read_text().splitlines())
              for name in names[:-1] for stage in (f"loss_{name}", f"table1_{name}")}
    runner.run_program(config, workdir)
    return workdir, models, starts


@pytest.mark.slow
def test_one_row_per_checkpoint_with_steps_sizes_and_accuracies(series):
    workdir, _, _ = series
    results = read_json(workdir / "compare" / "results.json")
    assert list(results["checkpoints"]) == list(SERIES)
    done = read_json(workdir / "done.json")
    markdown = (workdir / "compare" / "results.md").read_text()
    for label, record in results["checkpoints"].items():
        assert record["step"] == int(label.rsplit("_", 1)[1])  # from the directory name
        loss = read_json(workdir / f"loss_{label}" / "results.json")
        table1 = read_json(workdir / f"table1_{label}" / "results.json")
        assert record["val_xent"] == loss["val_xent"] == done[f"{label}/val_xent"]
        assert record["val_perplexity"] == pytest.approx(np.exp(loss["val_xent"]))
        for row in ("rotten_tomatoes", "rotten_tomatoes*"):
            for column in ("f", "phi_p_f"):
                assert done[f"{label}/{row}/{column}"] == table1["table"][row][column]["mean"]
        assert f"| {label} | {record['step']} | {record['parameters']:,} | {record['val_xent']:.4f} |" in markdown
    sizes = {label: r["parameters"] for label, r in results["checkpoints"].items()}
    assert sizes["neox_step_10"] == sizes["neox_step_20"] < sizes["neox_step_30"]


def test_val_xent_matches_transformers(series):
    """Our validation cross-entropy equals the PyTorch model's on the same blocks (log-softmax in float64)."""
    import torch

    workdir, models, _ = series
    for label in ("neox_step_10", "neox_step_30"):
        loss = read_json(workdir / f"loss_{label}" / "results.json")
        blocks = np.load(next((workdir / f"loss_{label}" / "corpus").glob("*/validation.npy")))[:loss["blocks"]]
        assert blocks.shape[1] == loss["seq_len"] + 1 and loss["tokens"] == blocks.size - len(blocks)
        with torch.no_grad():
            logits = models[label](torch.tensor(blocks[:, :-1], dtype=torch.long)).logits.double().numpy()
        shifted = logits - logits.max(-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        reference = -np.take_along_axis(log_probs, blocks[:, 1:, None], -1).mean()
        assert loss["val_xent"] == pytest.approx(reference, abs=1e-4)


def test_plots_are_pngs(series):
    workdir, _, _ = series
    from PIL import Image

    for name in ("accuracy_vs_val_xent.png", "accuracy_vs_step.png"):
        with Image.open(workdir / "compare" / name) as image:
            image.verify()
            assert image.format == "PNG" and min(image.size) > 100


def test_resumed_run_does_not_redo_finished_checkpoints(series):
    workdir, _, starts = series
    for stage, count in starts.items():
        assert count == 1
        assert len((workdir / stage / "runs.jsonl").read_text().splitlines()) == count  # skipped on the re-run
    assert len((workdir / "loss_neox_step_30" / "runs.jsonl").read_text().splitlines()) == 2  # ran, then ran again


def test_revision_of_a_local_directory_or_missing_offline_is_refused(tmp_path):
    with pytest.raises(SentcompError, match="applies to Hub names only"):
        hf.resolve_hub_or_dir(str(tmp_path), revision="step1000")
    with pytest.raises(SentcompError, match="revision 'step1000'.*HF_HUB_OFFLINE is set"):
        hf.resolve_hub_or_dir("sentcomp-no-such-org/no-such-model", revision="step1000")


def test_series_arguments():
    checkpoints = config_files.load_module(config_files.EXPERIMENTS_DIR / "checkpoints.py")
    config = config_files.load_config("experiments/checkpoints.py:model=org/pythia-70m+org/pythia-160m,"
                                      "revisions=step1000+step2000")
    names = [n for n in config.stage_order if n.startswith("loss_")]
    assert names == ["loss_pythia_70m_step1000", "loss_pythia_70m_step2000", "loss_pythia_160m_step1000",
                     "loss_pythia_160m_step2000"]
    stage = config.stages.loss_pythia_160m_step2000
    assert (stage.model, stage.revision, stage.step) == ("org/pythia-160m", "step2000", 2000)
    assert config.stages.table1_pythia_160m_step2000.revision == "step2000"
    config.eval_blocks = 7  # a shared setting reaches every loss stage
    assert {config.stages[n].eval_blocks for n in names} == {7}
    with pytest.raises(SentcompError, match="one per revision"):
        checkpoints.get_config("revisions=/a+/b,steps=5")
