"""Data: the built-in shapes dataset, WebDataset shard writing, the deterministic, resumable shard stream, labelled
splits held in memory, and flips."""

from dtengine.data.augment import flip_where, random_flip_mask
from dtengine.data.builtin import BuiltinDataset, builtin_dataset
from dtengine.data.labelled import LabelledSplit, load_labelled_split
from dtengine.data.shard_stream import BatchCursor, DataConfig, ShardStream, resolve_shards
from dtengine.data.shards import MakeShardsReport, make_shards_from_folder, write_shards, write_wds_index
from dtengine.data.synthetic import SHAPE_CLASSES, render_sample

__all__ = [
    "SHAPE_CLASSES",
    "BatchCursor",
    "BuiltinDataset",
    "DataConfig",
    "LabelledSplit",
    "MakeShardsReport",
    "ShardStream",
    "builtin_dataset",
    "flip_where",
    "load_labelled_split",
    "make_shards_from_folder",
    "random_flip_mask",
    "render_sample",
    "resolve_shards",
    "write_shards",
    "write_wds_index",
]
