import math

import pytest
import torch

from ila.analysis.metrics import (
    curvature,
    effective_rank,
    gram_entropy,
    linear_cka,
    mean_cosine,
    mean_shift,
    rank_deficiency,
    sparsity,
)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _rank1(n: int, d: int) -> torch.Tensor:
    return torch.outer(_randn(n, seed=1), _randn(d, seed=2))


def test_cka_of_a_matrix_with_itself_is_one():
    x = _randn(32, 6)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


def test_cka_is_invariant_to_rotation_and_isotropic_scaling():
    x, y = _randn(32, 8, seed=3), _randn(32, 5, seed=4) + 0.5 * _randn(32, 8, seed=3)[:, :5]
    q, _ = torch.linalg.qr(_randn(8, 8, seed=5))
    assert linear_cka(x, x @ q) == pytest.approx(1.0, abs=1e-6)  # float32 inputs: rounding of x @ q
    base = linear_cka(x, y)
    assert 0.05 < base < 0.99
    assert linear_cka(x @ q, y) == pytest.approx(base, abs=1e-6)
    assert linear_cka(x, 7.5 * y) == pytest.approx(base, abs=1e-6)


def test_cka_of_independent_random_matrices_is_low_and_of_constant_is_zero():
    assert linear_cka(_randn(64, 8, seed=6), _randn(64, 8, seed=7)) < 0.5
    assert linear_cka(_randn(10, 3), torch.ones(10, 4)) == 0.0


def test_effective_rank_of_identity_and_rank_one():
    assert effective_rank(torch.eye(16)) == pytest.approx(16.0, abs=1e-6)
    assert effective_rank(_rank1(20, 8)) == pytest.approx(1.0, abs=1e-6)
    assert effective_rank(torch.zeros(4, 3)) == 0.0
    assert 1.0 < effective_rank(_randn(20, 8)) < 8.0


def test_rank_deficiency_of_rank_one_and_identity():
    assert rank_deficiency(_rank1(20, 8)) == 7.0  # float32 rounding must not count as rank
    assert rank_deficiency(torch.outer(_randn(20, seed=1).double(), _randn(8, seed=2).double())) == 7.0
    assert rank_deficiency(_randn(20, 8)) == 0.0
    assert rank_deficiency(torch.eye(8)) == 0.0
    assert rank_deficiency(torch.diag(torch.tensor([1.0, 1e-3, 1e-9]))) == 1.0
    assert rank_deficiency(torch.diag(torch.tensor([1.0, 1e-3, 1e-9])), rtol=1e-2) == 2.0


@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_gram_entropy_known_answers(alpha):
    assert gram_entropy(torch.eye(8), alpha) == pytest.approx(1.0, abs=1e-12)
    assert gram_entropy(_rank1(8, 8), alpha) == pytest.approx(0.0, abs=1e-9)
    assert gram_entropy(torch.ones(6, 3), alpha) == pytest.approx(0.0, abs=1e-9)
    assert 0.1 < gram_entropy(_randn(8, 16), alpha) < 0.999
    assert gram_entropy(_randn(1, 5), alpha) == 0.0


def test_gram_entropy_tall_matrix_uses_the_same_spectrum():
    z = _randn(12, 4, seed=8)
    padded = torch.cat([z, torch.zeros(12, 8)], dim=1)  # 12×12: Gram path; z alone: covariance path
    for alpha in (1.0, 2.0):
        assert gram_entropy(z, alpha) == pytest.approx(gram_entropy(padded, alpha), abs=1e-10)
    assert gram_entropy(z) < math.log(4) / math.log(12) + 1e-12  # at most rank 4


def test_gram_entropy_alpha_near_one_approaches_shannon_and_decreases_with_alpha():
    z = _randn(10, 20, seed=9)
    shannon = gram_entropy(z, 1.0)
    assert gram_entropy(z, 1.0001) == pytest.approx(shannon, abs=1e-3)
    assert gram_entropy(z, 0.5) > shannon > gram_entropy(z, 2.0)
    with pytest.raises(ValueError):
        gram_entropy(z, 0.0)


def test_sparsity_of_a_known_tensor():
    z = torch.tensor([[0.0, 0.05, -0.2], [1e-3, 2.0, -0.01]])
    assert sparsity(z, 0.1) == pytest.approx(4 / 6)
    assert sparsity(z, 1e-4) == pytest.approx(1 / 6)


def test_curvature_straight_path_is_zero():
    v = _randn(6, seed=10)
    h = torch.arange(5, dtype=torch.float32)[:, None] * v
    assert curvature(h) == pytest.approx(0.0, abs=1e-6)
    assert curvature(h[:2]) == 0.0


def test_curvature_right_angle_turns_is_half_pi():
    steps = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0], [1.0, 0.0]])
    h = torch.cat([torch.zeros(1, 2), steps.cumsum(dim=0)])
    assert curvature(h) == pytest.approx(math.pi / 2, abs=1e-12)
    paused = torch.cat([h[:2], h[1:2], h[2:]])  # a zero-length step is skipped, not a turn
    assert curvature(paused) == pytest.approx(math.pi / 2, abs=1e-12)


def test_mean_cosine_of_same_and_opposite_rows():
    a = _randn(7, 5, seed=11)
    assert mean_cosine(a, a) == pytest.approx(1.0, abs=1e-12)
    assert mean_cosine(a, -a) == pytest.approx(-1.0, abs=1e-12)
    b = a.clone()
    b[0] = 0.0  # skipped row
    assert mean_cosine(torch.cat([a[:1], -a[1:]]), b) == pytest.approx(-1.0, abs=1e-12)


def test_mean_shift_is_the_distance_of_centroids():
    a = _randn(9, 4, seed=12)
    c = torch.tensor([3.0, 0.0, -4.0, 0.0])
    assert mean_shift(a, a) == 0.0
    assert mean_shift(a, a + c) == pytest.approx(5.0, abs=1e-6)


def test_half_precision_inputs_return_python_floats():
    x = _randn(16, 8, seed=13)
    assert isinstance(linear_cka(x.half(), x.bfloat16()), float)
    assert linear_cka(x.half(), x.bfloat16()) == pytest.approx(1.0, abs=1e-2)
    assert isinstance(gram_entropy(x.bfloat16()), float)
