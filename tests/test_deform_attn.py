"""Multi-scale deformable attention against naive per-point loops: bilinear (facts 3.4) and v2 discrete."""

import functools
import math

import pytest
import torch

import rtdetr.models.deform_attn as deform_attn
from rtdetr.models.deform_attn import MSDeformableAttention, deformable_attention_core


def bilinear_zero_padded(img: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """img [C, H, W]; (x, y) normalised in [0, 1] -> [C]. align_corners=False: pixel = loc * size - 0.5;
    neighbours outside the map contribute zero."""
    c, h, w = img.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(c, dtype=img.dtype)
    for yy in (y0, y0 + 1):
        for xx in (x0, x0 + 1):
            weight = (1 - abs(px - xx)) * (1 - abs(py - yy))
            if 0 <= xx < w and 0 <= yy < h:
                out += weight * img[:, yy, xx]
    return out


def level_maps(value: torch.Tensor, shapes) -> list[torch.Tensor]:
    """[B, S, heads, D] (tokens row-major per level) -> per level [B, heads * D, H, W], the core's input."""
    b = value.shape[0]
    chunks = value.flatten(2).split([h * w for h, w in shapes], dim=1)
    return [c.transpose(1, 2).reshape(b, -1, h, w) for c, (h, w) in zip(chunks, shapes)]


def naive_core(value, spatial_shapes, locations, weights, num_points, sample=None):
    """value [B, S, heads, D]; locations [B, Lq, heads, sum(P), 2]; weights [B, Lq, heads, sum(P)];
    sample(img [D, H, W], x, y) -> [D] reads one point (default: bilinear with zero padding)."""
    sample = sample or bilinear_zero_padded
    b, _, heads, d = value.shape
    lq = locations.shape[1]
    starts = [0]
    for h, w in spatial_shapes:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(b, lq, heads, d, dtype=value.dtype)
    for bi in range(b):
        for hi in range(heads):
            for qi in range(lq):
                p_index = 0
                for level, (h, w) in enumerate(spatial_shapes):
                    img = value[bi, starts[level] : starts[level + 1], hi].T.reshape(d, h, w)
                    for _ in range(num_points[level]):
                        x, y = locations[bi, qi, hi, p_index].tolist()
                        out[bi, qi, hi] += weights[bi, qi, hi, p_index] * sample(img, x, y)
                        p_index += 1
    return out.reshape(b, lq, heads * d)


SHAPES = [(3, 5), (2, 4), (1, 3)]  # non-square levels, (H, W)
POINTS = [1, 2, 3]


def test_core_matches_naive_bilinear_loop():
    g = torch.Generator().manual_seed(0)
    b, heads, d, lq = 2, 2, 3, 3
    s = sum(h * w for h, w in SHAPES)
    value = torch.randn(b, s, heads, d, generator=g, dtype=torch.float64)
    # Locations partly outside [0, 1] to exercise the zero padding.
    locations = torch.rand(b, lq, heads, sum(POINTS), 2, generator=g, dtype=torch.float64) * 1.4 - 0.2
    weights = torch.rand(b, lq, heads, sum(POINTS), generator=g, dtype=torch.float64)
    got = deformable_attention_core(level_maps(value, SHAPES), locations, weights, POINTS)
    ref = naive_core(value, SHAPES, locations, weights, POINTS)
    assert got.shape == (b, lq, heads * d)
    assert (got - ref).abs().max().item() < 1e-5


def test_core_float32_matches_naive_and_exact_pixel_centres():
    g = torch.Generator().manual_seed(1)
    value = torch.randn(1, 3 * 5, 1, 2, generator=g)
    # pixel centre of (row 1, col 3) of a 3x5 map: x = (3 + .5) / 5, y = (1 + .5) / 3 -> exactly that pixel
    loc = torch.tensor([(3.5 / 5, 1.5 / 3)]).reshape(1, 1, 1, 1, 2)
    got = deformable_attention_core(level_maps(value, [(3, 5)]), loc, torch.ones(1, 1, 1, 1), [1])
    torch.testing.assert_close(got[0, 0], value[0, 1 * 5 + 3, 0], atol=1e-6, rtol=0)
    # outside by one full pixel -> zero
    far = torch.tensor([(-1.0 / 5, 0.5)]).reshape(1, 1, 1, 1, 2)
    assert deformable_attention_core(level_maps(value, [(3, 5)]), far, torch.ones(1, 1, 1, 1), [1]).abs().max() == 0


def test_init_bias_layout_ring_of_eight_directions():
    module = MSDeformableAttention(embed_dim=32, num_heads=8, num_points=(4, 4, 4))
    directions = torch.tensor(
        [[1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1], [0, -1], [1, -1]], dtype=torch.float32
    )
    # (head, level, point, xy) order, point p at distance p + 1
    expected = directions[:, None, None, :] * torch.arange(1, 5, dtype=torch.float32)[None, None, :, None]
    expected = expected.expand(8, 3, 4, 2).flatten()
    torch.testing.assert_close(module.sampling_offsets.bias.detach(), expected, atol=1e-6, rtol=1e-6)
    assert module.sampling_offsets.bias.shape == (8 * 3 * 4 * 2,)
    assert (module.sampling_offsets.weight == 0).all()
    assert (module.attention_weights.weight == 0).all() and (module.attention_weights.bias == 0).all()
    assert (module.value_proj.bias == 0).all() and (module.output_proj.bias == 0).all()


def test_init_bias_layout_with_points_per_level():
    module = MSDeformableAttention(embed_dim=16, num_heads=8, num_points=(1, 2, 3))
    bias = module.sampling_offsets.bias.detach().reshape(8, 6, 2)
    scales = torch.tensor([1, 1, 2, 1, 2, 3], dtype=torch.float32)  # point index restarts per level
    ring = bias / scales[None, :, None]
    torch.testing.assert_close(ring, ring[:, :1].expand(8, 6, 2))
    torch.testing.assert_close(bias[1, 5], torch.tensor([3.0, 3.0]), atol=1e-6, rtol=0)  # head 1 = 45 deg
    torch.testing.assert_close(bias[6, 2], torch.tensor([0.0, -2.0]), atol=1e-6, rtol=0)  # head 6 = 270 deg


def test_sampling_locations_and_full_forward(monkeypatch):
    torch.manual_seed(0)
    module = MSDeformableAttention(embed_dim=8, num_heads=2, num_points=tuple(POINTS))
    with torch.no_grad():  # random, non-trivial offsets and attention logits
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    b, lq = 2, 3
    query = torch.randn(b, lq, 8)
    ref = torch.cat([torch.rand(b, lq, 2), torch.rand(b, lq, 2) * 0.5 + 0.1], -1)
    memory = torch.randn(b, sum(h * w for h, w in SHAPES), 8)

    captured = {}
    real_core = deform_attn.deformable_attention_core

    def spy(values, locations, weights, num_points, method):
        captured.update(locations=locations, weights=weights)
        return real_core(values, locations, weights, num_points, method)

    monkeypatch.setattr(deform_attn, "deformable_attention_core", spy)
    with torch.no_grad():
        out = module(query, ref, level_maps(memory[:, :, None], SHAPES))

        off = module.sampling_offsets(query).reshape(b, lq, 2, 6, 2)
        points = torch.tensor([1, 2, 2, 3, 3, 3], dtype=torch.float32)  # P_l of each point
        # loc = ref_xy + off / P_l * ref_wh * 0.5
        ref_xy, ref_wh = ref[:, :, None, None, :2], ref[:, :, None, None, 2:]
        expected_loc = ref_xy + off / points[None, None, None, :, None] * ref_wh * 0.5
        expected_w = module.attention_weights(query).reshape(b, lq, 2, 6).softmax(-1)  # joint over levels*points
        torch.testing.assert_close(captured["locations"], expected_loc)
        torch.testing.assert_close(captured["weights"], expected_w)

        value = module.value_proj(memory).reshape(b, -1, 2, 4)
        ref_out = module.output_proj(naive_core(value, SHAPES, expected_loc, expected_w, POINTS))
    assert (out - ref_out).abs().max().item() < 1e-5


def test_rejects_bad_head_count():
    with pytest.raises(ValueError):
        MSDeformableAttention(embed_dim=10, num_heads=4)


def nearest_cell(img: torch.Tensor, x: float, y: float, official: bool = False) -> torch.Tensor:
    """img [C, H, W] at the cell of (x, y) in [0, 1], by the official v2 formula written out per point:
    int(loc * size + 0.5) truncated toward zero, then clamped to the map. `official` clamps x to H - 1 as the
    official code does (it clamps both coordinates to [0, H - 1])."""
    _, h, w = img.shape
    col, row = int(x * w + 0.5), int(y * h + 0.5)  # int() truncates toward zero, like the int64 cast
    col = min(max(col, 0), (h if official else w) - 1)
    row = min(max(row, 0), h - 1)
    return img[:, row, col]


def naive_discrete_core(value, spatial_shapes, locations, weights, num_points, official=False):
    nearest = functools.partial(nearest_cell, official=official)
    return naive_core(value, spatial_shapes, locations, weights, num_points, sample=nearest)


def random_case(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    b, heads, d, lq = 2, 2, 3, 4
    value = torch.randn(b, sum(h * w for h, w in shapes), heads, d, generator=g, dtype=torch.float64)
    # partly outside [0, 1] (small negatives truncate to cell 0, large values clamp to the last cell)
    locations = torch.rand(b, lq, heads, sum(POINTS), 2, generator=g, dtype=torch.float64) * 1.6 - 0.3
    weights = torch.rand(b, lq, heads, sum(POINTS), generator=g, dtype=torch.float64)
    return value, locations, weights


def test_discrete_core_matches_naive_loop_on_non_square_maps():
    value, locations, weights = random_case(SHAPES, seed=3)
    got = deformable_attention_core(level_maps(value, SHAPES), locations, weights, POINTS, method="discrete")
    ref = naive_discrete_core(value, SHAPES, locations, weights, POINTS)
    assert (got - ref).abs().max().item() < 1e-12
    # and it is not the bilinear result
    assert (got - deformable_attention_core(level_maps(value, SHAPES), locations, weights, POINTS)).abs().max() > 1e-2


def test_discrete_equals_the_official_index_on_square_maps():
    square = [(4, 4), (2, 2), (1, 1)]
    value, locations, weights = random_case(square, seed=4)
    got = deformable_attention_core(level_maps(value, square), locations, weights, POINTS, method="discrete")
    official = naive_discrete_core(value, square, locations, weights, POINTS, official=True)
    assert (got - official).abs().max().item() < 1e-12


def test_discrete_freezes_sampling_offsets_and_rejects_unknown_methods():
    module = MSDeformableAttention(embed_dim=16, num_heads=2, num_points=(1, 2, 3), method="discrete")
    assert not any(p.requires_grad for p in module.sampling_offsets.parameters())
    assert all(p.requires_grad for p in module.attention_weights.parameters())
    with pytest.raises(ValueError, match="discrete"):
        MSDeformableAttention(embed_dim=16, num_heads=2, method="nearest")


def test_offset_scale_scales_the_offsets():
    torch.manual_seed(2)
    half = MSDeformableAttention(embed_dim=8, num_heads=2, num_points=(2, 2, 2))
    double = MSDeformableAttention(embed_dim=8, num_heads=2, num_points=(2, 2, 2), offset_scale=1.0)
    double.load_state_dict(half.state_dict())
    with torch.no_grad():
        for p in half.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        double.load_state_dict(half.state_dict())
        query, memory = torch.randn(1, 3, 8), torch.randn(1, sum(h * w for h, w in SHAPES), 8)
        ref = torch.tensor([[[0.5, 0.5, 0.2, 0.2]] * 3])
        wide = ref.clone()
        wide[..., 2:] *= 2  # offset_scale 1.0 on a box equals 0.5 on a box twice as large
        maps = level_maps(memory[:, :, None], SHAPES)
        torch.testing.assert_close(double(query, ref, maps), half(query, wide, maps))
