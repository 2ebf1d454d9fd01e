"""moe_adapt.data: domain benchmarks, image transforms and episode samplers.

Image benchmarks: `get_benchmark('digits_rot' | 'fmnist_rot' | 'fmnist_shift' | 'tfds',
**options)`; see `list_benchmarks()` and each module's docstring.
"""

from moe_adapt.data.episodes import (
  DomainIndex,
  Episode,
  check_episode_sizes,
  concat_domains,
  sample_episode,
  sample_episodes,
  sample_support,
)
from moe_adapt.data.fashion import MissingDataError, read_idx
from moe_adapt.data.registry import (
  Benchmark,
  DomainSplits,
  Split,
  get_benchmark,
  list_benchmarks,
  register_benchmark,
)
from moe_adapt.data.tfds_builders import TFDSBenchmark, prepare_tfds

__all__ = [
  "Benchmark",
  "DomainIndex",
  "DomainSplits",
  "Episode",
  "MissingDataError",
  "Split",
  "TFDSBenchmark",
  "check_episode_sizes",
  "concat_domains",
  "get_benchmark",
  "list_benchmarks",
  "prepare_tfds",
  "read_idx",
  "register_benchmark",
  "sample_episode",
  "sample_episodes",
  "sample_support",
]
