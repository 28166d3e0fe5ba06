"""experiments/teacher.py and its pieces (sentcomp.teacher, programs teacher_targets / distill / teacher_report).

The smoke experiment runs once (``smoke_workdir``); its numbers are then checked against float64 numpy computed
here from the saved arrays and snapshots (dense V-wide distributions), independently of the streamed kernels.
"""

import json

import numpy as np
import pytest

from sentcomp import models
from sentcomp import teacher as teacher_lib
from sentcomp.errors import SentcompError
from sentcomp.features import extract_features
from sentcomp.launcher import stages
from sentcomp.launcher.config_files import EXPERIMENTS_DIR, load_config

STUDENTS = ("student_soft_xent_lr0", "student_soft_quad_lr0", "student_xent_lr0")


@pytest.fixture(scope="module")
def smoke(smoke_workdir):
    return smoke_workdir("teacher")


def read_json(path):
    return json.loads(path.read_text())


def log_softmax(logits):
    logits = logits - logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def teacher_arrays(smoke):
    with np.load(smoke / "targets" / "teacher.npz") as arrays:
        return dict(arrays)


def eval_rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "epsilon" in line]


# ------------------------------------------------------------------------------------------- the smoke run


def test_smoke_report_has_every_student_checkpoint_probe_and_the_ceiling(smoke):
    results = read_json(smoke / "report" / "results.json")
    assert list(results["students"]) == list(STUDENTS)
    columns = results["probe_columns"]
    assert columns == ["rotten_tomatoes*/f", "rotten_tomatoes*/phi_p_f", "rotten_tomatoes/f", "rotten_tomatoes/phi_p_f"]
    for entries in results["students"].values():
        assert [e["step"] for e in entries] == [0, 12]
        for e in entries:
            assert set(e["probes"]) == set(columns)
            assert all(0 <= p["accuracy"] <= 1 and p["loss"] > 0 for p in e["probes"].values())
            assert e["epsilon_heldout"]["low"] <= e["epsilon_heldout"]["mean"] <= e["epsilon_heldout"]["high"]
            gamma, heldout, task = e["effective_coverage"], e["epsilon_heldout"], e["epsilon_task"]
            assert gamma["mean"] == pytest.approx(heldout["mean"] / task["mean"])
            assert gamma["low"] == pytest.approx(heldout["low"] / task["high"]) and gamma["low"] <= gamma["mean"]
            assert gamma["high"] == pytest.approx(heldout["high"] / task["low"]) and gamma["mean"] <= gamma["high"]
    assert set(results["teacher_probes"]) == set(columns)
    # the untrained students are one model: identical ε and probes at step 0
    step0 = [entries[0] for entries in results["students"].values()]
    assert len({e["epsilon_heldout"]["mean"] for e in step0}) == 1
    assert results["bound_holds"] is True
    assert set(results["selected"]) == {"student_soft_xent", "student_soft_quad", "student_xent"}
    assert (smoke / "report" / "bound_vs_epsilon.png").stat().st_size > 0
    assert "teacher (ceiling" in (smoke / "report" / "results.md").read_text()
    done = read_json(smoke / "done.json")
    assert done == read_json(smoke / "report" / "done.json")


def test_soft_students_lower_their_own_objective(smoke):
    """The soft cross-entropy student's ε and the soft Quad student's excess Quad loss fall over training."""
    xent = eval_rows(smoke / "student_soft_xent_lr0")
    quad = eval_rows(smoke / "student_soft_quad_lr0")
    assert xent[-1]["epsilon"]["mean"] < xent[0]["epsilon"]["mean"]
    assert quad[-1]["quad_excess"]["mean"] < quad[0]["quad_excess"]["mean"]
    assert xent[-1]["val_loss"] == xent[-1]["epsilon"]["mean"] and quad[-1]["val_loss"] == quad[-1]["quad_excess"][
        "mean"]


def test_heldout_epsilon_is_the_direct_kl_of_teacher_and_student(smoke):
    arrays = teacher_arrays(smoke)
    blocks = arrays["validation_blocks"]
    for name in STUDENTS:
        student = models.load(str(smoke / name / "snapshots" / "step_12"))
        inputs = blocks[:, :-1]
        hidden = np.asarray(student.hidden(inputs, np.ones_like(inputs)), np.float64)
        log_p_f = log_softmax(hidden @ np.asarray(student.phi, np.float64).T)
        log_p_t = log_softmax(arrays["validation_hidden"].astype(np.float64) @ arrays["phi"].astype(np.float64).T)
        kl = (np.exp(log_p_t) * (log_p_t - log_p_f)).sum(-1)  # [blocks, T]
        logged = eval_rows(smoke / name)[-1]["epsilon"]
        np.testing.assert_allclose(logged["mean"], kl.mean(1).mean(), rtol=1e-3)


def test_the_bound_on_the_task_contexts_is_an_exact_inequality(smoke):
    """Recomputed in float64 from the dense distributions: τ_k, plug-in and ε_task match the logged values, and
    plug-in ≤ τ_k + sqrt(2 B_k² ε_task) at every frontier point and checkpoint."""
    arrays = teacher_arrays(smoke)
    labels = arrays["task_labels"]
    signs = 2.0 * labels - 1
    p_t = teacher_lib.next_word_distribution(arrays["task_hidden"], arrays["phi"])
    weights = arrays["frontier_word_weights"].astype(np.float64)
    tau = np.log1p(np.exp(-signs[:, None] * (p_t @ weights.T))).mean(0)
    prompt = read_json(smoke / "targets" / "results.json")["prompt"]
    for name in STUDENTS:
        for row in eval_rows(smoke / name):
            student = models.load(str(smoke / name / "snapshots" / f"step_{row['step']}"))
            h = extract_features(student, list(arrays["task_texts"]), ("f",), prompt=prompt, max_length=64,
                                 progress=False)["f"]
            p_f = teacher_lib.next_word_distribution(h, student.phi)
            epsilon = (p_t * (np.log(p_t) - np.log(p_f))).sum(1).mean()
            plug_in = np.log1p(np.exp(-signs[:, None] * (p_f @ weights.T))).mean(0)
            bound = tau + np.sqrt(2 * arrays["frontier_max_norm"] ** 2 * epsilon)
            assert np.all(plug_in <= bound + 1e-9)
            logged = row["bound"]
            np.testing.assert_allclose(logged["epsilon_task"], epsilon, rtol=1e-3)
            np.testing.assert_allclose(logged["tau"], tau, atol=1e-5)
            np.testing.assert_allclose(logged["plug_in"], plug_in, atol=1e-5)
            assert logged["holds"]


def test_stored_targets_are_the_teachers_top_k(smoke):
    """Every stored field against a dense float64 computation from the saved random teacher, in order."""
    arrays = teacher_arrays(smoke)
    results = read_json(smoke / "targets" / "results.json")
    targets = teacher_lib.read_targets(smoke / "targets" / results["targets_folder"])
    teacher = models.load(str(smoke / "targets" / "model"))
    blocks = arrays["train_blocks"][:4]
    inputs = blocks[:, :-1]
    log_p = log_softmax(np.asarray(teacher.hidden(inputs, np.ones_like(inputs)), np.float64)
                        @ np.asarray(teacher.phi, np.float64).T)
    p = np.exp(log_p)
    k = results["k"]
    ids = targets["ids"][:4].astype(np.int64)
    np.testing.assert_array_equal(np.sort(ids, -1), np.sort(np.argsort(-p, -1)[..., :k], -1))
    np.testing.assert_allclose(targets["probs"][:4], np.take_along_axis(p, ids, -1), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(targets["entropy"][:4], -(p * log_p).sum(-1), rtol=1e-4, atol=1e-5)
    rest = 1 - np.take_along_axis(p, ids, -1).sum(-1)
    tail = np.ones_like(p, bool)
    np.put_along_axis(tail, ids, False, -1)
    u = rest / (p.shape[-1] - k)
    truncation = np.where(tail, p * (log_p - np.log(u)[..., None]), 0).sum(-1)
    np.testing.assert_allclose(targets["truncation_kl"][:4], truncation, rtol=1e-3, atol=1e-5)
    assert results["truncation_kl"]["mean"] == pytest.approx(float(targets["truncation_kl"].mean()), rel=1e-6)
    # k is the smallest candidate whose sampled truncation KL is within the tolerance
    assert k == teacher_lib.choose_k({int(key): v for key, v in results["truncation_kl_by_k"].items()}, 0.05)


def test_target_store_resumes_and_recomputes_only_damaged_chunks(smoke, tmp_path):
    teacher = models.load(str(smoke / "targets" / "model"))
    blocks = teacher_arrays(smoke)["train_blocks"][:6]
    first = teacher_lib.build_targets(teacher, blocks, 4, tmp_path, chunk_blocks=2)
    folder = tmp_path / teacher_lib.targets_key(teacher, blocks, 4)
    untouched = (folder / "probs.0.npy").stat().st_mtime_ns
    (folder / "probs.1.npy").write_bytes(b"torn")
    again = teacher_lib.build_targets(teacher, blocks, 4, tmp_path, chunk_blocks=2)
    assert (folder / "probs.0.npy").stat().st_mtime_ns == untouched
    for field in teacher_lib.TARGET_FIELDS:
        np.testing.assert_array_equal(again[field], first[field])
    (folder / "entropy.2.npy").write_bytes(b"torn")
    with pytest.raises(SentcompError, match="missing or damaged"):
        teacher_lib.read_targets(folder)


def test_choose_k_takes_the_smallest_within_tolerance():
    assert teacher_lib.choose_k({4: 0.3, 16: 0.04, 64: 0.001}, 0.05) == 16
    assert teacher_lib.choose_k({4: 0.3, 16: 0.2}, 0.05) == 16  # none within: the largest candidate


def test_bound_check_of_the_teacher_itself_is_tight():
    rng = np.random.default_rng(0)
    h, phi = rng.normal(size=(40, 6)), rng.normal(size=(23, 6))
    labels = (rng.random(40) < 0.5).astype(int)
    frontier = teacher_lib.task_frontier(h, phi, labels, (0.0, 1.0, 4.0))
    check = teacher_lib.bound_check(h.astype(np.float32), phi.astype(np.float32), h.astype(np.float32),
                                    phi.astype(np.float32), labels, frontier)
    assert abs(check["epsilon_task"]) < 1e-5 and check["holds"]
    np.testing.assert_allclose(check["plug_in"], check["tau"], atol=1e-6)
    np.testing.assert_allclose(check["tau"], frontier["tau"], atol=1e-5)


def test_rotten_tomatoes_plot_rows_are_not_task_snippets():
    from sentcomp.data import get_task, load_task

    plots = set(teacher_lib.rotten_tomatoes_plots())
    splits = load_task(get_task("rotten_tomatoes"))
    assert len(plots) > 1000
    assert not plots & (set(splits["train"].texts) | set(splits["test"].texts))


def test_the_review_source_is_the_task_train_split_text_and_holds_no_test_snippet():
    from sentcomp.data import get_task, load_task

    splits = load_task(get_task("rotten_tomatoes"))
    reviews = teacher_lib.source_documents("rt_reviews")
    assert reviews == list(splits["train"].texts)
    assert len(reviews) > 10_000
    assert not set(reviews) & set(splits["test"].texts)
    left_out = reviews[:5]
    prompted = teacher_lib.source_documents("rt_reviews_prompted", left_out)
    assert prompted == [review + " This movie is" for review in reviews[5:]]  # the task's prompt, no trailing space


@pytest.mark.parametrize("variant", ["", "quick", "prompted"])
def test_no_student_reads_a_snippet_any_probe_reads(variant):
    """The corpus of the CPU experiment (and of its quick cut) leaves out every snippet its Table-1 stages probe:
    the probes' train and test snippets, recomputed here from the Table-1 stages' own configs."""
    from sentcomp.evaluators.task_data import prepare_task
    from sentcomp.programs import teacher_targets

    config = load_config(f"{EXPERIMENTS_DIR / 'teacher.py'}:{variant}")
    probed = set()
    for name in config.stage_order:
        stage = config.stages[name]
        if stage.program == "sentcomp.programs.table1":
            data = prepare_task("rotten_tomatoes", stage)
            probed |= {text for pair in data.pairs for split in pair for text in split.texts}
    targets = config.stages.targets
    excluded = teacher_targets.probe_snippets(targets)
    sizes = targets.corpus.unseen_probe
    assert set(excluded) == probed and len(probed) == sizes.n_train + sizes.n_test
    documents = teacher_lib.distillation_documents(targets.corpus.sources, targets.corpus.validation_fraction,
                                                   targets.corpus.seed, excluded)
    read = {document.removesuffix(" This movie is") for document in documents["train"] + documents["validation"]}
    assert not probed & read  # (the prompted variant's documents are reviews followed by the prompt)
    reviews = set(teacher_lib.source_documents("rt_reviews"))
    assert len(reviews & read) == len(reviews - probed)


def test_configs_compose_and_the_accelerator_variant_estimates_its_time(tmp_path):
    for arg in ("smoke", "quick", None, "accelerator"):
        config = load_config(f"{EXPERIMENTS_DIR / 'teacher'}.py" + (f":{arg}" if arg else ""))
        names = stages.stage_names(config)
        assert names[0] == "targets" and names[-1] == "report"
        stages.stage_configs(config, tmp_path)  # every stage reference points at an earlier stage
    estimate = config.estimate
    assert estimate.flops > estimate.teacher_flops > 0
    assert estimate.expected_seconds == pytest.approx(estimate.flops / (estimate.peak_flops * estimate.assumed_mfu))
    with pytest.raises(SentcompError, match="Choose one variant"):
        load_config(f"{EXPERIMENTS_DIR / 'teacher'}.py:smoke,accelerator")


def test_a_frontier_on_fewer_words_is_valid_and_no_tighter():
    rng = np.random.default_rng(1)
    h, phi = 2 * rng.normal(size=(60, 5)), rng.normal(size=(40, 5))
    labels = (h[:, 0] > 0).astype(int)
    full = teacher_lib.task_frontier(h, phi, labels, (0.0, 1.0, 4.0))
    few = teacher_lib.task_frontier(h, phi, labels, (0.0, 1.0, 4.0), num_words=8)
    assert len(few["words"]) == 8
    off = np.setdiff1d(np.arange(40), few["words"])
    assert np.all(few["word_weights"][:, off] == 0)
    assert np.all(few["tau"] >= full["tau"] - 1e-7)
    # τ is the loss of the stored v on the whole distribution, so the bound check sees the same numbers
    student_h = h + 0.3 * rng.normal(size=h.shape)
    check = teacher_lib.bound_check(student_h.astype(np.float32), phi.astype(np.float32), h.astype(np.float32),
                                    phi.astype(np.float32), labels, few)
    np.testing.assert_allclose(check["tau"], few["tau"], atol=1e-5)
    assert check["holds"] and check["epsilon_task"] > 0
