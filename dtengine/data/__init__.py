"""Data: the built-in shapes dataset, WebDataset shard writing, and the deterministic, resumable batch stream."""

from dtengine.data.builtin import BuiltinDataset, builtin_dataset
from dtengine.data.loader import DataConfig, ShardStream, resolve_shards
from dtengine.data.shards import MakeShardsReport, make_shards_from_folder, write_shards, write_wds_index
from dtengine.data.synthetic import SHAPE_CLASSES, render_sample

__all__ = [
    "SHAPE_CLASSES",
    "BuiltinDataset",
    "DataConfig",
    "MakeShardsReport",
    "ShardStream",
    "builtin_dataset",
    "make_shards_from_folder",
    "render_sample",
    "resolve_shards",
    "write_shards",
    "write_wds_index",
]
