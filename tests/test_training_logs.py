"""The live views of training metrics: every numeric scalar of a metrics row as a TensorBoard scalar, on disk as
soon as the row is logged (read back here with our own TFRecord reader), the old values of the steps a resume
runs again purged the way tensorboardX's purge_step does, and the optional Weights & Biases run."""

import struct
import sys
import types

import pytest
from tensorboardX import SummaryWriter
from tensorboardX.proto.event_pb2 import Event, SessionLog

from sentcomp import parallel
from sentcomp.results import layout, storage
from sentcomp.training import tracking


@pytest.fixture(autouse=True)
def closed_logs(monkeypatch):
    monkeypatch.delenv(tracking.WANDB_PROJECT_VARIABLE, raising=False)
    yield
    tracking.close_metrics()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), bit by bit."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def read_event_file(path) -> list[Event]:
    """The events of a TFRecord file: uint64 length, uint32 masked CRC of the length, payload, uint32 masked CRC
    of the payload (little-endian); every CRC checked and the file read to its last byte."""
    data, events, at = path.read_bytes(), [], 0
    while at < len(data):
        header = data[at:at + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[at + 8:at + 12])[0] == masked_crc(header)
        payload = data[at + 12:at + 12 + length]
        assert len(payload) == length and struct.unpack("<I", data[at + 12 + length:at + 16 + length])[0] == \
            masked_crc(payload)
        events.append(Event.FromString(payload))
        at += 16 + length
    return events


def event_files(directory):
    return sorted(path for path in directory.iterdir() if "tfevents" in path.name)  # TensorBoard's reading order


def scalars(events) -> list[tuple[str, int, float]]:
    return [(value.tag, event.step, value.simple_value) for event in events for value in event.summary.value]


def shown_by_tensorboard(events) -> dict[str, dict[int, float]]:
    """What TensorBoard keeps of a run's events read in order: a SessionLog START at step s drops every value
    at steps >= s read before it (its purge of orphaned data after a restart)."""
    shown: dict[str, dict[int, float]] = {}
    for event in events:
        if event.session_log.status == SessionLog.START:
            shown = {tag: {step: v for step, v in values.items() if step < event.step} for tag, values in shown.items()}
        for tag, step, value in scalars([event]):
            shown.setdefault(tag, {})[step] = value
    return shown


def test_numeric_scalars_are_on_disk_after_each_row(tmp_path):
    rows = [{"step": 1, "loss": 2.5, "learning_rate": 1e-3, "loss_name": "quad", "finite": True, "sizes": [1, 2],
             "probe": {"sst2": 0.75, "agnews": {"accuracy": 0.5}}},
            {"step": 2, "loss": 2.0, "learning_rate": 2e-3, "tokens": 1024, "probe": {"sst2": 0.875}}]
    expected = [[("loss", 1, 2.5), ("learning_rate", 1, 1e-3), ("probe/sst2", 1, 0.75),
                 ("probe/agnews/accuracy", 1, 0.5)],
                [("loss", 2, 2.0), ("learning_rate", 2, 2e-3), ("tokens", 2, 1024.0), ("probe/sst2", 2, 0.875)]]
    for count, row in enumerate(rows, 1):
        tracking.append_metrics(tmp_path, row)
        [path] = event_files(tmp_path / layout.TENSORBOARD_DIR)  # read while the writer is still open
        events = read_event_file(path)
        assert events[0].file_version == "brain.Event:2"
        logged = scalars(events)
        assert [tag for tag, _, _ in logged] == [tag for rows in expected[:count] for tag, _, _ in rows]
        for (tag, step, value), (expected_tag, expected_step, expected_value) in zip(
                logged, [entry for rows in expected[:count] for entry in rows]):
            assert (tag, step) == (expected_tag, expected_step) and value == pytest.approx(expected_value, rel=1e-6)
    assert tracking.read_metrics(tmp_path) == rows


def test_only_process_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(parallel, "is_main_process", lambda: False)
    tracking.append_metrics(tmp_path, {"step": 1, "loss": 1.0})
    assert list(tmp_path.iterdir()) == []


def test_a_resume_purges_the_steps_it_runs_again(tmp_path):
    for step in range(1, 5):
        tracking.append_metrics(tmp_path, {"step": step, "loss": float(step)})
    tracking.truncate_metrics(tmp_path, 2)  # what checkpoints.resume does after restoring the step-2 checkpoint
    for step in (3, 4):
        tracking.append_metrics(tmp_path, {"step": step, "loss": 10.0 * step})
    assert tracking.read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0},
                                               {"step": 3, "loss": 30.0}, {"step": 4, "loss": 40.0}]

    first, second = event_files(tmp_path / layout.TENSORBOARD_DIR)
    assert scalars(read_event_file(first)) == [("loss", step, float(step)) for step in range(1, 5)]
    resumed = read_event_file(second)
    # the events tensorboardX's SummaryWriter(purge_step=3) starts its file with, before any data
    SummaryWriter(str(tmp_path / "reference"), purge_step=3).close()
    [reference_file] = event_files(tmp_path / "reference")
    reference_events = read_event_file(reference_file)

    def purge_events(events):
        return [(event.step, event.file_version, event.session_log.status) for event in events
                if not event.HasField("summary")]

    assert purge_events(resumed) == purge_events(reference_events) == [
        (0, "brain.Event:2", SessionLog.STATUS_UNSPECIFIED), (3, "brain.Event:2", SessionLog.STATUS_UNSPECIFIED),
        (3, "", SessionLog.START)]
    assert scalars(resumed) == [("loss", 3, 30.0), ("loss", 4, 40.0)]
    assert shown_by_tensorboard(read_event_file(first) + resumed) == {"loss": {1: 1.0, 2: 2.0, 3: 30.0, 4: 40.0}}


def test_a_log_reopened_within_the_same_second_keeps_the_previous_file(tmp_path):
    tracking.append_metrics(tmp_path, {"step": 1, "loss": 1.0})
    tracking.close_metrics(tmp_path)
    tracking.append_metrics(tmp_path, {"step": 2, "loss": 2.0})
    files = event_files(tmp_path / layout.TENSORBOARD_DIR)
    assert [scalars(read_event_file(path)) for path in files] == [[("loss", 1, 1.0)], [("loss", 2, 2.0)]]


class FakeWandb(types.ModuleType):
    """Records ``wandb.init`` and its runs' ``log`` / ``finish`` calls."""

    def __init__(self):
        super().__init__("wandb")
        self.calls = []

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        fake, name = self, kwargs["name"]
        return types.SimpleNamespace(log=lambda data, step: fake.calls.append(("log", name, data, step)),
                                     finish=lambda: fake.calls.append(("finish", name)))


def test_weights_and_biases_only_when_asked(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    tracking.append_metrics(first, {"step": 1, "loss": 1.5})
    assert fake.calls == []  # no SENTCOMP_WANDB_PROJECT: no W&B

    monkeypatch.setenv(tracking.WANDB_PROJECT_VARIABLE, "sentcomp-tests")
    tracking.append_metrics(first, {"step": 2, "loss": 1.25, "probe": {"sst2": 0.5}, "note": "x"})
    tracking.append_metrics(first, {"step": 3, "loss": 1.0})
    tracking.append_metrics(second, {"step": 1, "loss": 4.0})  # one W&B run at a time: the first one finishes
    tracking.close_metrics()
    first_id = storage.content_hash(str(first.resolve()))
    assert fake.calls == [
        ("init", {"project": "sentcomp-tests", "name": "first", "dir": str(first.resolve()), "resume": "allow",
                  "id": first_id}),
        ("log", "first", {"loss": 1.25, "probe/sst2": 0.5}, 2),
        ("log", "first", {"loss": 1.0}, 3),
        ("finish", "first"),
        ("init", {"project": "sentcomp-tests", "name": "second", "dir": str(second.resolve()), "resume": "allow",
                  "id": storage.content_hash(str(second.resolve()))}),
        ("log", "second", {"loss": 4.0}, 1),
        ("finish", "second"),
    ]
    fake.calls.clear()
    tracking.append_metrics(first, {"step": 4, "loss": 0.5})  # a later process resumes the same W&B run
    assert fake.calls[0][1]["id"] == first_id


def test_weights_and_biases_asked_but_not_installed(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    monkeypatch.setenv(tracking.WANDB_PROJECT_VARIABLE, "sentcomp-tests")
    with pytest.warns(UserWarning, match="wandb is not installed"):
        tracking.append_metrics(tmp_path, {"step": 1, "loss": 1.0})
    assert tracking.read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}]
