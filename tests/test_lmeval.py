"""sentcomp as an lm-evaluation-harness backend, checked against lm-eval's own ``hf`` backend (PyTorch transformers)
on the same model: a tiny random sentcomp Llama exported with ``save_hf``, on local task YAMLs over JSON files
(one-token and multi-token choices, perplexity, greedy generation; documents longer than the model's context)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import transformers

pytest.importorskip("lm_eval", reason="the lmeval extra (pip install -e '.[lmeval]') is part of the test extra")

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lmeval_testing import export_tiny_llama, write_tasks  # noqa: E402

import sentcomp.lmeval  # noqa: E402, F401  (registers the "sentcomp" model)
from sentcomp import zeroshot  # noqa: E402
from sentcomp.data import get_task, load_task  # noqa: E402
from sentcomp.errors import SentcompError  # noqa: E402
from sentcomp.launcher import runner  # noqa: E402
from sentcomp.launcher.config_files import EXPERIMENTS_DIR, load_config, override  # noqa: E402
from sentcomp.launcher.local_cluster import free_port, with_device_count  # noqa: E402
from sentcomp.lmeval.model import SentcompLM  # noqa: E402
from sentcomp.models import load  # noqa: E402

TASKS = ["sc_sentiment", "sc_rating", "sc_perplexity", "sc_generate"]
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The exported model's directory and the task folder."""
    root = tmp_path_factory.mktemp("lmeval")
    write_tasks(root / "tasks")
    return export_tiny_llama(root / "model"), root / "tasks"


@pytest.fixture(scope="module")
def setup(exported):
    """The exported model, the task folder, and lm-eval's ``hf`` backend's results on it (the reference)."""
    model_dir, task_dir = exported
    return model_dir, task_dir, evaluate("hf", {"pretrained": str(model_dir), "dtype": "float32"}, task_dir)


def evaluate(model: str, model_args, task_dir: Path, tasks=TASKS, batch_size: int = 4) -> dict:
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)  # the local YAMLs only: fast
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(tasks), log_samples=True,
                                   task_manager=manager, batch_size=batch_size, device="cpu")


def responses(results: dict, task: str) -> list:
    """Each document's raw model responses, in document order."""
    return [sample["resps"] for sample in sorted(results["samples"][task], key=lambda sample: sample["doc_id"])]


def assert_same_results(got: dict, expected: dict, tasks=TASKS) -> None:
    """Per-request log-likelihoods within :data:`TOLERANCE`, equal greedy flags, accuracies and generations."""
    for task in tasks:
        ours, theirs = responses(got, task), responses(expected, task)
        assert len(ours) == len(theirs) == 10
        if task == "sc_generate":
            assert ours == theirs
            assert any(text for (text,) in theirs)  # something was generated before the stop sequences
            continue
        for doc_ours, doc_theirs in zip(ours, theirs):
            for (value_ours,), (value_theirs,) in zip(doc_ours, doc_theirs):
                if task == "sc_perplexity":
                    assert abs(value_ours - value_theirs) <= TOLERANCE * max(1.0, abs(value_theirs) / 100), task
                else:
                    assert abs(value_ours[0] - value_theirs[0]) <= TOLERANCE, (task, value_ours, value_theirs)
                    assert value_ours[1] == value_theirs[1], task
        for metric in ("acc,none", "acc_norm,none"):
            if metric in expected["results"][task]:
                assert got["results"][task][metric] == expected["results"][task][metric], (task, metric)
        if "bits_per_byte,none" in expected["results"][task]:  # from the summed log-likelihoods: float-close
            assert got["results"][task]["bits_per_byte,none"] == pytest.approx(
                expected["results"][task]["bits_per_byte,none"], rel=1e-6)


@pytest.mark.slow
def test_sentcomp_backend_matches_lm_evals_hf_backend_on_8_devices(setup):
    """Over 8 simulated devices (batch 4 rounded up to 8): lm-eval's per-request log-likelihoods (documents
    truncated to the 40-token context), greedy flags, acc / acc_norm, rolling log-likelihoods over several windows
    and greedy generations with stop sequences, as lm-eval's hf backend gives them."""
    import jax

    assert jax.device_count() == 8
    model_dir, task_dir, reference = setup
    got = evaluate("sentcomp", f"pretrained={model_dir},dtype=float32,progress=False", task_dir)
    assert_same_results(got, reference)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    lengths = [len(tokenizer(sample["arguments"][0][0])["input_ids"])
               for sample in reference["samples"]["sc_perplexity"]]
    assert max(lengths) > 2 * 40  # the long documents span several rolling windows of the 40-token model


def round_trip_continuations(tokenizer, context: str, token_ids) -> list[str]:
    """The tokens among ``token_ids`` whose text, after ``context``, tokenizes back to that one token."""
    context_ids = tokenizer(context)["input_ids"]
    texts = [tokenizer.decode([token]) for token in token_ids]
    return [text for token, text in zip(token_ids, texts) if tokenizer(context + text)["input_ids"] == [
        *context_ids, token]]


@pytest.mark.slow
def test_greedy_flags_follow_the_argmax_token(setup):
    """``is_greedy`` (all False on the tasks' random choices): requests whose one-token continuation is the PyTorch
    model's argmax next token (True) or its runner-up (False) get the flags and log-likelihoods of the hf backend;
    an empty context scores after the BOS prefix token in both."""
    import torch

    model_dir, _, reference = setup
    hf = lm_eval.api.registry.get_model("hf")(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=3)
    requests, expected_flags = [], []
    for sample in reference["samples"]["sc_sentiment"]:
        context = sample["arguments"][0][0]
        with torch.no_grad():
            logits = hf.model(torch.tensor([hf.tok_encode(context)[-hf.max_length:]])).logits[0, -1]  # lm-eval cuts
        best, runner_up = torch.topk(logits, 2).indices.tolist()
        for token, flag in ((best, True), (runner_up, False)):
            for text in round_trip_continuations(hf.tokenizer, context, [token]):
                requests.append(Instance("loglikelihood", {}, (context, text), len(requests)))
                expected_flags.append(flag)
    requests.append(Instance("loglikelihood", {}, ("", "Boring film."), len(requests)))
    theirs = hf.loglikelihood(requests, disable_tqdm=True)
    ours = SentcompLM(str(model_dir), batch_size=3, progress=False).loglikelihood(requests, disable_tqdm=True)
    assert sum(expected_flags) >= 3 and [flag for _, flag in theirs[:-1]] == expected_flags
    assert [flag for _, flag in ours] == [flag for _, flag in theirs]
    np.testing.assert_allclose([value for value, _ in ours], [value for value, _ in theirs], atol=TOLERANCE)


def test_bad_arguments_are_refused_with_the_fix(exported):
    model_dir = exported[0]
    with pytest.raises(SentcompError, match="'auto' is not supported"):
        SentcompLM(str(model_dir), batch_size="auto")
    with pytest.raises(SentcompError, match="dtype must be one of"):
        SentcompLM(str(model_dir), dtype="float16")
    with pytest.raises(SentcompError, match="Unknown sentcomp model_args"):
        SentcompLM(str(model_dir), trust_remote_code=True)
    lm = SentcompLM(str(model_dir), progress=False)
    sampling = Instance("generate_until", {}, ("Great", {"until": ["."], "do_sample": True, "temperature": 1.0}), 0)
    with pytest.raises(NotImplementedError, match="greedily only"):
        lm.generate_until([sampling])


def parse_responses(task: str, resps: list) -> list:
    """A samples file's responses (lm-eval writes every value as a string) as simple_evaluate returns them."""
    if task == "sc_generate":
        return resps
    if task == "sc_perplexity":
        return [[float(value) for value in request] for request in resps]
    return [[(float(value), flag == "True") for value, flag in request] for request in resps]


def test_bfloat16_runs_the_model_in_bfloat16(exported):
    """``dtype=bfloat16`` (the TPU fast path): log-likelihoods near the float32 ones, yet not equal to them (the
    forward pass really ran in bfloat16)."""
    requests = [Instance("loglikelihood", {}, ("Boring movie. This movie is", choice), index)
                for index, choice in enumerate([" great", " terrible", " very good film"])]
    values = {dtype: np.array([value for value, _ in SentcompLM(str(exported[0]), dtype=dtype, progress=False)
                               .loglikelihood(requests, disable_tqdm=True)]) for dtype in ("float32", "bfloat16")}
    np.testing.assert_allclose(values["bfloat16"], values["float32"], rtol=0.03)
    assert np.abs(values["bfloat16"] - values["float32"]).max() > 1e-3


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_through_the_command_line_match_the_hf_backend(setup, tmp_path):
    """``python -m sentcomp.lmeval`` (lm-eval's CLI) as 2 JAX processes × 2 devices: lm-eval splits the documents
    between them, process 0 gathers, and only it writes results, which equal the hf backend's."""
    model_dir, task_dir, reference = setup
    tasks = ["sc_sentiment", "sc_perplexity", "sc_generate"]
    command = [sys.executable, "-m", "sentcomp.lmeval", "--model", "sentcomp", "--model_args",
               f"pretrained={model_dir},progress=False", "--tasks", ",".join(tasks), "--include_path", str(task_dir),
               "--batch_size", "4", "--log_samples"]
    port, children = free_port(), []
    for process in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=with_device_count(os.environ["XLA_FLAGS"], 2),
                   JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(process))
        log = open(tmp_path / f"process{process}.log", "wb")
        children.append(subprocess.Popen([*command, "--output_path", str(tmp_path / f"out{process}")], env=env,
                                         stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [child.wait(timeout=400) for child in children]
    finally:
        for child in children:
            child.kill()
    logs = [(tmp_path / f"process{process}.log").read_text()[-3000:] for process in range(2)]
    assert codes == [0, 0], logs
    assert not (tmp_path / "out1").exists()  # process 1 wrote nothing
    results_file = next((tmp_path / "out0").rglob("results_*.json"))
    got = {"results": json.loads(results_file.read_text())["results"], "samples": {}}
    for task in tasks:
        lines = next((tmp_path / "out0").rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()
        got["samples"][task] = [{**sample, "resps": parse_responses(task, sample["resps"])}
                                for sample in map(json.loads, lines)]
    assert_same_results(got, reference, tasks)


# ------------------------------------------------------------------ lm-eval tasks in Table 1 (sentcomp.lmeval.tasks)


@pytest.fixture
def task_cache(tmp_path, monkeypatch):
    """The adapted tasks' JSON lines go to a fresh sentcomp cache."""
    monkeypatch.setenv("SENTCOMP_CACHE", str(tmp_path / "cache"))


@pytest.mark.slow
def test_adapted_task_scores_lm_evals_requests(setup, task_cache):
    """The adapted task (text, prompt, verbalizer) makes sentcomp's zero-shot scorer score exactly lm-eval's
    requests: each choice's log-likelihood equals the hf backend's (multi-token choices after a newline prompt), on
    the documents that fit the 40-token model untruncated (the two truncate long documents differently), and the
    labels and split sizes are lm-eval's."""
    model_dir, task_dir, reference = setup
    task = get_task(f"lmeval:{task_dir}/sc_rating.yaml")
    assert (task.prompt, task.label_names) == ("\nRating: ", ("very bad film", "very good film"))
    splits = load_task(task)
    assert (len(splits["train"]), len(splits["test"])) == (12, 10)
    lm = load(str(model_dir))
    words, _ = zeroshot.label_word_list(task)
    scores = zeroshot.word_scores(lm, splits["test"].texts, task.prompt, words, progress=False)
    samples = sorted(reference["samples"]["sc_rating"], key=lambda sample: sample["doc_id"])
    assert [int(sample["target"]) for sample in samples] == splits["test"].labels.tolist()
    compared = 0
    for document, sample in enumerate(samples):
        context, _ = sample["arguments"][0]
        assert splits["test"].texts[document] + task.prompt.rstrip() == context
        if max(len(lm.tokenizer(context + cont)["input_ids"]) for _, cont in sample["arguments"]) <= lm.max_length:
            np.testing.assert_allclose(scores[document], [resp[0][0] for resp in sample["resps"]], atol=TOLERANCE)
            compared += 1
    assert compared >= 3


def test_tasks_that_do_not_fit_table1_are_refused(exported, task_cache):
    task_dir = exported[1]
    with pytest.raises(SentcompError, match="output_type 'generate_until'; Table 1 takes multiple_choice"):
        get_task(f"lmeval:{task_dir}/sc_generate.yaml")
    with pytest.raises(SentcompError, match="output_type 'loglikelihood_rolling'"):
        get_task(f"lmeval:{task_dir}/sc_perplexity.yaml")
    with pytest.raises(SentcompError, match="has no training split"):
        get_task(f"lmeval:{task_dir}/sc_no_train.yaml")
    with pytest.raises(SentcompError, match="does not exist"):
        get_task(f"lmeval:{task_dir}/missing.yaml")


@pytest.mark.slow
def test_table1_runs_an_lm_eval_task(exported, task_cache, tmp_path):
    """experiments/table1.py with ``task=lmeval:<YAML>`` on the exported model: probe rows with and without the
    prompt and the zero-shot column, over the task's whole train / test splits."""
    model_dir, task_dir = exported
    name = f"lmeval:{task_dir}/sc_sentiment.yaml"
    config = override(load_config(f"{EXPERIMENTS_DIR}/table1.py:smoke"), {
        "tasks": (name,), "model": str(model_dir), "n_train": 0, "n_test": 0, "max_length": 40,
        "columns": ("f", "phi_p_f"), "zeroshot.shots": (0,)})
    runner.run_program(config, tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert (results["tasks"][0]["n_train"], results["tasks"][0]["n_test"]) == (12, 10)
    assert set(results["table"]) == {name, name + "*"}
    assert {"f", "phi_p_f"} <= set(results["table"][name])
    assert "zeroshot" in results["table"][name + "*"]
