"""The benchmarks' peak-memory measure sees what a call allocates, freed or not."""

import torch

from moa.training.memory import peak_allocated_mb


def test_peak_counts_a_temporary_and_ignores_earlier_allocations():
    kept = torch.ones(4 * 2**20 // 4)  # 4 MiB allocated before the call: not counted

    def make_and_drop_eight_mib() -> float:
        temporary = torch.ones(8 * 2**20 // 4)
        return float(temporary[0]) + float(kept[0])

    peak = peak_allocated_mb(make_and_drop_eight_mib)
    assert 8.0 <= peak < 9.0
