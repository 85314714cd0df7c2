"""Loading every checkpoint kind, overrides, and clear errors on bad files."""

import json
from pathlib import Path

import pytest
import torch
from helpers import randomize_batch_norms

from rtdetr import RTDETR
from rtdetr.data.coco_categories import COCO_CATEGORY_IDS, COCO_CLASS_NAMES
from rtdetr.weights.checkpoint import atomic_save

REFERENCE = Path(__file__).resolve().parent / "data"  # key lists of the official checkpoints


@pytest.fixture(scope="module")
def tiny() -> RTDETR:
    torch.manual_seed(0)
    model = RTDETR.from_preset("rtdetr_tiny", class_names=["a", "b", "c"], category_ids=[3, 5, 9]).eval()
    randomize_batch_norms(model)
    for head in model.decoder.dec_bbox_head:  # zero-initialised: perturb so boxes depend on the weights
        torch.nn.init.normal_(head.layers[-1].weight, std=0.05)
    return model


def outputs_equal(a: RTDETR, b: RTDETR, shape=(1, 3, 128, 160)) -> None:
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        oa, ob = a.eval()(x), b.eval()(x)
    torch.testing.assert_close(oa["pred_logits"], ob["pred_logits"], rtol=0, atol=1e-5)
    torch.testing.assert_close(oa["pred_boxes"], ob["pred_boxes"], rtol=0, atol=1e-5)


def test_our_checkpoint_round_trip_keeps_config_and_class_names(tiny, tmp_path):
    path = tmp_path / "tiny.pt"
    tiny.save(path)
    loaded = RTDETR.from_checkpoint(path)
    assert loaded.config == tiny.config
    assert loaded.class_names == ["a", "b", "c"] and loaded.category_ids == [3, 5, 9]
    outputs_equal(tiny, loaded)


def test_our_checkpoint_prefers_ema_weights(tiny, tmp_path):
    ema = {k: v.clone() for k, v in tiny.state_dict().items()}
    ema["decoder.dec_score_head.1.bias"] += 1.0
    tiny.save(tmp_path / "t.pt", ema=ema)
    loaded = RTDETR.from_checkpoint(tmp_path / "t.pt")
    torch.testing.assert_close(loaded.decoder.dec_score_head[1].bias, ema["decoder.dec_score_head.1.bias"])


@pytest.mark.parametrize("nesting", ["ema", "model", "bare"])
def test_official_nestings_load_with_coco_names(nesting, tmp_path):
    torch.manual_seed(0)
    source = RTDETR.from_preset("rtdetr_r18vd").eval()
    randomize_batch_norms(source)
    sd = source.state_dict()
    checkpoint = {"ema": {"module": sd, "updates": 10}, "model": {}} if nesting == "ema" else (
        {"model": sd, "last_epoch": 3} if nesting == "model" else sd
    )
    torch.save(checkpoint, tmp_path / "official.pth")
    loaded = RTDETR.from_checkpoint(tmp_path / "official.pth")
    assert loaded.config == source.config
    assert loaded.class_names == list(COCO_CLASS_NAMES) and loaded.category_ids == list(COCO_CATEGORY_IDS)
    outputs_equal(source, loaded, shape=(1, 3, 320, 320))


def test_official_v2_names_load(tmp_path):
    keys = json.loads((REFERENCE / "official_keys_v2_r18vd.json").read_text())
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) if k.endswith(("weight", "bias")) else torch.ones(s) for k, s in keys}
    sd = {k: (torch.full_like(v, 0.25) if k.endswith("num_points_scale") else v) for k, v in sd.items()}
    torch.save({"ema": {"module": sd}}, tmp_path / "v2.pth")
    model = RTDETR.from_checkpoint(tmp_path / "v2.pth")
    assert model.config.depth == 18 and model.config.num_points == (4, 4, 4)
    torch.testing.assert_close(model.encoder.input_proj[1][0].weight, sd["encoder.input_proj.1.conv.weight"])
    torch.testing.assert_close(model.decoder.enc_output[1].bias, sd["decoder.enc_output.norm.bias"])


def test_num_decoder_layers_override_gives_that_layers_head(tmp_path):
    torch.manual_seed(0)
    full = RTDETR.from_preset("rtdetr_tiny", num_decoder_layers=3).eval()
    randomize_batch_norms(full)
    full.save(tmp_path / "full.pt")
    cut = RTDETR.from_checkpoint(tmp_path / "full.pt", num_decoder_layers=2)
    assert len(cut.decoder.decoder.layers) == 2 and cut.config.num_decoder_layers == 2
    full.decoder.eval_idx = 1  # the full model stopped after layer index 1 must agree
    outputs_equal(full, cut)
    with pytest.raises(ValueError, match="num_decoder_layers=5"):
        RTDETR.from_checkpoint(tmp_path / "full.pt", num_decoder_layers=5)


def test_num_denoising_override(tiny, tmp_path):
    tiny.save(tmp_path / "t.pt")
    assert RTDETR.from_checkpoint(tmp_path / "t.pt", num_denoising=7).decoder.num_denoising == 7


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "notes.pth"
    bad.write_text("this is not a checkpoint")
    with pytest.raises(ValueError, match=r"cannot read checkpoint .*notes\.pth"):
        RTDETR.from_checkpoint(bad)
    torch.save({"state": 1, "epoch": 3}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"other\.pth is not an RT-DETR checkpoint"):
        RTDETR.from_checkpoint(tmp_path / "other.pth")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        RTDETR.from_checkpoint(tmp_path / "missing.pth")


def test_truncated_checkpoint_is_a_clear_error(tiny, tmp_path):
    tiny.save(tmp_path / "t.pt")
    data = (tmp_path / "t.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.pt.*truncated"):
        RTDETR.from_checkpoint(tmp_path / "cut.pt")


def test_checkpoint_of_another_variant_names_the_tensors(tmp_path):
    r18 = RTDETR.from_preset("rtdetr_r18vd")
    r34_weights = RTDETR.from_preset("rtdetr_r34vd").state_dict()
    with pytest.raises(ValueError, match=r"another variant") as error:
        r18.load_weights(r34_weights, source="r34.pth")
    assert "unexpected" in str(error.value) and "backbone.res_layers.0.blocks.2" in str(error.value)
    r50 = RTDETR.from_preset("rtdetr_r50vd")
    with pytest.raises(ValueError, match=r"mis-shaped: encoder\.fpn_blocks\.0\.conv1\.conv\.weight: checkpoint \(128, 512, 1, 1\) vs model \(256, 512, 1, 1\)"):
        r50.load_weights(RTDETR.from_preset("rtdetr_r50vd_m").state_dict(), source="m.pth")


def test_weights_only_loading_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="evil.pth"):
        RTDETR.from_checkpoint(tmp_path / "evil.pth")


def test_atomic_save_keeps_previous_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"a": torch.ones(2)}, path)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"a": torch.zeros(2)}, path)
    monkeypatch.undo()
    torch.testing.assert_close(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind
