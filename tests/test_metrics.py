"""MetricsWriter's TensorBoard events on resume and rollback, and the MFU peak table."""

import glob
import struct
import types

import pytest
from tensorboardX.proto import event_pb2

from maxlm.train.metrics import MetricsWriter, peak_flops


def _events(workdir) -> list:
    """Every event of every TensorBoard file in ``workdir/tensorboard``, file by file (TFRecord framing)."""
    events = []
    for path in sorted(glob.glob(str(workdir / "tensorboard" / "events.out.tfevents.*"))):
        data, offset = open(path, "rb").read(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            events.append(event_pb2.Event.FromString(data[offset + 12:offset + 12 + length]))
            offset += 12 + length + 4
    return events


def _purges(workdir) -> list[int]:
    """The steps from which TensorBoard is told to drop earlier-written events (SessionLog START)."""
    return [e.step for e in _events(workdir) if e.HasField("session_log") and e.session_log.status == 1]


def test_rollback_and_resume_tell_tensorboard_to_drop_the_redone_steps(tmp_path):
    writer = MetricsWriter(str(tmp_path), total_steps=10)
    for step in range(1, 5):
        writer.write(step, {"loss": float(step)})
    writer.rewind(2)  # a divergence rollback to step 2
    writer.write(3, {"loss": 0.5})
    writer.close()
    assert _purges(tmp_path) == [3]
    resumed = MetricsWriter(str(tmp_path), total_steps=10, start_step=3)  # a restart from checkpoint 3
    resumed.close()
    assert sorted(_purges(tmp_path)) == [3, 4]
    losses = sorted(e.step for e in _events(tmp_path) if e.HasField("summary"))
    assert losses == [1, 2, 3, 3, 4]  # no file overwrote another; TensorBoard drops the first 3 and the 4


@pytest.mark.parametrize("kind,peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                                       ("NVIDIA L4", 121e12), ("NVIDIA L40S", None), ("TPU v5 lite", 197e12),
                                       ("TPU v5p", 459e12), ("cpu", None)])
def test_peak_flops_matches_whole_words(kind, peak):
    assert peak_flops(types.SimpleNamespace(device_kind=kind)) == peak
