import pytest
import torch

from slimtrain.optim.state import scaled_beta
from slimtrain.quant import codebook, median_spacing_radius


@pytest.mark.parametrize("kind", ["dynamic", "linear"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_codebooks_are_sorted_tables_with_zero_and_one(kind, bits, signed):
    levels = codebook(kind, bits, signed)
    assert levels.shape == (2**bits,) and levels.dtype == torch.float32
    assert torch.all(levels[1:] >= levels[:-1])
    assert levels.max() == 1.0 and (levels == 0).any()
    assert levels.min() >= (-1.0 if signed else 0.0)


def test_dynamic_map_has_more_resolution_near_zero():
    levels = codebook("dynamic", 8, True)
    positive = levels[levels > 0]
    assert positive.min() < 1e-5  # seven decades
    gaps = positive[1:] - positive[:-1]
    assert gaps[:2].max() < 1e-5 and gaps[-4:].min() > 1e-3


@pytest.mark.parametrize(
    "reference,bits,paper", [(8, 4, 0.350), (8, 3, 0.211), (8, 2, 0.116),
                             (5, 4, 0.820), (5, 3, 0.694), (5, 2, 0.527)],
)
def test_scaled_beta1_follows_the_paper_table(reference, bits, paper):
    assert scaled_beta(0.9, bits, reference) == pytest.approx(paper, abs=0.012)


def test_fewer_bits_means_wider_spacing():
    radii = [median_spacing_radius(codebook("dynamic", b, True)) for b in (8, 4, 3, 2)]
    assert radii == sorted(radii)


def test_unknown_kind_names_accepted_values():
    with pytest.raises(ValueError, match="dynamic"):
        codebook("nf4", 4, True)
