"""One command, flags with one meaning: every verb parses --img-size as N or HxW and defaults --device to auto."""

from __future__ import annotations

import pytest

from rtdetr.cli import build_parser, main
from rtdetr.cli.arguments import resolve_device

VERBS = {  # verb -> the arguments it needs besides the flags under test
    "train": ["--data", "d"],
    "eval": ["--weights", "w.pt"],
    "predict": ["image.jpg"],
    "export": [],
    "bench": [],
}


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_img_size_means_the_same_everywhere(verb):
    parser = build_parser()
    assert parser.parse_args([verb, *VERBS[verb], "--img-size", "480x640"]).img_size == (480, 640)
    assert parser.parse_args([verb, *VERBS[verb], "--img-size", "320"]).img_size == (320, 320)
    with pytest.raises(SystemExit):
        parser.parse_args([verb, *VERBS[verb], "--img-size", "300"])  # not a multiple of 32


@pytest.mark.parametrize("verb", ["train", "eval", "predict", "bench", "demo"])
def test_device_defaults_to_auto(verb):
    assert build_parser().parse_args([verb, *VERBS.get(verb, [])]).device == "auto"


def test_auto_device_is_the_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda:0")


def test_help_lists_every_verb(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for verb in (*VERBS, "demo"):
        assert f"    {verb} " in out


def test_a_user_mistake_is_one_line_not_a_traceback(tmp_path, capsys):
    assert main(["eval", "--weights", str(tmp_path / "missing.pt"), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.pt" in err and "Traceback" not in err
