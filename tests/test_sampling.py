"""Frame and crop samplers: hand-computed index lists, short videos, ranges, seeded reproducibility, coverage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lgd_fast.data.sampling import SHORT_VIDEO_RULE, clip_indices, clip_span, crop_offsets, segment_indices


def _rngs(seed: int):
    return [np.random.default_rng(seed), torch.Generator().manual_seed(seed)]


# ---- clips (LGD-3D) ----


def test_clip_span():
    assert clip_span(16) == 16
    assert clip_span(16, 2) == 31
    assert clip_span(1, 5) == 1
    with pytest.raises(ValueError, match="clip_len"):
        clip_span(0)
    with pytest.raises(ValueError, match="step"):
        clip_span(16, 0)


def test_clip_test_starts_100_frames():
    clips = clip_indices(100, training=False)
    assert [c[0] for c in clips] == list(range(0, 85, 6))  # 84 / 14 = 6: 0, 6, ..., 84
    assert clips[0] == list(range(16))
    assert clips[-1] == list(range(84, 100))  # the last clip ends on the last frame


def test_clip_test_starts_rounding():
    # 50 frames: max start 34, starts round(i * 34 / 14) with halves up
    expected = [0, 2, 5, 7, 10, 12, 15, 17, 19, 22, 24, 27, 29, 32, 34]
    assert [c[0] for c in clip_indices(50, training=False)] == expected
    # 20 frames, 4 clips: max start 4, 4/3 per clip -> 0, 1.33, 2.67, 4
    assert [c[0] for c in clip_indices(20, training=False, num_clips=4)] == [0, 1, 3, 4]
    # halves round up: max start 1, 3 clips -> 0, 0.5, 1
    assert [c[0] for c in clip_indices(17, training=False, num_clips=3)] == [0, 1, 1]


def test_clip_single_test_clip_is_centred():
    assert clip_indices(100, training=False, num_clips=1) == [list(range(42, 58))]
    assert clip_indices(17, training=False, num_clips=1) == [list(range(16))]  # max start 1 -> 1 // 2 = 0


def test_clip_step():
    # span 31; 100 frames: max start 69, 4 clips at 0, 23, 46, 69
    clips = clip_indices(100, clip_len=16, step=2, training=False, num_clips=4)
    assert [c[0] for c in clips] == [0, 23, 46, 69]
    assert clips[-1] == list(range(69, 100, 2))
    assert clips[-1][-1] == 99
    clips = clip_indices(12, clip_len=4, step=3, training=False, num_clips=2)  # span 10, max start 2
    assert clips == [[0, 3, 6, 9], [2, 5, 8, 11]]


def test_clip_exact_length_and_one_longer():
    assert clip_indices(16, training=False) == [list(range(16))] * 15
    starts = [c[0] for c in clip_indices(17, training=False)]
    assert starts == [0] * 7 + [1] * 8  # round(i / 14): halves up from i = 7
    assert clip_indices(17, training=False) == [list(range(s, s + 16)) for s in starts]


@pytest.mark.parametrize("training", [True, False])
def test_clip_short_video_loops(training):
    assert SHORT_VIDEO_RULE == "loop"
    expected_5 = [0, 1, 2, 3, 4] * 3 + [0]
    clips = clip_indices(5, training=training, rng=np.random.default_rng(0))
    assert clips == [expected_5] * (1 if training else 15)
    assert clip_indices(1, training=training, num_clips=2, rng=np.random.default_rng(0)) == (
        [[0] * 16] * (1 if training else 2)
    )
    assert clip_indices(15, training=training, num_clips=1, rng=np.random.default_rng(0)) == [list(range(15)) + [0]]
    # step > 1: 20 frames cannot hold a 31-frame span; indices (2 j) % 20
    assert clip_indices(20, clip_len=16, step=2, training=training, num_clips=1, rng=np.random.default_rng(0)) == [
        [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 0, 2, 4, 6, 8, 10]
    ]


def test_clip_bad_arguments():
    with pytest.raises(ValueError, match="num_frames must be positive"):
        clip_indices(0, training=False)
    with pytest.raises(ValueError, match="num_frames must be positive"):
        clip_indices(-3, training=True)
    with pytest.raises(ValueError, match="num_clips"):
        clip_indices(100, training=False, num_clips=0)
    with pytest.raises(TypeError, match="rng"):
        clip_indices(100, training=True, rng=42)


@pytest.mark.parametrize("num_frames", [1, 5, 15, 16, 17, 31, 100, 301])
@pytest.mark.parametrize("step", [1, 2, 3])
def test_clip_indices_in_range(num_frames, step):
    for training in (True, False):
        for rng in _rngs(num_frames * 7 + step):
            clips = clip_indices(num_frames, step=step, training=training, rng=rng)
            assert len(clips) == (1 if training else 15)
            for clip in clips:
                assert len(clip) == 16
                assert all(0 <= i < num_frames for i in clip)


def test_clip_training_reproducible_with_seeded_rng():
    for make in (np.random.default_rng, lambda s: torch.Generator().manual_seed(s)):
        a, b = make(123), make(123)
        draws_a = [clip_indices(200, training=True, rng=a)[0][0] for _ in range(20)]
        draws_b = [clip_indices(200, training=True, rng=b)[0][0] for _ in range(20)]
        assert draws_a == draws_b
        assert len(set(draws_a)) > 1


def test_clip_training_torch_global_rng():
    torch.manual_seed(5)
    first = [clip_indices(200, training=True)[0][0] for _ in range(10)]
    torch.manual_seed(5)
    assert [clip_indices(200, training=True)[0][0] for _ in range(10)] == first


@pytest.mark.parametrize("num_frames,step", [(20, 1), (40, 2), (16, 1)])
def test_clip_training_reaches_every_start(num_frames, step):
    max_start = num_frames - clip_span(16, step)
    for rng in _rngs(7):
        starts = set()
        for _ in range(600):
            clip = clip_indices(num_frames, step=step, training=True, rng=rng)[0]
            assert clip == list(range(clip[0], clip[0] + 16 * step, step))
            starts.add(clip[0])
        assert starts == set(range(max_start + 1))


# ---- segments (LGD-2D, TSN) ----


def test_segment_test_centres():
    assert segment_indices(30, training=False, num_views=1) == [[5, 15, 25]]
    assert segment_indices(100, training=False, num_views=1) == [[16, 49, 83]]  # segments [0,33) [33,66) [66,100)
    assert segment_indices(3, training=False, num_views=1) == [[0, 1, 2]]
    assert segment_indices(8, num_segments=4, training=False, num_views=1) == [[1, 3, 5, 7]]


def test_segment_test_views():
    views = segment_indices(30, training=False)  # 10 views, segments of 10 frames: one view per frame
    assert views == [[v, 10 + v, 20 + v] for v in range(10)]
    # segments of 33, 33, 34 frames, 2 views at 1/4 and 3/4
    assert segment_indices(100, training=False, num_views=2) == [[8, 41, 74], [24, 57, 91]]
    # segments of 2 frames, 4 views: frames repeat in order
    assert segment_indices(6, training=False, num_views=4) == [[0, 2, 4], [0, 2, 4], [1, 3, 5], [1, 3, 5]]


@pytest.mark.parametrize("training", [True, False])
def test_segment_short_video_loops(training):
    rng = np.random.default_rng(0)
    count = 1 if training else 10
    assert segment_indices(1, training=training, rng=rng) == [[0, 0, 0]] * count
    assert segment_indices(2, training=training, rng=rng) == [[0, 1, 0]] * count
    assert segment_indices(5, num_segments=8, training=training, rng=rng) == [[0, 1, 2, 3, 4, 0, 1, 2]] * count


def test_segment_bad_arguments():
    with pytest.raises(ValueError, match="num_frames must be positive"):
        segment_indices(0, training=True)
    with pytest.raises(ValueError, match="num_segments"):
        segment_indices(10, num_segments=0, training=True)
    with pytest.raises(ValueError, match="num_views"):
        segment_indices(10, training=False, num_views=0)


@pytest.mark.parametrize("num_frames", [1, 2, 3, 4, 5, 15, 16, 17, 100])
def test_segment_indices_in_range_and_ordered(num_frames):
    for training in (True, False):
        for rng in _rngs(num_frames):
            views = segment_indices(num_frames, training=training, rng=rng)
            assert len(views) == (1 if training else 10)
            for frames in views:
                assert len(frames) == 3
                assert all(0 <= i < num_frames for i in frames)
                if num_frames >= 3:
                    assert frames == sorted(frames) and len(set(frames)) == 3


def test_segment_training_covers_each_segment():
    # 10 frames, 3 segments: [0, 3) [3, 6) [6, 10)
    for rng in _rngs(11):
        seen = [set(), set(), set()]
        for _ in range(400):
            for k, frame in enumerate(segment_indices(10, training=True, rng=rng)[0]):
                seen[k].add(frame)
        assert seen == [{0, 1, 2}, {3, 4, 5}, {6, 7, 8, 9}]


def test_segment_training_reproducible():
    a = [segment_indices(90, training=True, rng=np.random.default_rng(3)) for _ in range(2)]
    assert a[0] == a[1]
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert [segment_indices(90, training=True, rng=g1) for _ in range(5)] == [
        segment_indices(90, training=True, rng=g2) for _ in range(5)
    ]


# ---- crops ----


def test_crop_centre():
    assert crop_offsets(240, 320, 224) == [(8, 48)]
    assert crop_offsets(120, 160, 112) == [(4, 24)]
    assert crop_offsets(225, 225, 224) == [(1, 1)]  # ceil(1 / 2), as PySlowFast
    assert crop_offsets(224, 224, 224) == [(0, 0)]


def test_three_crops_landscape_and_portrait():
    assert crop_offsets(256, 340, 256, num_crops=3) == [(0, 0), (0, 42), (0, 84)]  # left, centre, right
    assert crop_offsets(340, 256, 256, num_crops=3) == [(0, 0), (42, 0), (84, 0)]  # top, centre, bottom
    assert crop_offsets(256, 256, 224, num_crops=3) == [(16, 0), (16, 16), (16, 32)]  # square: along the width
    assert crop_offsets(240, 320, (200, 100), num_crops=3) == [(20, 0), (20, 110), (20, 220)]


def test_crop_training_within_bounds_and_covering():
    for rng in _rngs(2):
        tops, lefts = set(), set()
        for _ in range(500):
            ((top, left),) = crop_offsets(20, 24, (16, 18), training=True, num_crops=3, rng=rng)
            assert 0 <= top <= 4 and 0 <= left <= 6
            tops.add(top)
            lefts.add(left)
        assert tops == set(range(5)) and lefts == set(range(7))
    assert crop_offsets(16, 16, 16, training=True, rng=np.random.default_rng(0)) == [(0, 0)]


def test_crop_training_reproducible():
    a = [crop_offsets(240, 320, 224, training=True, rng=np.random.default_rng(9)) for _ in range(2)]
    assert a[0] == a[1]


def test_crop_errors():
    with pytest.raises(ValueError, match=r"crop 224x224 does not fit in a 200x300 frame"):
        crop_offsets(200, 300, 224)
    with pytest.raises(ValueError, match="does not fit"):
        crop_offsets(300, 200, (100, 201), training=True)
    with pytest.raises(ValueError, match="num_crops must be 1 or 3"):
        crop_offsets(256, 340, 224, num_crops=2)
    with pytest.raises(ValueError, match="height"):
        crop_offsets(0, 340, 224)
