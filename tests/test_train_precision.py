"""The trainers' --bf16 precision context (training/schedule.autocast): bfloat16 autocast, and on the CPU the
plain (math) attention kernel, whose bfloat16 backward is several times faster there than the fused one's;
the default kernel choice comes back afterwards, also when the block raises."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from training import schedule


def _qkv():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(4, 8, 64, 16, generator=gen, requires_grad=True) for _ in range(3)]


def _attend(qkv):
    return F.scaled_dot_product_attention(*qkv)


def test_bf16_on_the_cpu_runs_attention_on_the_math_kernel_then_restores_the_default():
    qkv = _qkv()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        default = _attend(qkv)
        with sdpa_kernel([SDPBackend.MATH]):
            math = _attend(qkv)
    assert not torch.equal(default, math)  # the kernels round differently in bfloat16: the test can tell them apart

    with schedule.autocast("cpu", True):
        inside = _attend(qkv)
    assert inside.dtype == torch.bfloat16 and torch.equal(inside, math)
    inside.float().sum().backward()  # the math kernel's backward runs outside the block
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in qkv)

    with pytest.raises(RuntimeError):
        with schedule.autocast("cpu", True):
            raise RuntimeError("a failing step")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(_attend(qkv), default)  # the default kernel choice is back, after the error too


def test_without_bf16_the_context_changes_nothing():
    qkv = _qkv()
    with schedule.autocast("cpu", False):
        plain = _attend(qkv)
    assert plain.dtype == torch.float32 and torch.equal(plain, _attend(qkv))
    assert not torch.is_autocast_enabled("cpu")
