"""Data pipeline: synthetic data, packed batches, determinism, checkpoint restore with workers, bad records."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from infinitevl_jax.config import tiny_infinitevl
from infinitevl_jax.data import DataConfig, PackingSpec, RecordTransform, SourceConfig, make_data_iterator, pack
from infinitevl_jax.data.sources import JsonSource
from infinitevl_jax.data.synthetic import generate
from infinitevl_jax.processing import IGNORE_INDEX, Processor
from infinitevl_jax.processing.testing import write_tiny_processor_dir

pytest.importorskip("grain")


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    return Processor.from_pretrained(write_tiny_processor_dir(tmp_path_factory.mktemp("proc"), tiny_infinitevl()))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    generate(root, seed=0, num_train=48, num_eval=8)
    return root


def _config(path, **kw):
    base = dict(sources=(SourceConfig(str(path)),), batch_size=2, seq_len=192, seed=0, max_images=8,
                image_patch_buckets=(128, 256, 512), max_videos=2, video_patch_buckets=(0, 256))
    base.update(kw)
    return DataConfig(**base)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ------------------------------------------------------------------------------------------------ synthetic data
def test_synthetic_splits(tmp_path):
    paths = generate(tmp_path / "a", seed=3, num_train=8, num_eval=200)
    generate(tmp_path / "b", seed=3, num_train=8, num_eval=200)
    for split in ("train", "eval"):
        assert open(paths[split]).read() == open(tmp_path / "b" / f"{split}.jsonl").read()
    assert (tmp_path / "a/images/eval_00005.png").read_bytes() == (tmp_path / "b/images/eval_00005.png").read_bytes()
    records = [json.loads(line) for line in open(paths["eval"])]
    assert len(records) == 200
    tasks = {r["task"] for r in records}
    assert tasks == {"colour", "shape", "count", "memory"}
    assert any(r.get("videos") for r in records) and any(len(r.get("images", [])) == 4 for r in records)
    for r in records:
        assert r["messages"][-1] == {"role": "assistant", "content": r["answer"]}
        for rel in r.get("images", []):
            assert 56 <= min(Image.open(tmp_path / "a" / rel).size) <= 112
    train = [json.loads(line) for line in open(paths["train"])]
    assert train[0]["images"] != records[0]["images"]


# ------------------------------------------------------------------------------------------------ packing
def test_packed_batches(processor, synthetic):
    cfg = _config(synthetic / "train.jsonl", shuffle=False)
    it = make_data_iterator(cfg, processor)
    batches = list(it)
    assert it.num_skipped == 0
    # The streaming packer equals packing the transformed records in order.
    spec = cfg.packing_spec()
    transform = RecordTransform(processor, cfg.record_limits(spec))
    source = JsonSource(synthetic / "train.jsonl")
    examples = [transform(source[i]) for i in range(len(source))]
    _assert_batches_equal(batches, pack(examples, spec))
    answers = [json.loads(line)["answer"] for line in open(synthetic / "train.jsonl")]
    seen = []
    for batch in batches:
        ids, labels, seg, pos = batch["input_ids"], batch["labels"], batch["segment_ids"], batch["position_ids"]
        np.testing.assert_array_equal(batch["attention_mask"], seg > 0)
        assert np.all(labels[seg == 0] == IGNORE_INDEX) and np.all(pos[:, seg == 0] == 0)
        for b in range(cfg.batch_size):
            n_docs = seg[b].max()
            used = np.flatnonzero(seg[b])
            assert used.size == 0 or used[-1] == used.size - 1  # documents first, padding after
            np.testing.assert_array_equal(np.unique(seg[b][seg[b] > 0]), np.arange(1, n_docs + 1))
            for d in range(1, n_docs + 1):
                at = np.flatnonzero(seg[b] == d)
                assert np.all(np.diff(at) == 1)
                assert ids[b, at[0]] == processor.im_start_token_id and np.all(pos[:, b, at[0]] == 0)
                text = ~np.isin(ids[b, at], (processor.image_token_id, processor.video_token_id))
                p = pos[:, b, at]
                assert np.all(p[0][text] == p[1][text]) and np.all(p[0][text] == p[2][text])
                assert np.all(np.diff(p[0][text]) >= 1)
                lab = labels[b, at]
                seen.append(processor.decode(lab[lab != IGNORE_INDEX]))
        # Vision: grids, patch counts and pad-token counts agree; padding rows/grids are zero.
        grids = batch["image_grid_thw"]
        n_img = int(batch["num_images"])
        assert np.all(grids[n_img:] == 0) and np.all(grids[:n_img] > 0)
        patches = int(np.prod(grids[:n_img], axis=1).sum())
        assert batch["pixel_values"].shape[0] in spec.image_patch_buckets and patches <= batch["pixel_values"].shape[0]
        assert not batch["pixel_values"][patches:].any()
        assert (ids == processor.image_token_id).sum() == patches // 4
        vgrids = batch["video_grid_thw"][: int(batch["num_videos"])]
        assert (ids == processor.video_token_id).sum() == int(np.prod(vgrids, axis=1).sum()) // 4
        np.testing.assert_allclose(batch["second_per_grid_ts"][: len(vgrids)], 1.0)
    assert sorted(seen) == sorted(a + "<|im_end|>\n" for a in answers)


def test_packer_places_first_fit_and_orders_media_by_row(processor):
    spec = PackingSpec(batch_size=2, seq_len=100, max_images=4, image_patch_buckets=(16, 64), max_videos=1,
                       video_patch_buckets=(0,))
    grey = Image.new("RGB", (56, 56), (9, 9, 9))
    long_msg = [{"role": "user", "content": "<image>" + "one two " * 12}, {"role": "assistant", "content": "red"}]
    short_msg = [{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "blue"}]
    a = processor.encode_conversation(long_msg, [grey])
    b = processor.encode_conversation(long_msg, [Image.new("RGB", (56, 56), (200, 0, 0))])
    c = processor.encode_conversation(short_msg, [Image.new("RGB", (56, 56), (0, 0, 200))])
    assert 50 < len(a["input_ids"]) and len(a["input_ids"]) + len(c["input_ids"]) <= 100 < 2 * len(a["input_ids"])
    (batch,) = pack([a, b, c], spec)  # a -> row 0, b -> row 1, c fits behind a in row 0
    np.testing.assert_array_equal(batch["segment_ids"].max(axis=1), [2, 1])
    assert batch["pixel_values"].shape == (64, 1176) and int(batch["num_images"]) == 3
    # Media order follows row-major token order: a, c (row 0), then b (row 1).
    np.testing.assert_array_equal(batch["pixel_values"][:48], np.concatenate(
        [a["pixel_values"], c["pixel_values"], b["pixel_values"]]))


# ------------------------------------------------------------------------------------------------ determinism, state
def test_seed_determinism(processor, synthetic):
    first = _take(make_data_iterator(_config(synthetic / "train.jsonl", seed=1), processor), 3)
    again = _take(make_data_iterator(_config(synthetic / "train.jsonl", seed=1), processor), 3)
    other = _take(make_data_iterator(_config(synthetic / "train.jsonl", seed=2), processor), 3)
    _assert_batches_equal(first, again)
    assert any(not np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(first, other))


def test_restore_mid_epoch_with_two_workers(processor, synthetic):
    cfg = _config(synthetic / "train.jsonl", worker_count=2, num_epochs=None)
    it = make_data_iterator(cfg, processor)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 4)
    it.close()
    restored = make_data_iterator(cfg, processor)
    restored.set_state(state)
    got = _take(restored, 4)
    restored.close()
    _assert_batches_equal(got, expected)


def _documents(batch, processor):
    """(text, checksum of its image pixels) of every document, in row-major order."""
    out, row = [], 0
    for b in range(batch["input_ids"].shape[0]):
        for s in range(1, batch["segment_ids"][b].max() + 1):
            ids = batch["input_ids"][b][batch["segment_ids"][b] == s]
            n = int((ids == processor.image_token_id).sum()) * 4
            out.append((processor.decode(ids), round(float(batch["pixel_values"][row:row + n].sum()), 3)))
            row += n
    return out


def test_process_shards_are_disjoint(processor, synthetic):
    seen = []
    for index in range(2):
        it = make_data_iterator(_config(synthetic / "train.jsonl", process_index=index, process_count=2), processor)
        seen.append([d for b in it for d in _documents(b, processor)])
    assert len(seen[0]) == len(seen[1]) == 24
    assert len(set(seen[0]) | set(seen[1])) == 48


# ------------------------------------------------------------------------------------------------ bad records
def test_bad_records_are_skipped_with_reasons(processor, synthetic, tmp_path):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    good = [json.loads(line) for line in open(synthetic / "train.jsonl")
            if not json.loads(line).get("videos")][:6]
    for r in good:
        for rel in r["images"]:
            shutil.copy(synthetic / rel, root / rel)
    img = lambda path: {"messages": [{"role": "user", "content": "<image>What?"},
                                     {"role": "assistant", "content": "red"}], "images": [path]}
    (root / "images/corrupt.png").write_bytes((synthetic / good[0]["images"][0]).read_bytes()[:60])
    Image.new("RGB", (56, 56)).save(tmp_path / "outside.png")
    long_record = {"messages": [{"role": "user", "content": "one two " * 150 + "<image>"},
                                {"role": "assistant", "content": "red"}], "images": [good[0]["images"][0]]}
    lines = [json.dumps(r) for r in good[:3]]
    lines += [json.dumps(img("images/corrupt.png")), json.dumps(img("images/missing.png")),
              json.dumps(good[3])[:-20], json.dumps(img("../outside.png")), json.dumps(long_record)]
    lines += [json.dumps(r) for r in good[3:]]
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    it = make_data_iterator(_config(root / "train.jsonl", shuffle=False), processor)
    docs = sum(int(b["segment_ids"].max(axis=1).sum()) for b in it)
    assert docs == len(good)
    assert it.num_skipped == 5
    assert dict(it.skipped) == {"corrupt_media": 1, "missing_media": 1, "malformed_json": 1,
                                "path_escapes_media_root": 1, "too_long": 1}
    where = {(s.kind, s.line) for s in it.skip_log}
    assert where == {("corrupt_media", 4), ("missing_media", 5), ("malformed_json", 6),
                     ("path_escapes_media_root", 7), ("too_long", 8)}
    assert all(str(s).startswith(str(root / "train.jsonl")) for s in it.skip_log)


def test_text_only_overlong_record_is_truncated(processor, tmp_path):
    rec = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "one two " * 200}]}
    (tmp_path / "t.jsonl").write_text(json.dumps(rec) + "\n")
    (batch,) = list(make_data_iterator(_config(tmp_path / "t.jsonl"), processor))
    assert batch["segment_ids"][0].sum() == 192 and (batch["labels"][0] != IGNORE_INDEX).sum() > 100
