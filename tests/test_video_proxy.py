"""The video proxy: its fixture and training record, 3-D rotary positions, frames that see each other, the camera
clips it learns from, and a training run that resumes from its checkpoint with the same losses."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("safetensors")

from efficient_attention_pop.attention.layout import TokenLayout  # noqa: E402
from efficient_attention_pop.benchmark.proxy import VIDEO_WEIGHTS, load_proxy_model, sample_images  # noqa: E402
from efficient_attention_pop.benchmark.proxy.model import ProxyConfig, rope_tables  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return load_proxy_model(weights=VIDEO_WEIGHTS)


def test_fixture_matches_its_recorded_sha256_and_training_record():
    record = json.loads(VIDEO_WEIGHTS.with_suffix(".json").read_text())
    assert hashlib.sha256(VIDEO_WEIGHTS.read_bytes()).hexdigest() == record["sha256"]
    assert record["config"]["time_pairs"] > 0 and record["threads"] == 1
    assert record["seconds"] <= 2 * 3600  # the budget: about two hours of these 2 cores
    assert record["loss_curve"][-1][0] == record["steps"]
    assert "proxy_dit.safetensors" in record["started_from"]


def test_an_image_model_has_the_image_rotary_and_a_video_one_turns_with_time():
    image, video = ProxyConfig(), ProxyConfig(time_pairs=4)
    layout = TokenLayout(3, 4, 4, before=2)
    cos_image, _ = rope_tables(TokenLayout(1, 4, 4, before=2), image, torch.device("cpu"))
    cos_video, sin_video = rope_tables(layout, video, torch.device("cpu"))
    per_frame = 16
    frame0, frame2 = cos_video[2:2 + per_frame], cos_video[2 + 2 * per_frame:2 + 3 * per_frame]
    spatial = [0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13]  # 6 row pairs, 6 column pairs; pairs 6, 7, 14, 15 are time
    torch.testing.assert_close(frame0[:, spatial], cos_image[2:, spatial])
    torch.testing.assert_close(frame0[:, spatial], frame2[:, spatial])  # the same place in another frame
    assert torch.equal(frame0[:, [6, 7, 14, 15]], torch.ones(per_frame, 4))  # time 0: no turn
    assert (frame2[:, [6, 7, 14, 15]] != 1).all()
    assert torch.equal(cos_video[:2], torch.ones(2, 16)) and torch.equal(sin_video[:2], torch.zeros(2, 16))


def test_frames_see_each_other_through_attention(model):
    """The velocity of frame 0 depends on the noise of the last frame (one joint attention over all frames)."""
    x = torch.randn(1, 3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t, labels = torch.tensor([0.5]), torch.tensor([1])
    layouts = []

    def recording(q, k, v, layout, layer_index):
        layouts.append(layout)
        return F.scaled_dot_product_attention(q, k, v)

    with torch.no_grad():
        velocity = model(x, t, labels, attention_fn=recording)
        moved = x.clone()
        moved[:, :, -1] += 1.0
        other = model(moved, t, labels)
    assert velocity.shape == x.shape
    assert layouts[0] == TokenLayout(4, 8, 8, before=model.config.cond_tokens)
    assert (velocity[:, :, 0] - other[:, :, 0]).abs().max() > 1e-3


def test_sampled_videos_are_deterministic(model):
    first = sample_images(model, [1], size=16, steps=3, seed=3, frames=4)
    assert first.shape == (1, 3, 4, 16, 16)
    assert torch.equal(first, sample_images(model, [1], size=16, steps=3, seed=3, frames=4))


def test_training_clips_are_a_camera_moving_over_one_photograph():
    """Consecutive frames are close (a small camera move), far frames differ more, every value in [-1, 1]."""
    pytest.importorskip("skimage")
    from efficient_attention_pop.benchmark.proxy.video_data import PhotoClips

    clips, labels, times = PhotoClips(seed=0).clips(8, 8, 32, 2)
    assert clips.shape == (8, 3, 8, 32, 32) and labels.shape == (8,)
    assert torch.equal(times, torch.arange(8.0) * 2)
    assert clips.min() >= -1 and clips.max() <= 1
    step = (clips[:, :, 1:] - clips[:, :, :-1]).abs().mean()
    span = (clips[:, :, -1] - clips[:, :, 0]).abs().mean()
    assert step < span
    again, _, _ = PhotoClips(seed=0).clips(8, 8, 32, 2)
    assert torch.equal(clips, again)


def test_training_resumes_from_its_checkpoint_with_the_same_losses(monkeypatch, tmp_path):
    pytest.importorskip("skimage")
    from efficient_attention_pop.benchmark.proxy import train_video

    monkeypatch.setattr(train_video, "CYCLE", ((2, 1, 2), (2, 0, 2)))  # tiny steps: 2 frames of 16 px
    monkeypatch.setattr(train_video, "SIZE", 16)
    monkeypatch.setattr(train_video, "CURVE_EVERY", 1)
    monkeypatch.setattr(train_video, "CHECKPOINT_EVERY", 2)
    torch.set_num_threads(1)
    _, unbroken, _ = train_video.train(4, None)
    checkpoint = tmp_path / "state.pt"

    class Interrupted(Exception):
        pass

    original_save = torch.save

    def save_then_stop(state, path):  # the run is killed right after its first checkpoint
        original_save(state, path)
        raise Interrupted

    monkeypatch.setattr(torch, "save", save_then_stop)
    with pytest.raises(Interrupted):
        train_video.train(4, checkpoint)
    monkeypatch.setattr(torch, "save", original_save)
    (tmp_path / "state.pt.tmp").rename(checkpoint)
    _, resumed, _ = train_video.train(4, checkpoint)
    assert [loss for _, loss in resumed] == [loss for _, loss in unbroken]
    assert len(unbroken) == 4
