"""The embedder against the official implementation's outputs, and checkpoint handling."""

import json
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from refrain.model import CheckpointError, ModelConfig, load_model
from refrain.model.checkpoint import convert, load_checkpoint, save_refrain
from refrain.model.config import BackboneConfig, CQTConfig, FrontendConfig, ShinglingConfig
from refrain.model.network import CLEWSNet
from refrain.model.shingle import cut_shingles, num_shingles, padded_length

DATA = Path(__file__).parent / "data"
FIXTURE_A = DATA / "clews-official-A"
CKPT_A = FIXTURE_A / "checkpoint_best.ckpt"
TOLERANCE = 1e-5  # official outputs carry ~3e-7 of seeded noise; real mistakes are >1e-3


@pytest.fixture(scope="module")
def model_a():
    return load_model(CKPT_A)


def reference_cases():
    meta = json.loads((FIXTURE_A / "fixture.json").read_text())
    cases = []
    for ref in meta["reference_embeddings"]:
        hop = float(ref["call"].split("shingle_hop=")[1].split(",")[0])
        decoder = "soundfile" if "soundfile-decode" in ref["file"] else "auto"
        cases.append(pytest.param(ref, hop, decoder, id=ref["file"]))
    return cases


@pytest.mark.parametrize("ref,hop,decoder", reference_cases())
def test_reproduces_official_embeddings(model_a, ref, hop, decoder):
    audio = (FIXTURE_A / ref["audio"]).resolve()
    expected = np.load(FIXTURE_A / ref["file"])
    if decoder == "soundfile":
        import soundfile as sf

        from refrain.model.audio import resample

        x, sr = sf.read(audio, dtype="float32", always_2d=True)
        wave = resample(x.mean(1), sr, 16000)
        z = model_a.embed(wave, hop=hop)
    else:
        z = model_a.embed(audio, hop=hop)
    assert z.dtype == np.float32
    assert z.shape == tuple(ref["shape"])
    assert np.abs(z - expected).max() <= TOLERANCE


def test_embed_accepts_bytes_file_objects_arrays_and_tensors(model_a):
    path = DATA / "audio" / "song75s_first12s.flac"
    from_path = model_a.embed(path)
    with open(path, "rb") as f:
        from_file = model_a.embed(f)
    from_bytes = model_a.embed(path.read_bytes())
    wave = np.load(DATA / "audio" / "wave16k_mono_first12s.npy")[0]
    from_array = model_a.embed(wave)
    from_tensor = model_a.embed(torch.from_numpy(wave))
    for z in (from_file, from_bytes, from_array, from_tensor):
        np.testing.assert_allclose(z, from_path, atol=1e-6)


def test_fast_cqt_matches_per_shingle_nnaudio(model_a):
    """The whole-track CQT with recomputed edges equals the reference's per-shingle CQT."""
    rng = np.random.default_rng(0)
    net = model_a.net
    for seconds, hop_s in [(75.0, 5.0), (47.3, 2.5), (21.0, 10.0), (33.3, 0.4), (9.0, 5.0)]:
        x = torch.from_numpy(rng.standard_normal(int(seconds * 16000)).astype(np.float32) * 0.1)
        length, hop = 320000, int(16000 * hop_s)
        with torch.inference_mode():
            literal = net.spectrogram(cut_shingles(x, length, hop, length))
            fast = model_a.spectrogram(x, hop_s)
        assert fast.shape == literal.shape
        assert (fast - literal).abs().max().item() <= 1e-4 * literal.abs().max().item()


@pytest.mark.parametrize("n", [1, 5000, 319999, 320000, 320001, 400000, 1200000, 1200001])
@pytest.mark.parametrize("hop", [80000, 40000, 320000])
def test_shingle_framing_matches_definition(n, hop):
    length = 320000
    x = torch.arange(n, dtype=torch.float32)
    frames = cut_shingles(x, length, hop, length)
    expected_len = max(math.ceil((n - length) / hop), 0) * hop + length
    assert padded_length(n, length, hop) == expected_len
    assert frames.shape == (num_shingles(n, length, hop), length)
    assert frames.shape[0] == (expected_len - length) // hop + 1
    # Repeat padding: sample i of the padded signal is x[i % n].
    padded = torch.arange(expected_len) % n
    for s in (0, frames.shape[0] - 1):
        assert torch.equal(frames[s], padded[s * hop : s * hop + length].float())


def test_rejects_bad_hop(model_a):
    wave = np.zeros(16000, dtype=np.float32) + 0.1
    for hop in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            model_a.embed(wave, hop=hop)


def test_identity(model_a):
    ident = model_a.identity
    assert ident.zdim == 128 and ident.shingle_len_s == 20.0 and ident.sample_rate == 16000
    assert len(ident.weights_sha256) == 64


def test_convert_roundtrip(model_a, tmp_path):
    out = convert(CKPT_A, tmp_path / "converted")
    converted = load_model(out)
    assert converted.identity == model_a.identity
    wave = np.load(DATA / "audio" / "wave16k_mono_first12s.npy")[0]
    np.testing.assert_array_equal(converted.embed(wave), model_a.embed(wave))
    # The CQT kernels follow from the config and are not stored.
    assert (out / "model.safetensors").stat().st_size < CKPT_A.stat().st_size / 2


def test_refrain_format_detects_corruption(model_a, tmp_path):
    out = save_refrain(model_a.net, tmp_path / "m")
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-100] ^= 0xFF
    (out / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(out)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/refrain-pwned-marker",))


def test_refuses_checkpoint_that_runs_code(tmp_path):
    marker = Path("/tmp/refrain-pwned-marker")
    marker.unlink(missing_ok=True)
    state = load_checkpoint(CKPT_A)[0].state_dict()
    bad = tmp_path / "checkpoint_best.ckpt"
    torch.save({"model": state, "conf": _Exploit(), "epoch": 1}, bad)
    (tmp_path / "configuration.yaml").write_text((FIXTURE_A / "configuration.yaml").read_text())
    with pytest.raises(CheckpointError, match="refusing"):
        load_model(bad)
    assert not marker.exists()
    # A raw pickle (not a torch zip) is refused the same way.
    raw = tmp_path / "raw.ckpt"
    raw.write_bytes(pickle.dumps({"model": _Exploit()}))
    with pytest.raises(CheckpointError):
        load_model(raw)
    assert not marker.exists()


def test_official_yaml_numbers_as_strings():
    conf = yaml.safe_load((FIXTURE_A / "configuration.yaml").read_text())
    assert isinstance(conf["model"]["loss"]["epsilon"], str)  # the YAML pitfall itself
    cfg = ModelConfig.from_official(conf)
    assert cfg.loss.epsilon == 1e-6 and cfg.zdim == 128 and cfg.frontend.channels == (16, 32)


def test_other_official_sizes_load_and_match_literal_computation(tmp_path):
    """An official-format checkpoint of other sizes (written here) loads and embeds exactly."""
    cfg = ModelConfig(
        shingling=ShinglingConfig(len=10.0, hop=10.0),
        cqt=CQTConfig(pool=4),
        frontend=FrontendConfig(channels=(8, 24)),
        backbone=BackboneConfig(blocks=(2, 1, 1), channels=(24, 48, 96), down=(1, 2, 2)),
        zdim=64,
    )
    torch.manual_seed(1)
    net = CLEWSNet(cfg)
    with torch.no_grad():  # make every parameter matter
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    conf = yaml.safe_load((FIXTURE_A / "configuration.yaml").read_text())
    conf["model"].update(
        shingling={"len": 10, "hop": 10},
        cqt={**conf["model"]["cqt"], "pool": 4},
        frontend={"cqtpow": 0.5, "channels": [8, 24]},
        backbone={"blocks": [2, 1, 1], "channels": [24, 48, 96], "down": [1, 2, 2]},
        zdim=64,
    )
    (tmp_path / "configuration.yaml").write_text(yaml.safe_dump(conf))
    torch.save(
        {
            "model": net.state_dict(),
            "optim": {},
            "sched": {},
            "conf": None,
            "epoch": 2,
            "lr": 1e-4,
            "cost_best": 0.5,
        },
        tmp_path / "checkpoint_best.ckpt",
    )
    model = load_model(tmp_path / "checkpoint_best.ckpt")
    wave = np.load(DATA / "audio" / "wave16k_mono_first12s.npy")[0]
    for hop in (2.5, 5.0):
        z = model.embed(wave, hop=hop)
        shingles = cut_shingles(torch.from_numpy(wave), 160000, int(16000 * hop), 160000)
        with torch.inference_mode():
            literal = net.eval()(net.spectrogram(shingles)).numpy()
        assert z.shape == (shingles.shape[0], 64)
        assert np.abs(z - literal).max() <= 1e-5


def test_mismatched_checkpoint_is_explained(tmp_path):
    state = load_checkpoint(CKPT_A)[0].state_dict()
    conf = yaml.safe_load((FIXTURE_A / "configuration.yaml").read_text())
    conf["model"]["zdim"] = 256
    (tmp_path / "configuration.yaml").write_text(yaml.safe_dump(conf))
    torch.save({"model": state, "conf": None}, tmp_path / "c.ckpt")
    with pytest.raises(CheckpointError, match="wrong shapes"):
        load_model(tmp_path / "c.ckpt")


@pytest.mark.requires_cuda
@pytest.mark.parametrize(
    "model, dtype, tol",
    [
        # float32 is float32 on CUDA too (cuDNN's TF32 off): 1.9e-7 and 4.5e-6 on an H200,
        # against 4.6e-5 and 3.3e-3 with TF32 (docs/benchmarks.md, "On a GPU")
        (CKPT_A, "float32", 1e-5),
        (None, "float32", 1e-4),
        (CKPT_A, "bfloat16", 5e-2),
        (CKPT_A, "float16", 5e-2),
    ],
    ids=["A-float32", "default-float32", "A-bfloat16", "A-float16"],
)
def test_cuda_embeddings_match_cpu(model, dtype, tol):
    """The CUDA path, in full and half precision, stays close to the CPU reference."""
    cpu = load_model(model)
    gpu = load_model(model, device="cuda").set_precision(dtype)
    audio = DATA / "audio" / "song75s.flac"
    ref = cpu.embed(audio)
    z = gpu.embed(audio)
    diff = float(np.abs(z - ref).max())
    print(f"{dtype}: max |diff| vs CPU float32 = {diff:.2e}")
    assert diff <= tol


def test_half_precision_is_refused_on_cpu(model_a):
    with pytest.raises(ValueError, match="CUDA"):
        load_model(CKPT_A).set_precision("bfloat16")
