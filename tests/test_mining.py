"""Hard-negative mining: work distances, nearest works and mined batches."""

import random

import numpy as np
import pytest
import torch

from refrain.training.mining import mined_works, nearest_works, work_distances


def test_work_distances_are_the_min_over_segment_pairs():
    rng = np.random.default_rng(0)
    segments = [rng.normal(size=(n, 8)).astype(np.float32) for n in (1, 3, 2, 5, 1, 4)]
    d = work_distances(segments, chunk=3).numpy()  # chunks straddle works
    for i, a in enumerate(segments):
        for j, b in enumerate(segments):
            want = np.inf if i == j else np.linalg.norm(a[:, None] - b[None], axis=-1).min()
            assert d[i, j] == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="at least 2 works"):
        work_distances(segments[:1])


def test_nearest_works_rank_by_distance_and_never_include_the_work_itself():
    d = torch.tensor([[0, 3, 1, 2], [3, 0, 5, 4], [1, 5, 0, 9], [2, 4, 9, 0]], dtype=torch.float)
    d.fill_diagonal_(torch.inf)
    assert nearest_works(d, 2).tolist() == [[2, 3], [0, 3], [0, 1], [0, 1]]
    assert nearest_works(d, 10).shape == (4, 3)  # at most every other work


def test_mined_works_take_the_anchor_and_works_of_its_pool():
    works = [f"w{i}" for i in range(20)]
    # four clusters of five works: each work's nearest are its own cluster's
    cluster = np.arange(20) // 5
    d = torch.from_numpy(np.where(cluster[:, None] == cluster[None], 1.0, 10.0)).float()
    d += torch.rand(20, 20) * 0.1
    d.fill_diagonal_(torch.inf)
    neighbours = nearest_works(d, 4)
    rng = random.Random(0)
    for _ in range(50):
        batch = mined_works(rng, works, neighbours, 5, pool=4)
        assert len(set(batch)) == 5
        assert len({cluster[int(w[1:])] for w in batch}) == 1
    # a pool smaller than the batch is topped up with other works, still distinct
    batch = mined_works(rng, works, neighbours, 8, pool=4)
    assert len(set(batch)) == 8


def test_mined_batches_follow_the_network_and_random_ones_do_not():
    from refrain.training.batches import BatchSampler, Track
    from refrain.training.train import RunConfig

    tracks = []
    for w in range(12):  # three styles: a work's CQT is its style's band plus noise
        band = (w % 3) * 28
        for v in range(2):
            x = np.random.default_rng(w * 10 + v).random((84, 400)).astype(np.float32) * 0.1
            x[band : band + 28] += 1.0
            tracks.append(Track(f"w{w}", f"w{w}-{v}.flac", "train", x.astype(np.float16)))

    class BandNet(torch.nn.Module):  # embeds a segment by its mean energy per band of 28 bins
        def forward(self, x):
            return x.reshape(len(x), 3, 28, -1).mean(dim=(2, 3))

    def styles_per_batch(mine_p):
        raw = {
            "data": {"crop_s": 20, "versions_per_work": 2, "mine_p": mine_p, "mine_pool": 3},
            "training": {"works_per_batch": 4},
            "augment": {"pitch_p": 0, "stretch_p": 0, "specaug_p": 0, "gain_db": 0, "eq_p": 0},
        }
        sampler = BatchSampler(tracks, RunConfig.from_dict(raw), seed=0)
        stats = sampler.mine(BandNet(), device=torch.device("cpu"))  # a 10 s hop
        assert stats["mine_s"] >= 0 and sampler.neighbours.shape == (12, 3)
        out = []
        for _ in range(30):
            _, _, ids = sampler.batch()
            out.append(len({int(tracks[i].clique[1:]) % 3 for i in ids.tolist()}))
        return out

    assert all(n == 1 for n in styles_per_batch(1.0))  # anchor + its 3 nearest: one style
    assert sum(n > 1 for n in styles_per_batch(0.0)) > 20
