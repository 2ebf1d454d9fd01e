"""The grain streaming pipeline over the tiny real-format TFDS datasets.

Checked: batch contents against the examples they name (`index`), seeded determinism,
resumption from a checkpointed iterator state (in a new pipeline, after a JSON round trip),
per-host shards that partition the data, per-epoch reshuffling, domain selection, whole-split
evaluation with padding and mask, the augmentations' geometry, ImageNet normalisation, the
tokenisation hook, and the bad-input messages.
"""

import json

import numpy as np
import pytest
import tokenizers

from moe_adapt import data
from moe_adapt.data import streaming, tfds_builders

BATCH = 4


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  root = tmp_path_factory.mktemp("stream_tfds")
  names = {fmt: tfds_builders.prepare_mock(fmt, root) for fmt in tfds_builders.MOCK_FORMATS}
  return root, {fmt: f"{b.name}/{b.builder_config.name}" for fmt, b in names.items()}


def _open(root, fmt="domainnet", split="train", **kwargs):
  data_dir, names = root
  return streaming.open_split(names[fmt], split=split, data_dir=str(data_dir), **kwargs)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _same(a, b):
  return all(
    a_i.keys() == b_i.keys() and all(np.array_equal(a_i[k], b_i[k]) for k in a_i)
    for a_i, b_i in zip(a, b, strict=True)
  )


def test_train_batches_hold_the_transformed_examples(root):
  source = _open(root, domain_key="domain")
  transform = streaming.image_transform(image_size=16, domain_key="domain")
  (batch,) = _take(iter(streaming.train_batches(source, transform, batch_size=BATCH, seed=0)), 1)
  assert batch["image"].shape == (BATCH, 16, 16, 3) and batch["image"].dtype == np.float32
  assert len(set(batch["index"].tolist())) == BATCH
  for i, index in enumerate(batch["index"]):
    example = source.data[int(index)]
    assert batch["label"][i] == example["label"] and batch["domain"][i] == example["domain"]
  # ImageNet statistics: uint8 images land in [(0 - mean) / std, (1 - mean) / std].
  low, high = (
    -streaming.IMAGENET_MEAN / streaming.IMAGENET_STD,
    (1 - streaming.IMAGENET_MEAN) / streaming.IMAGENET_STD,
  )
  assert np.all(batch["image"] >= low - 1e-6) and np.all(batch["image"] <= high + 1e-6)


def test_seeded_and_resumable_from_a_checkpointed_state(root):
  transform = streaming.image_transform(image_size=12)

  def pipeline(seed):
    return streaming.train_batches(_open(root), transform, batch_size=BATCH, seed=seed)

  iterator = iter(pipeline(0))
  first = _take(iterator, 3)
  state = json.loads(json.dumps(iterator.get_state()))  # What a checkpoint would store.
  rest = _take(iterator, 12)  # Past the end of the first epoch (36 examples = 9 batches).
  assert _same(first + rest, _take(iter(pipeline(0)), 15))  # Same seed, same stream.
  assert not _same(first, _take(iter(pipeline(1)), 3))
  resumed = iter(pipeline(0))  # As after a restart: a new pipeline, the stored state.
  resumed.set_state(state)
  assert _same(_take(resumed, 12), rest)


def test_step_batches_are_the_stream_addressed_by_step(root):
  transform = streaming.image_transform(image_size=12)
  stream = _take(
    iter(streaming.train_batches(_open(root), transform, batch_size=BATCH, seed=0)), 12
  )
  batches = streaming.StepBatches(_open(root), transform, batch_size=BATCH, seed=0)
  assert _same([batches(step) for step in range(12)], stream)  # past the first epoch (9)
  # A resumed stage: a new reader asked for step 7 first, then onwards.
  resumed = streaming.StepBatches(_open(root), transform, batch_size=BATCH, seed=0)
  assert _same([resumed(step) for step in (7, 8, 9, 3)], [stream[i] for i in (7, 8, 9, 3)])
  with pytest.raises(ValueError, match=r"step=-1 is invalid"):
    resumed(-1)


def test_epochs_are_reshuffled_permutations(root):
  source = _open(root)
  transform = streaming.image_transform(image_size=8, augment=("resize",))
  batches = streaming.train_batches(source, transform, batch_size=BATCH, seed=3, num_epochs=2)
  order = np.concatenate([b["index"] for b in batches])
  assert len(order) == 72
  assert sorted(order[:36]) == sorted(order[36:]) == list(range(36))
  assert not np.array_equal(order[:36], order[36:]) and not np.array_equal(order[:36], range(36))


def test_hosts_read_disjoint_shards(root):
  source = _open(root)
  transform = streaming.image_transform(image_size=8, augment=("resize",))
  seen = []
  for host in range(3):
    batches = streaming.train_batches(
      source, transform, batch_size=BATCH, seed=0, num_epochs=1, shard=(host, 3)
    )
    seen.append(np.concatenate([b["index"] for b in batches]))
  assert all(len(s) == 12 for s in seen)  # 36 examples, 12 per host, 3 batches each.
  assert sorted(np.concatenate(seen)) == list(range(36))


def test_domain_selection(root):
  source = _open(root, domain_key="domain", domains=("painting", "clipart"))
  assert source.domains == ("painting", "clipart") and len(source.indices) == 24
  domains = {int(source.data[int(i)]["domain"]) for i in source.indices}
  assert domains == {0, 2}


def test_eval_covers_the_split_once_with_padding(root):
  source = _open(root, split="test")  # 18 examples.
  transform = streaming.image_transform(image_size=8, augment=("center_crop",))
  batches = list(streaming.eval_batches(source, transform, batch_size=BATCH))
  assert len(batches) == 5
  index = np.concatenate([b["index"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  assert index[mask].tolist() == list(range(18)) and not mask[18:].any()
  assert np.all(batches[-1]["image"][2:] == 0) and np.all(index[18:] == -1)
  again = list(streaming.eval_batches(source, transform, batch_size=BATCH))
  assert _same(batches, again)  # No randomness in evaluation.
  # Two hosts: 9 examples each, 3 batches each (the same count on both).
  parts = [list(streaming.eval_batches(source, transform, batch_size=BATCH, shard=(h, 2)))
           for h in range(2)]  # fmt: skip
  assert [len(p) for p in parts] == [3, 3]
  index = np.concatenate([b["index"][b["mask"]] for p in parts for b in p])
  assert sorted(index.tolist()) == list(range(18))


@pytest.mark.parametrize("split_names", [None, ("train", "test", "test")])
def test_domain_splits_are_the_in_memory_benchmarks(root, split_names):
  """`open_domain_splits` holds the examples of the in-memory `tfds` benchmark, in its order."""
  data_dir, names = root
  options = {"tfds_name": names["domainnet"], "data_dir": str(data_dir), "image_size": 16}
  if split_names:
    options["split_names"] = split_names
  benchmark = data.get_benchmark("tfds", **options)
  in_memory = benchmark.load(seed=3)
  parts = streaming.open_domain_splits(
    names["domainnet"],
    data_dir=str(data_dir),
    domain_key="domain",
    domains=benchmark.domains,
    seed=3,
    split_names=split_names,
  )
  for domain in benchmark.domains:
    for source, split in zip(parts[domain], in_memory[domain], strict=True):
      labels = [source.data[int(i)]["label"] for i in source.indices]
      np.testing.assert_array_equal(labels, split.y)
      assert all(
        source.data[int(i)]["domain"] == benchmark.domains.index(domain) for i in source.indices
      )
    whole = parts[domain].whole()
    assert len(whole.indices) == sum(len(s.y) for s in in_memory[domain])


def test_concat_data_reads_the_parts_in_turn():
  concat = streaming.ConcatData([["a", "b"], [], ["c"]])
  assert len(concat) == 3 and [concat[i] for i in range(3)] == ["a", "b", "c"]
  with pytest.raises(IndexError, match="index 3 is out of range for 3 examples"):
    concat[3]


def test_augmentation_geometry_and_normalisation():
  rng = np.random.default_rng(0)
  for _ in range(200):
    h, w = rng.integers(5, 300, size=2)
    top, left, ch, cw = streaming.random_resized_crop_box(int(h), int(w), rng)
    assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch > 0 and cw > 0
  assert streaming.center_crop_box(256, 320) == (16, 48, 224, 224)
  image = np.zeros((10, 20, 3), np.uint8)
  image[:, :10] = 255  # Left half white.
  flip = streaming.image_transform(image_size=10, augment=("flip",), normalize="unit")
  left_means = set()
  for seed in range(20):
    out = flip({"image": image[:, 5:15], "label": 1}, np.random.default_rng(seed))["image"]
    left_means.add(float(out[:, :5].mean()))
  assert left_means == {0.0, 1.0}  # Both flipped and not flipped occur.
  grey = np.full((6, 6), 128, np.uint8)
  out = streaming.image_transform(image_size=6, augment=())({"image": grey, "label": 0}, rng)
  expected = (128 / 255 - streaming.IMAGENET_MEAN) / streaming.IMAGENET_STD
  np.testing.assert_allclose(out["image"][0, 0], expected, rtol=1e-6)
  # float images take the NumPy resize; the whole-image resize of a constant stays constant.
  flat = np.full((7, 9, 3), 0.25, np.float32)
  out = streaming.image_transform(image_size=4, augment=("resize",), normalize="unit")(
    {"image": flat, "label": 0}, rng
  )
  np.testing.assert_allclose(out["image"], 0.25, rtol=1e-6)


def test_text_tokenisation_hook(root):
  vocab = {"[PAD]": 0, "[UNK]": 1, "good": 2, "bad": 3, "the": 4}
  tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tokenizer.enable_padding(length=12, pad_id=0, pad_token="[PAD]")
  tokenizer.enable_truncation(max_length=12)
  source = _open(root, fmt="glue_sst2")
  transform = streaming.text_transform(tokenize=streaming.tokenizer_hook(tokenizer))
  batches = streaming.train_batches(source, transform, batch_size=BATCH, seed=0, num_epochs=1)
  batches = list(batches)
  assert len(batches) == 4
  batch = batches[0]
  assert batch["input_ids"].shape == (BATCH, 12) and batch["input_ids"].dtype == np.int32
  for row, index in enumerate(batch["index"]):
    words = source.data[int(index)]["sentence"].decode().split()
    ids = [vocab.get(w, 1) for w in words]
    assert batch["input_ids"][row].tolist() == ids + [0] * (12 - len(ids))
    assert batch["attention_mask"][row].sum() == len(words)


def test_bad_input(root):
  with pytest.raises(ValueError, match=r"domain_key='domain' is not a feature of 'mock_cub200/"):
    _open(root, fmt="cub200", domain_key="domain")
  with pytest.raises(ValueError, match=r"accepted: bbox, image, image/filename, label, segm"):
    _open(root, fmt="cub200", domain_key="domain")
  with pytest.raises(ValueError, match=r"augment has unknown name\(s\) \['blur'\]; accepted: "):
    streaming.image_transform(image_size=8, augment=("flip", "blur"))
  with pytest.raises(ValueError, match=r"augment=\['resize', 'center_crop'\] sizes the image tw"):
    streaming.image_transform(image_size=8, augment=["resize", "center_crop"])
  with pytest.raises(ValueError, match="normalize='imagenet21k' is unknown; accepted: imagenet"):
    streaming.image_transform(image_size=8, normalize="imagenet21k")
  with pytest.raises(ValueError, match=r"domains=\('real',\) is invalid for 'mock_domainnet"):
    _open(root, domain_key="domain", domains=("real",))
  with pytest.raises(ValueError, match=r"split='validation' is not a split of"):
    _open(root, split="validation")
  with pytest.raises(ValueError, match=r"image_key='img' is not a feature"):
    _open(root, required_keys=[("image_key", "img")])
  source = _open(root)
  transform = streaming.image_transform(image_size=8)
  with pytest.raises(ValueError, match="batch_size=40 exceeds the 36 examples of this host"):
    streaming.train_batches(source, transform, batch_size=40, seed=0)
  no_size = streaming.image_transform(image_size=8, augment=("flip",))
  with pytest.raises(ValueError, match="is not 8x8; add one of random_resized_crop"):
    next(iter(streaming.train_batches(source, no_size, batch_size=BATCH, seed=0)))


@pytest.mark.slow  # Spawned workers import JAX and TFDS: ~15 s on 2 busy cores.
def test_worker_processes_give_the_same_batches(root):
  transform = streaming.image_transform(image_size=12)
  source = _open(root)
  local = _take(iter(streaming.train_batches(source, transform, batch_size=BATCH, seed=5)), 4)
  workers = streaming.train_batches(source, transform, batch_size=BATCH, seed=5, worker_count=2)
  assert _same(_take(iter(workers), 4), local)
