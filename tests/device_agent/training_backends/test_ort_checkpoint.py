"""The ORT checkpoint codec: what it writes, onnxruntime-training loads and trains on exactly as from its own files."""

from __future__ import annotations

import numpy as np
import pytest

from device_agent.bundle.manifest import ArtifactSetName
from device_agent.data import ArrayDataSource
from device_agent.errors import StateError
from device_agent.trainer import DeviceTrainer, TrainBudget
from device_agent.training_backends.ort_checkpoint import OrtCheckpoint, read_checkpoint, write_checkpoint
from tests.model_bundles import make_data


def test_checkpoint_roundtrip_keeps_every_array_and_counter():
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(3,)).astype(np.float32)
    ckpt = OrtCheckpoint(trainable={"w": w}, frozen={"b": b, "anchor.w": w + 1}, step=17, learning_rate=0.25,
                         moments={"w": (w * 2, w * w)})
    back = read_checkpoint(write_checkpoint(ckpt))
    assert back.step == 17 and back.learning_rate == 0.25
    assert list(back.trainable) == ["w"] and sorted(back.frozen) == ["anchor.w", "b"]
    np.testing.assert_array_equal(back.trainable["w"], w)
    np.testing.assert_array_equal(back.frozen["anchor.w"], w + 1)
    np.testing.assert_array_equal(back.moments["w"][1], w * w)
    assert read_checkpoint(write_checkpoint(OrtCheckpoint(trainable={"w": w}, frozen={}))).step is None


@pytest.mark.parametrize("data", [b"", b"junk", b"\x00\x00\x00\x00ODTC\xff\xff", b"\x14\x00\x00\x00XXXX" + b"\x00" * 30])
def test_damaged_checkpoint_raises_state_error(data):
    with pytest.raises(StateError):
        read_checkpoint(data)


def test_ort_resumes_written_checkpoint_bit_for_bit(model_bundle, install, tmp_path):
    """Export from ORT, write checkpoints from the neutral state, reopen: the next AdamW step is identical."""
    path, _ = model_bundle("mlp", "fedavg", optimizer="adamw")
    bundle = install(path)
    trainer = DeviceTrainer(bundle, backend="ort-training", threads=1)
    x, y = make_data("mlp", "cross_entropy", 8, seed=0)
    for _ in range(3):
        trainer.train(ArrayDataSource(x, y), TrainBudget(epochs=1, batch_size=8))
    from device_agent.training_backends import open_backend

    reopened = open_backend("ort-training", bundle, threads=1, state=trainer.export_state())
    assert trainer._backend.train_step(ArtifactSetName.JOINT, x, y) == reopened.train_step(ArtifactSetName.JOINT, x, y)
    for name in trainer.manifest.shared_names:
        np.testing.assert_array_equal(reopened.get_parameter(name), trainer._backend.get_parameter(name))
