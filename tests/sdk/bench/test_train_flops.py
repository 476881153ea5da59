"""The training step's FLOP count, known answers from the layer shapes, and the SGEMM peak child."""

from __future__ import annotations

import json
import subprocess
import sys

from sdk.bench.train_flops import PEAK_CHILD, PEAK_SIZES, training_flops, write_matmul_models
from sdk.models import PersonalizedCNN1D, PersonalizedCNN2D, PersonalizedMLP


def test_training_flops_counts_forward_weight_and_input_gradients_except_the_first_input():
    # Linear(8, 8): 64 MACs, its input is the data (forward + weight gradient); Linear(8, 3): 24 MACs, all three passes.
    assert training_flops(PersonalizedMLP(8, (8,), 3), (8,), batch=1) == 2 * 64 * 2 + 2 * 24 * 3
    assert training_flops(PersonalizedMLP(8, (8,), 3), (8,), batch=5) == 5 * (2 * 64 * 2 + 2 * 24 * 3)


def test_training_flops_of_the_benchmark_cnns():
    # 1D-CNN (6, 100): conv 6->32 k5 (100 positions, first layer), conv 32->64 k5 (50), fc 64->64, head 64->7.
    conv1, conv2, fc, head = 3200 * 30, 3200 * 160, 64 * 64, 7 * 64
    assert training_flops(PersonalizedCNN1D(6, 7), (6, 100), batch=1) == 2 * (2 * conv1 + 3 * (conv2 + fc + head))
    # 2D-CNN 1x28x28: conv 1->32 5x5 (24x24), conv 32->64 5x5 (8x8), fc 1024->512, head 512->10.
    conv1, conv2, fc, head = 32 * 576 * 25, 64 * 64 * 800, 512 * 1024, 10 * 512
    assert training_flops(PersonalizedCNN2D(1, 10), (1, 28, 28), batch=32) == 32 * 2 * (2 * conv1 + 3 * (conv2 + fc + head))


def test_sgemm_peak_child_reports_a_rate(tmp_path):
    models = write_matmul_models(tmp_path)
    assert sorted(models) == sorted(PEAK_SIZES)
    cfg = {"threads": 1, "windows": 2, "models": {str(k): v for k, v in models.items()}}
    proc = subprocess.run([sys.executable, "-c", PEAK_CHILD, json.dumps(cfg)], capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(proc.stdout)
    assert result["gflops"] > 1.0  # any x86-64 or aarch64 core does far more than 1 GFLOP/s of SGEMM
    # a process's CPU time never exceeds its wall time at one thread, so the per-CPU-second rate is at least as high
    assert result["gflops_per_cpu_s"] >= 0.95 * result["gflops"]
