"""Processor: image parity with transformers' PIL Qwen2-VL processor, video grouping, chat template, labels."""

import json
import os

import jinja2
import numpy as np
import pytest
from PIL import Image

from infinitevl_jax.config import tiny_infinitevl
from infinitevl_jax.processing import IGNORE_INDEX, ImageProcessorConfig, Processor
from infinitevl_jax.processing.image import process_image, smart_resize
from infinitevl_jax.processing.testing import write_tiny_processor_dir
from infinitevl_jax.processing.video import VideoProcessorConfig, process_video

IMAGE_SPAN = "<|vision_start|><|image_pad|><|vision_end|>"


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    return Processor.from_pretrained(write_tiny_processor_dir(tmp_path_factory.mktemp("proc"), tiny_infinitevl()))


def _random_image(rng, h, w, mode="RGB"):
    channels = {"RGB": 3, "RGBA": 4, "L": None}[mode]
    shape = (h, w) if channels is None else (h, w, channels)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


# ------------------------------------------------------------------------------------------------ images
@pytest.mark.parametrize("min_pixels,max_pixels", [(56 * 56, 28 * 28 * 1280), (128 * 28 * 28, 256 * 28 * 28)])
def test_image_matches_transformers_pil(min_pixels, max_pixels):
    pil_module = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    hf = pil_module.Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    cfg = ImageProcessorConfig(min_pixels=min_pixels, max_pixels=max_pixels)
    rng = np.random.default_rng(0)
    sizes = [(56, 56, "RGB"), (100, 300, "RGB"), (333, 517, "RGBA"), (29, 2000, "L"), (448, 448, "RGB"),
             (1000, 700, "RGB"), (15, 15, "RGB")]
    for h, w, mode in sizes:
        image = _random_image(rng, h, w, mode)
        ref = hf(image, return_tensors="np")
        pixels, grid = process_image(image, cfg)
        np.testing.assert_array_equal(grid[None], ref["image_grid_thw"], err_msg=f"{h}x{w}")
        assert pixels.dtype == np.float32 and pixels.shape == ref["pixel_values"].shape
        np.testing.assert_allclose(pixels, ref["pixel_values"], atol=1e-5, rtol=0, err_msg=f"{h}x{w} {mode}")


def test_image_errors():
    with pytest.raises(ValueError, match="aspect ratio"):
        process_image(Image.new("RGB", (5000, 20)))
    with pytest.raises(ValueError, match="smaller than one"):
        process_image(Image.new("RGB", (10, 40)))
    assert smart_resize(28 * 3, 28 * 5) == (84, 140)


def test_exif_orientation_applied(processor, tmp_path):
    image = Image.new("RGB", (112, 56), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    image.save(tmp_path / "rot.jpg", exif=exif)
    out = processor.process_image(tmp_path / "rot.jpg")
    np.testing.assert_array_equal(out["image_grid_thw"], [[1, 8, 4]])  # 56 wide, 112 high once rotated


def test_preprocessor_config_both_layouts(tmp_path):
    cfg = tiny_infinitevl()
    a = Processor.from_pretrained(write_tiny_processor_dir(tmp_path / "a", cfg, max_pixels=112 * 112))
    b = Processor.from_pretrained(write_tiny_processor_dir(tmp_path / "b", cfg, max_pixels=112 * 112, size_style="v5"))
    assert a.image_config == b.image_config and a.image_config.max_pixels == 112 * 112
    c = Processor.from_pretrained(tmp_path / "a", max_pixels=56 * 56, video_fps=4)
    assert c.image_config.max_pixels == 56 * 56 and c.video_config.fps == 4


# ------------------------------------------------------------------------------------------------ videos
def test_video_frames_grouped_in_temporal_pairs():
    rng = np.random.default_rng(1)
    frames = [_random_image(rng, 70, 90) for _ in range(3)]
    icfg = ImageProcessorConfig(min_pixels=56 * 56, max_pixels=112 * 112)
    vcfg = VideoProcessorConfig(min_pixels=56 * 56, max_pixels=112 * 112)
    for fps in (2.0, 4.0):
        pixels, grid, spg = process_video(frames, icfg, vcfg, fps=fps)
        assert spg == pytest.approx(2.0 / fps)
    gt, gh, gw = grid
    assert gt == 2  # 3 frames, the last repeated to make pairs
    v = pixels.reshape(gt, gh * gw, 3, 2, 14, 14)
    for j, frame in enumerate(frames + frames[-1:]):
        single, g = process_image(frame, icfg)
        assert tuple(g[1:]) == (gh, gw)
        np.testing.assert_array_equal(v[j // 2, :, :, j % 2], single.reshape(gh * gw, 3, 2, 14, 14)[:, :, 0])


def test_video_file_sampled_at_fps(processor, tmp_path):
    av = pytest.importorskip("av")
    path = str(tmp_path / "clip.mp4")
    with av.open(path, "w") as out:
        stream = out.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for i in range(16):  # 2 seconds at 8 fps
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), i * 15, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    out = processor.process_video(path)  # 2 fps -> 4 frames -> 2 temporal steps of one second each
    np.testing.assert_array_equal(out["video_grid_thw"], [[2, 4, 4]])
    np.testing.assert_allclose(out["second_per_grid_ts"], [1.0])
    assert out["pixel_values_videos"].shape == (2 * 16, 1176)


# ------------------------------------------------------------------------------------------------ chat template
SYS = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


def test_chat_template_reference_examples(processor):
    first = [{"role": "user", "content": "<image>What is this?"}]
    assert processor.apply_chat_template(first, add_generation_prompt=True) == (
        SYS + f"<|im_start|>user\n{IMAGE_SPAN}What is this?<|im_end|>\n<|im_start|>assistant\n")
    two = first + [{"role": "assistant", "content": "A cat."}]
    assert processor.apply_chat_template(two) == processor.apply_chat_template(first, True) + "A cat.<|im_end|>\n"
    three = two + [{"role": "user", "content": "And the colour?"}]
    assert processor.apply_chat_template(three, add_generation_prompt=True) == (
        processor.apply_chat_template(two) + "<|im_start|>user\nAnd the colour?<|im_end|>\n<|im_start|>assistant\n")
    brief = [{"role": "system", "content": "Be brief."}] + first
    assert processor.apply_chat_template(brief, True).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user")
    video = [{"role": "user", "content": "<video>Describe."}]
    assert processor.apply_chat_template(video, True) == (
        SYS + "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>Describe.<|im_end|>\n<|im_start|>assistant\n")
    sharegpt = [{"from": "human", "value": "<image>What is this?"}, {"from": "gpt", "value": "A cat."}]
    assert processor.apply_chat_template(sharegpt) == processor.apply_chat_template(two)
    hf_parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    assert processor.apply_chat_template(hf_parts, True) == processor.apply_chat_template(first, True)
    # The directory's Jinja template renders the same strings.
    template = jinja2.Environment().from_string(processor.chat_template)
    for msgs, gen in ((first, True), (two, False), (three, True), (brief, True), (video, True), (hf_parts, True)):
        assert template.render(messages=msgs, add_generation_prompt=gen) == processor.apply_chat_template(msgs, gen)


def test_unknown_role_rejected(processor):
    with pytest.raises(ValueError, match="unknown role"):
        processor.apply_chat_template([{"role": "robot", "content": "hi"}])


def test_pad_expansion_positions_and_labels(processor):
    rng = np.random.default_rng(2)
    images = [_random_image(rng, 84, 140), _random_image(rng, 56, 56)]
    frames = [_random_image(rng, 56, 84) for _ in range(4)]
    msgs = [
        {"role": "user", "content": "<image>What is the colour of the shape?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "<image><video>How many shapes?"},
        {"role": "assistant", "content": "three"},
    ]
    out = processor.encode_conversation(msgs, images, [frames])
    ids, labels = out["input_ids"], out["labels"]
    np.testing.assert_array_equal(out["image_grid_thw"], [[1, 6, 10], [1, 4, 4]])
    np.testing.assert_array_equal(out["video_grid_thw"], [[2, 4, 6]])
    assert (ids == processor.image_token_id).sum() == 60 // 4 + 16 // 4
    assert (ids == processor.video_token_id).sum() == 2 * 24 // 4
    assert out["pixel_values"].shape == (76, 1176) and out["pixel_values_videos"].shape == (48, 1176)
    assert ids.shape == labels.shape and out["position_ids"].shape == (3, ids.size)
    # Labels: exactly each reply, its <|im_end|> and the newline.
    assert processor.decode(ids[labels != IGNORE_INDEX]) == "red<|im_end|>\nthree<|im_end|>\n"
    np.testing.assert_array_equal(labels[labels != IGNORE_INDEX], ids[labels != IGNORE_INDEX])
    # The rendered text round-trips once pads are collapsed.
    text = processor.apply_chat_template(msgs)
    assert processor.decode(ids).replace("<|image_pad|>" * 15, "<|image_pad|>").replace(
        "<|image_pad|>" * 4, "<|image_pad|>").replace("<|video_pad|>" * 12, "<|video_pad|>") == text
    # The plain call on the rendered text gives the same inputs.
    plain = processor(text, images, [frames])
    np.testing.assert_array_equal(plain["input_ids"], ids)
    np.testing.assert_array_equal(plain["position_ids"], out["position_ids"])
    # Vision positions: the first image's tokens are (offset, h, w) on a 3x5 merged grid.
    first = np.flatnonzero(ids == processor.image_token_id)[:15]
    pos = out["position_ids"][:, first] - out["position_ids"][0, first[0]]
    np.testing.assert_array_equal(pos[1], np.repeat(np.arange(3), 5))
    np.testing.assert_array_equal(pos[2], np.tile(np.arange(5), 3))


def test_placeholder_count_mismatch(processor):
    with pytest.raises(ValueError, match="placeholders"):
        processor.encode_conversation([{"role": "user", "content": "<image><image>hi"}], [Image.new("RGB", (56, 56))])
