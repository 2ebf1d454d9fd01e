"""Tests for the stage cache shared by the runs of a sweep."""

from moe_adapt.train import stage_cache


def test_key_depends_only_on_selected_fields():
  a = {"seed": 0, "experts": {"lr": 1e-3, "steps": 5}, "meta": {"distill": "features"}}
  b = {"seed": 0, "experts": {"lr": 1e-3, "steps": 5}, "meta": {"distill": "logits"}}
  c = {"seed": 0, "experts": {"lr": 1e-2, "steps": 5}, "meta": {"distill": "features"}}
  fields = ("seed", "experts")
  assert stage_key_equal(a, b, fields)
  assert not stage_key_equal(a, c, fields)
  # A prefix must match a whole dotted component: 'expert' does not select 'experts'.
  assert stage_key_equal(a, c, ("seed", "expert"))


def stage_key_equal(a, b, fields):
  return stage_cache.stage_key(a, fields) == stage_cache.stage_key(b, fields)


def test_store_then_fetch_copies_and_never_overwrites(tmp_path):
  src = tmp_path / "run1" / "checkpoints" / "experts"
  (src / "5").mkdir(parents=True)
  (src / "5" / "state").write_text("weights")
  cache = tmp_path / "cache"
  stage_cache.store(cache, "experts", "abc", src)
  # A second store of the same key is a no-op, even with different content.
  (src / "5" / "state").write_text("other")
  stage_cache.store(cache, "experts", "abc", src)
  assert (cache / "experts-abc" / "5" / "state").read_text() == "weights"

  dest = tmp_path / "run2" / "checkpoints" / "experts"
  dest.parent.mkdir(parents=True)
  assert stage_cache.fetch(cache, "experts", "abc", dest)
  assert (dest / "5" / "state").read_text() == "weights"
  # An existing stage directory is never replaced; a missing key fetches nothing.
  assert not stage_cache.fetch(cache, "experts", "abc", dest)
  assert not stage_cache.fetch(cache, "experts", "zzz", tmp_path / "run3")
  assert not list(dest.parent.glob(".*tmp*"))
