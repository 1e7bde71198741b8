"""`refrain embed`, `convert` and `interpolate`, batching across files, the default model."""

import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from refrain.model import load_model
from refrain.service.cli import main

DATA = Path(__file__).parent / "data"
CKPT_A = DATA / "clews-official-A" / "checkpoint_best.ckpt"


@pytest.fixture(scope="module")
def model_a():
    return load_model(CKPT_A)


@pytest.fixture
def audio_dir(tmp_path):
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    src = DATA / "audio"
    (d / "a.flac").write_bytes((src / "song75s_first12s.flac").read_bytes())
    (d / "sub" / "b.flac").write_bytes((src / "song75s_first33p3s.flac").read_bytes())
    (d / "broken.mp3").write_bytes(b"ID3" + bytes(300))
    (d / "notes.txt").write_text("not audio")
    return d


def test_embed_many_equals_embed_per_file(model_a):
    rng = np.random.default_rng(3)
    waves = [rng.standard_normal(int(s * 16000)).astype(np.float32) * 0.1 for s in (3, 25, 61, 40)]
    single = [model_a.embed(w, hop=5.0) for w in waves]
    batched = model_a.embed_many(waves, hop=5.0, batch_size=7)
    for a, b in zip(single, batched, strict=False):
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= 1e-5


def test_embed_many_skips_undecodable(model_a):
    good = DATA / "audio" / "song75s_first12s.flac"
    out = model_a.embed_many([good, b"not audio", good], errors="skip")
    assert out[1] is None and out[0].shape == out[2].shape == (1, 128)
    from refrain.model.audio import AudioDecodeError

    with pytest.raises(AudioDecodeError):
        model_a.embed_many([good, b"not audio"])


def test_cli_embed_writes_one_npy_per_file(audio_dir, tmp_path, model_a, capsys):
    out = tmp_path / "out"
    rc = main(["embed", str(audio_dir), "--out", str(out), "--checkpoint", str(CKPT_A)])
    assert rc == 1  # one file failed to decode and is reported
    assert "broken.mp3" in capsys.readouterr().err
    a = np.load(out / "a.npy")
    b = np.load(out / "sub" / "b.npy")
    assert a.shape == (1, 128) and b.shape == (4, 128)
    np.testing.assert_allclose(b, model_a.embed(audio_dir / "sub" / "b.flac"), atol=1e-5)
    assert not (out / "notes.npy").exists()


def test_cli_convert_then_embed(tmp_path, model_a):
    assert main(["convert", str(CKPT_A), str(tmp_path / "m")]) == 0
    wav = tmp_path / "x.wav"
    rng = np.random.default_rng(0)
    sf.write(wav, rng.standard_normal(16000 * 7).astype(np.float32) * 0.2, 16000)
    assert (
        main(["embed", str(wav), "--out", str(tmp_path / "o"), "--checkpoint", str(tmp_path / "m")])
        == 0
    )
    np.testing.assert_array_equal(np.load(tmp_path / "o" / "x.npy"), model_a.embed(wav))


def test_cli_interpolate_mixes_the_weights_of_two_models(tmp_path, model_a):
    import torch

    from refrain.model.checkpoint import load_checkpoint, save_refrain
    from refrain.model.network import CLEWSNet

    net_a, _ = load_checkpoint(CKPT_A)
    net_b, _ = load_checkpoint(CKPT_A)
    with torch.no_grad():
        for param in net_b.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    save_refrain(net_b, tmp_path / "b")
    assert main(["interpolate", str(CKPT_A), str(tmp_path / "b"), str(tmp_path / "m")]) == 0
    mixed, info = load_checkpoint(tmp_path / "m")
    assert info["interpolated"]["weight"] == 0.5 and "calibration" not in info
    state_a, state_b = net_a.state_dict(), net_b.state_dict()
    for key, value in mixed.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, (state_a[key] + state_b[key]) / 2)
    same = tmp_path / "same"
    assert main(["interpolate", str(CKPT_A), str(tmp_path / "b"), str(same), "--weight", "0"]) == 0
    audio = np.sin(np.arange(16000 * 8) * 0.05).astype(np.float32)
    np.testing.assert_allclose(load_model(same).embed(audio), model_a.embed(audio), atol=1e-5)

    save_refrain(net_b, tmp_path / "placeholder", extra={"trained": False})
    args = ["interpolate", str(tmp_path / "b"), str(tmp_path / "placeholder"), str(tmp_path / "p")]
    assert main(args) == 0 and load_checkpoint(tmp_path / "p")[1]["trained"] is False

    other = CLEWSNet(load_model().config)  # another configuration: refused
    save_refrain(other, tmp_path / "other")
    assert main(["interpolate", str(CKPT_A), str(tmp_path / "other"), str(tmp_path / "x")]) == 2
    args = ["interpolate", str(CKPT_A), str(tmp_path / "b"), str(tmp_path / "y"), "--weight", "2"]
    assert main(args) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cli_reports_user_errors(tmp_path, capsys):
    assert main(["embed", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x80\x04garbage")
    assert main(["convert", str(bad), str(tmp_path / "o")]) == 2


def test_default_model_is_trained_and_calibrated(caplog):
    with caplog.at_level(logging.WARNING, logger="refrain"):
        model = load_model()
    assert "untrained" not in caplog.text
    assert model.info["trained"] is True and model.info["calibration"]["method"] == "logistic"
    assert model.zdim == 256 and model.identity.shingle_len_s == 20.0
    z = model.embed(np.sin(np.arange(16000 * 8) * 0.05).astype(np.float32))
    assert z.shape == (1, 256) and np.isfinite(z).all()


def test_untrained_model_warns(tmp_path, caplog):
    from refrain.model.checkpoint import save_refrain
    from refrain.model.network import CLEWSNet

    save_refrain(CLEWSNet(load_model().config), tmp_path / "m", extra={"trained": False})
    with caplog.at_level(logging.WARNING, logger="refrain"):
        load_model(tmp_path / "m")
    assert "untrained" in caplog.text


def test_every_command_answers_help(capsys):
    for argv in (
        ["-h"],
        ["corpus", "-h"],
        ["corpus", "render", "-h"],
        ["index", "build", "-h"],
        ["ingest", "-h"],
        ["train", "-h"],
        ["evaluate", "-h"],
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0, argv
        assert "usage: refrain" in capsys.readouterr().out, argv


def test_a_missing_extra_is_one_line_naming_it(monkeypatch, capsys, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "music21", None)  # as if `refrain[train]` were not installed
    for name in [m for m in sys.modules if m.startswith("music21.")]:
        monkeypatch.setitem(sys.modules, name, None)
    code = main(["corpus", "works", "--catalog", str(tmp_path / "facts.jsonl")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "music21" in err and "pip install 'refrain[train]'" in err
