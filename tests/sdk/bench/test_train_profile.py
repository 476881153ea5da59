"""The step profiler: GEMM FLOPs from profiled shapes, and on a real graph they equal the analytic count."""

from __future__ import annotations

import pytest

from sdk.bench.train_bench import BenchModel
from sdk.bench.train_flops import training_flops
from sdk.bench.train_profile import format_profile, gemm_flops, profile_step
from sdk.models import PersonalizedMLP


def test_gemm_flops_read_k_from_the_first_operand_plain_transposed_or_batched():
    assert gemm_flops("MatMul", [[32, 20], [20, 64]], [32, 64]) == 2 * 32 * 64 * 20
    assert gemm_flops("Gemm", [[20, 32], [64, 20]], [32, 64]) == 2 * 32 * 64 * 20  # transA: (K, M)
    assert gemm_flops("MatMul", [[1, 800, 64], [32, 64, 64]], [32, 800, 64]) == 2 * 32 * 800 * 64 * 64


def test_profile_of_a_small_mlp_counts_exactly_the_analytic_flops(tmp_path):
    tiny = BenchModel(name="mlp-8-8-3", factory="PersonalizedMLP", kwargs={"in_features": 8, "hidden": [8], "num_classes": 3},
                      input_shape=(8,), classes=3, steps=20)
    profile = profile_step(tiny, batch=8, threads=1, steps=3, work=tmp_path)
    assert profile.gemm_mflop == pytest.approx(training_flops(PersonalizedMLP(8, (8,), 3), (8,), batch=8) / 1e6)
    assert 0 < profile.gemm_ms < profile.kernel_ms == pytest.approx(sum(profile.by_op_ms.values()))
    assert "mlp-8-8-3" in format_profile(profile)
