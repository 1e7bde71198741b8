"""Losses, augmentations, calibration, the chroma baseline and a short training run."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from refrain.model.calibration import Calibration
from refrain.model.reduce import Reduction, reduce
from refrain.training.augment import AugmentConfig, augment
from refrain.training.augment import time_stretch as cqt_stretch
from refrain.training.calibrate import calibrate, fit_logistic
from refrain.training.losses import LOSSES, LossConfig, contrastive_loss

from helpers import SR, pitch_shift, synth_song, time_stretch


def literal_clews(z, labels, ids, pos, neg, gamma=5.0, epsilon=1e-6):
    """The CLEWS loss written out pair by pair."""
    b, _, d = z.shape
    pos_d, neg_d = [], []
    for i in range(b):
        for j in range(b):
            dist = ((z[i][:, None, :] - z[j][None, :, :]) ** 2).sum(-1) / d
            if labels[i] == labels[j] and ids[i] != ids[j]:
                pos_d.append(reduce(dist, pos))
            elif labels[i] != labels[j]:
                neg_d.append(reduce(dist, neg))
    align = torch.stack(pos_d).mean()
    uniform = torch.log(torch.stack([torch.exp(-gamma * x) for x in neg_d]).mean() + epsilon)
    return align + uniform


@pytest.mark.parametrize("pos", ["bpwr-5", "meanmin", "min"])
def test_clews_loss_matches_literal_definition(pos):
    torch.manual_seed(0)
    z = torch.randn(8, 3, 16) * 0.3
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    ids = torch.arange(8)
    loss, stats = contrastive_loss(z, labels, ids, LossConfig(pos=pos))
    # The log1p form equals the literal one plus the constant -log(epsilon).
    expected = literal_clews(z, labels, ids, pos, "min").item() - math.log(1e-6)
    assert loss.item() == pytest.approx(expected, abs=1e-4)
    assert stats["d_pos"] > 0 and stats["d_neg"] > 0


@pytest.mark.parametrize("name", LOSSES)
def test_losses_prefer_separated_embeddings(name):
    """Every loss is lower when versions cluster by work than when they are mixed up."""
    torch.manual_seed(1)
    centres = torch.randn(4, 1, 32)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    ids = torch.arange(8)
    good = centres[labels] + 0.05 * torch.randn(8, 3, 32)
    bad = centres[torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])] + 0.05 * torch.randn(8, 3, 32)
    cfg = LossConfig(name=name)
    l_good, _ = contrastive_loss(good, labels, ids, cfg)
    l_bad, _ = contrastive_loss(bad, labels, ids, cfg)
    assert l_good.item() < l_bad.item()
    # and gradients flow to the embeddings where the loss is not yet satisfied
    z = bad.clone().requires_grad_(True)
    contrastive_loss(z, labels, ids, cfg)[0].backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_unknown_loss_is_refused():
    with pytest.raises(ValueError, match="unknown loss"):
        LossConfig(name="hinge")


def test_augment_keeps_shape_and_stretch_resamples():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(84, 400)
    for _ in range(20):
        y = augment(x, AugmentConfig(pitch_p=1, specaug_p=1), gen)
        assert y.shape == x.shape and torch.isfinite(y).all()
    ramp = torch.arange(100.0).repeat(84, 1)
    slow = cqt_stretch(ramp, 2.0, 100)  # twice as long, cut to 100 frames
    assert slow[0, -1].item() == pytest.approx(49.75, abs=0.6)


def test_calibration_recovers_logistic_parameters():
    rng = np.random.default_rng(0)
    d = rng.uniform(0, 2, 20000)
    p = 1 / (1 + np.exp(-(3.0 - 6.0 * d)))
    y = rng.random(20000) < p
    a, b = fit_logistic(d, y)
    # class-balanced weights shift the intercept by log(n_neg / n_pos)
    assert b == pytest.approx(-6.0, rel=0.1)
    assert a - math.log((~y).sum() / y.sum()) == pytest.approx(3.0, abs=0.25)
    cal = calibrate(d, y, target_precision=0.9)
    assert cal.precision >= 0.9 and 0 < cal.recall <= 1
    assert cal.probability(0.0) > cal.probability(1.0)
    assert cal.fused is None and cal.fused_probability(0.5, 0.9, 1.0) == cal.probability(0.5)


def test_fused_calibration_recovers_its_slopes_and_separates_better():
    """Pairs whose label depends on the distance and, where they were aligned, on both
    alignment features: the fused model is fitted on the aligned pairs alone, finds the
    three slopes, and at its operating point beats the distance alone."""
    rng = np.random.default_rng(1)
    n = 60000
    d, v, z = rng.uniform(0, 2, n), rng.uniform(0, 1, n), rng.normal(0, 1, n)
    aligned = rng.random(n) < 0.6
    logit = np.where(aligned, 1.0 - 4.0 * d + 3.0 * v + 1.5 * z, 2.0 - 4.0 * d)
    y = rng.random(n) < 1 / (1 + np.exp(-logit))
    v[~aligned] = z[~aligned] = np.nan  # not shortlisted: no alignment
    cal = calibrate(d, y, alignments=v, relative=z)
    f = cal.fused
    assert f["aligned_pairs"] == aligned.sum()
    assert f["b"] == pytest.approx(-4.0, rel=0.15) and f["c"] == pytest.approx(3.0, rel=0.2)
    assert f["e"] == pytest.approx(1.5, rel=0.15)
    assert cal.fused_probability(0.5, 0.5, 1.0) > cal.fused_probability(0.5, 0.5, -1.0)
    assert cal.fused_probability(0.5, 0.9, 0.0) > cal.fused_probability(0.5, 0.1, 0.0)
    f1 = lambda p, r: 2 * p * r / (p + r)  # noqa: E731
    assert f1(f["precision"], f["recall"]) > f1(cal.precision, cal.recall) + 0.05
    assert Calibration.from_dict(cal.to_dict()) == cal
    # a fused model stored before the relative feature (no "e") still scores as it did
    old = Calibration.from_dict({**cal.to_dict(), "fused": {k: f[k] for k in "abc"}})
    want = 1 / (1 + np.exp(-(f["a"] + f["b"] * 0.5 + f["c"] * 0.9)))
    assert old.fused_probability(0.5, 0.9, 2.0) == pytest.approx(want)


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    """6 works x 3 versions (original, pitch-shifted, time-stretched), 30 s each."""
    root = tmp_path_factory.mktemp("tiny")
    rows = []
    for w in range(6):
        song = synth_song(30.0, 200 + w)
        versions = [song, pitch_shift(song, 3), time_stretch(song, 1.25)]
        for v, x in enumerate(versions):
            name = f"w{w}_v{v}.flac"
            sf.write(root / name, x, SR)
            rows.append([f"work{w}", name, "valid" if w >= 4 else "train"])
    with open(root / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows([["clique", "path", "split"], *rows])
    return root


def tiny_run(corpus, tmp_path, **data):
    """A run configuration of a tiny network on `tiny_corpus`: one epoch of 2 steps."""
    return {
        "model": {
            "frontend": {"channels": [8, 16]},
            "backbone": {"blocks": [1, 1], "channels": [16, 32], "down": [1, 2]},
            "zdim": 32,
        },
        "data": {
            "manifest": str(corpus / "manifest.csv"),
            "cache": str(tmp_path / "cache"),
            "crop_s": 20,
            "versions_per_work": 2,
            **data,
        },
        "training": {
            "out": str(tmp_path / "run"),
            "works_per_batch": 3,
            "steps_per_epoch": 2,
            "epochs": 1,
        },
    }


def test_training_with_mined_batches_mines_every_epoch_and_after_resuming(tiny_corpus, tmp_path):
    import json

    from refrain.training.train import RunConfig, train

    raw = tiny_run(tiny_corpus, tmp_path, mine_p=1.0, mine_pool=2, mine_every=2)
    raw["training"]["epochs"] = 3
    train(RunConfig.from_dict(raw))
    rows = json.loads((tmp_path / "run" / "history.json").read_text())
    assert ["mine_s" in r for r in rows] == [True, False, True]  # epochs 1 and 3 (every 2)
    assert all(r["mine_d_nearest"] > 0 for r in rows if "mine_s" in r)
    raw["training"]["epochs"] = 4  # a resumed run has no neighbours yet: it mines first
    train(RunConfig.from_dict(raw))
    rows = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4] and "mine_s" in rows[3]


def test_training_runs_resumes_and_produces_a_loadable_model(tiny_corpus, tmp_path):
    from refrain.model import load_model
    from refrain.training.train import RunConfig, train

    raw = tiny_run(tiny_corpus, tmp_path)
    best = train(RunConfig.from_dict(raw))
    history = (tmp_path / "run" / "history.json").read_text()
    assert '"valid_MAP"' in history and '"segments_per_s"' in history
    raw["training"]["epochs"] = 2  # resume for one more epoch
    train(RunConfig.from_dict(raw))
    import json

    assert [
        row["epoch"] for row in json.loads((tmp_path / "run" / "history.json").read_text())
    ] == [1, 2]
    model = load_model(best)
    assert model.info["trained"] is True and model.zdim == 32
    z = model.embed(tiny_corpus / "w0_v0.flac")
    assert z.shape == (3, 32) and np.isfinite(z).all()

    # A new run warm-started from that checkpoint begins from its weights, not at random.
    from refrain.model.network import CLEWSNet
    from refrain.training.train import init_weights

    net = CLEWSNet(model.config)
    init_weights(net, best)
    for k, v in model.net.state_dict().items():
        assert torch.equal(net.state_dict()[k].cpu(), v.cpu()), k
    other = json.loads(json.dumps(raw))
    other["model"]["zdim"] = 16
    with pytest.raises(ValueError, match="configuration differs"):
        init_weights(CLEWSNet(RunConfig.from_dict(other).model), best)

    # A deeper network grown from it computes exactly what it computes: the source's
    # blocks lead each stage, the extra ones start as identities.
    deeper = json.loads(json.dumps(raw))
    deeper["model"]["backbone"]["blocks"] = [2, 3]
    grown = CLEWSNet(RunConfig.from_dict(deeper).model)
    init_weights(grown, best)
    assert sum(p.numel() for p in grown.parameters()) > sum(
        p.numel() for p in model.net.parameters()
    )
    cqt = torch.rand(3, 84, 200)
    source = CLEWSNet(model.config)
    init_weights(source, best)
    source.eval()
    grown.eval()
    with torch.no_grad():
        assert torch.allclose(grown(cqt), source(cqt), atol=1e-6)
    assert any(float(b.gain) != 0 for b in source.backbone)  # the comparison is not vacuous
    from refrain.model.checkpoint import save_refrain

    save_refrain(grown, tmp_path / "grown")
    with pytest.raises(ValueError, match="configuration differs"):  # no shrinking
        init_weights(CLEWSNet(model.config), tmp_path / "grown")


def test_chroma_baseline_is_transposition_invariant():
    from refrain.training.baseline import ChromaBaseline

    base = ChromaBaseline()
    song = synth_song(25.0, 7)
    from refrain.model.audio import resample

    a = base.embed(resample(song.mean(1), SR, 16000))
    b = base.embed(resample(pitch_shift(song, 2).mean(1), SR, 16000))
    other = base.embed(resample(synth_song(25.0, 8).mean(1), SR, 16000))
    same = ((a - b) ** 2).mean()
    diff = ((a - other) ** 2).mean()
    assert same < diff
    assert Reduction.parse("min")


def test_rendered_corpus_trains_end_to_end(tmp_path):
    """The generator's corpus (a few works, rendered with FluidSynth) feeds the trainer."""
    import shutil

    pytest.importorskip("music21")
    if shutil.which("fluidsynth") is None:
        pytest.skip("fluidsynth is not installed (Debian package fluidsynth)")
    from refrain.training.corpus.pipeline import CorpusOptions, build_corpus
    from refrain.training.train import RunConfig, train

    summary = build_corpus(
        CorpusOptions(
            out=tmp_path / "corpus",
            works=4,
            versions=2,
            seed=3,
            max_seconds=25.0,
            splits=(1.0, 0.0, 0.0),
            jobs=1,
        ),
        progress=False,
    )
    assert summary.rows == 8 and not summary.failed
    raw = {
        "model": {
            "frontend": {"channels": [8, 16]},
            "backbone": {"blocks": [1], "channels": [16], "down": [1]},
            "zdim": 16,
        },
        "data": {
            "manifest": str(tmp_path / "corpus" / "manifest.csv"),
            "cache": str(tmp_path / "cache"),
            "crop_s": 20,
            "versions_per_work": 2,
        },
        "training": {
            "out": str(tmp_path / "run"),
            "works_per_batch": 2,
            "steps_per_epoch": 1,
            "epochs": 1,
        },
    }
    best = train(RunConfig.from_dict(raw))
    assert (best / "model.safetensors").exists()


def test_several_manifests_make_one_track_list(tmp_path):
    from refrain.training.batches import read_tracks
    from refrain.training.train import RunConfig

    for name, rows in (
        ("a", [["w1", "x.flac", "train"], ["w2", "y.flac", "valid"]]),
        ("b", [["w1", "z.flac", "train"]]),
    ):
        (tmp_path / name).mkdir()
        with open(tmp_path / name / "manifest.csv", "w", newline="") as f:
            csv.writer(f).writerows([["clique", "path", "split"], *rows])
    manifests = [str(tmp_path / "a" / "manifest.csv"), str(tmp_path / "b" / "manifest.csv")]
    config = RunConfig.from_dict({"data": {"manifest": manifests}})
    tracks = read_tracks(config.data.manifest)
    assert [(t.clique, t.path, t.split) for t in tracks] == [
        ("w1", tmp_path / "a" / "x.flac", "train"),
        ("w2", tmp_path / "a" / "y.flac", "valid"),
        ("w1", tmp_path / "b" / "z.flac", "train"),
    ]
    assert RunConfig.from_dict(config.to_dict()) == config


def test_eq_curve_is_smooth_bounded_and_constant_over_time():
    from refrain.training.augment import eq_curve

    gen = torch.Generator().manual_seed(3)
    for _ in range(50):
        g = eq_curve(84, 9.0, gen)
        db = 20 * torch.log10(g)
        assert g.shape == (84,) and db.abs().max() <= 9.0 + 1e-4
        assert (db[1:] - db[:-1]).abs().max() < 2.0  # no bin-to-bin jumps: an EQ, not noise
    x = torch.rand(84, 300) + 0.1
    y = augment(x, AugmentConfig(pitch_p=0, specaug_p=0, gain_db=0, eq_p=1, eq_db=9), gen)
    ratio = y / x
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-5)  # per bin, every frame
    assert (20 * torch.log10(ratio[:, 0])).abs().max() > 0.5  # and it did change something
    off = augment(x, AugmentConfig(pitch_p=0, specaug_p=0, gain_db=0, eq_p=1, eq_db=0), gen)
    assert torch.equal(off, x)


def test_grouped_batches_take_their_works_from_one_manifest():
    from refrain.training.batches import BatchSampler, Track
    from refrain.training.train import RunConfig

    tracks = []
    for g, prefix, n in ((0, "a", 10), (1, "b", 6), (2, "c", 2)):  # group c cannot fill a batch
        for w in range(n):
            for v in range(2):
                tracks.append(
                    Track(
                        f"{prefix}{w}",
                        f"{prefix}{w}-{v}.flac",
                        "train",
                        np.zeros((84, 200), np.float16),
                        group=g,
                    )
                )
    tracks.append(Track("a0", "a0-late.flac", "train", np.zeros((84, 200), np.float16), group=2))

    def groups_of_batches(group_p):
        raw = {
            "data": {"crop_s": 20, "versions_per_work": 2, "group_p": group_p},
            "training": {"works_per_batch": 4},
        }
        sampler = BatchSampler(tracks, RunConfig.from_dict(raw), seed=0)
        out = []
        for _ in range(60):
            _, _, ids = sampler.batch()
            out.append({tracks[i].clique[0] for i in ids.tolist()})
        return out

    grouped = groups_of_batches(1.0)
    assert all(len(g) == 1 for g in grouped)  # one manifest per batch
    assert {next(iter(g)) for g in grouped} == {"a", "b"}  # a0 stays in group a; c never alone
    mixed = groups_of_batches(0.0)
    assert sum(len(g) > 1 for g in mixed) > 40


def test_shipped_configs_parse_and_chain_their_stages():
    from pathlib import Path

    from refrain.training.train import RunConfig

    folder = Path(__file__).resolve().parents[1] / "configs"
    configs = {p.stem: RunConfig.load(p) for p in sorted(folder.glob("*.yaml"))}
    assert "default" in configs
    outs = {c.training.out: name for name, c in configs.items()}
    assert len(outs) == len(configs)  # no two runs write to one folder

    # each stage of the default model starts from the best weights of another configured run
    def layout(name: str) -> tuple[dict, list[int]]:
        model = configs[name].model.to_dict()
        return {**model, "backbone": {**model["backbone"], "blocks": None}}, list(
            model["backbone"]["blocks"]
        )

    name, chain = "default", []
    while configs[name].training.init:
        init = configs[name].training.init
        assert init.endswith("/best") and init.removesuffix("/best") in outs, init
        later = name
        name = outs[init.removesuffix("/best")]
        assert name not in chain
        chain.append(name)
        # weights must fit: the same network, or one grown deeper (`init_weights`)
        (model, blocks), (later_model, later_blocks) = layout(name), layout(later)
        assert model == later_model
        assert all(a <= b for a, b in zip(blocks, later_blocks, strict=True))
    assert chain == [
        "default-stage7",
        "default-stage6",
        "default-stage5",
        "default-stage4",
        "default-stage3",
        "default-stage2",
        "default-stage1",
    ]


def test_refrain_calibrate_fits_the_fused_model_beside_the_distance_one(tiny_corpus, tmp_path):
    """`refrain calibrate` on a copy of the shipped model: both models stored, the fused one
    from the chroma the service stores and aligns; the service then loads it."""
    import shutil
    from pathlib import Path

    from refrain.model import load_model
    from refrain.training.calibrate import calibrate_model

    folder = tmp_path / "model"
    shutil.copytree(
        Path(__file__).resolve().parent.parent / "model" / "weights" / "default", folder
    )
    cal = calibrate_model(folder, tiny_corpus / "manifest.csv", split="valid")
    # 6 valid tracks x 4 clip lengths, each clip against the 5 others: 2 versions, 3 not
    assert cal.n_positive == 6 * 4 * 2 and cal.n_negative == 6 * 4 * 3
    f = cal.fused
    assert f is not None and all(np.isfinite([f["a"], f["b"], f["c"]]))
    assert f["c"] > 0  # more of the clip aligned: likelier a version
    stored = load_model(folder).info["calibration"]
    assert Calibration.from_dict(stored) == cal


def test_prefetched_batches_are_the_same_batches_in_the_same_order():
    import threading

    from refrain.training.batches import prefetched

    calls = []

    def make():
        calls.append(threading.current_thread().name)
        return len(calls)

    assert list(prefetched(make, 5, depth=2)) == [1, 2, 3, 4, 5]
    assert set(calls) == {"refrain-batches"}  # made in the background thread
    calls.clear()
    assert list(prefetched(make, 3, depth=0)) == [1, 2, 3]
    assert set(calls) == {threading.current_thread().name}

    def failing():
        if len(calls) >= 2:
            raise RuntimeError("decode failed")
        calls.append(1)
        return len(calls)

    calls.clear()
    got = []
    with pytest.raises(RuntimeError, match="decode failed"):
        got.extend(prefetched(failing, 5, depth=2))
    assert got == [1, 2]

    calls.clear()
    items = prefetched(make, 1000, depth=2)
    assert next(items) == 1
    items.close()  # a consumer that stops early stops the producer, which made only a few
    assert not any(t.name == "refrain-batches" for t in threading.enumerate())
    assert len(calls) <= 4


def test_training_with_prefetched_batches_trains_exactly_as_without(tiny_corpus, tmp_path):
    import json

    from refrain.training.train import RunConfig, train

    histories = []
    for depth in (0, 2):
        raw = tiny_run(tiny_corpus, tmp_path / f"p{depth}")
        raw["training"] |= {"prefetch": depth, "epochs": 2, "steps_per_epoch": 3}
        train(RunConfig.from_dict(raw))
        rows = json.loads((tmp_path / f"p{depth}" / "run" / "history.json").read_text())
        histories.append([(r["loss"], r["d_pos"], r["valid_MAP"]) for r in rows])
    assert len(histories[0]) == 2 and histories[0] == histories[1]
