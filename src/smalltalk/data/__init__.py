"""Data: corpus readers, tokenizer, packed token shards and the `prepare` stage that ties them together.

The stage itself is ``smalltalk.data.prepare.prepare``; it is not re-exported here, so that
``from smalltalk.data import prepare`` keeps meaning the module. Its parts: `prepare_config` (settings and
presets), `sources` (corpus -> splits), `encode` (worker processes), `manifest` (the dataset on disk).
"""

from .manifest import load_manifest
from .prepare_config import PREPARE_PRESETS, PrepareConfig
from .readers import Document, ReadStats, iter_documents
from .shards import Shard, ShardWriter, TokenDataset
from .tokenizer import TextTokenizer, load_tokenizer, save_pretrained_tokenizer, train_tokenizer

__all__ = [
    "PREPARE_PRESETS", "PrepareConfig", "load_manifest",
    "Document", "ReadStats", "iter_documents",
    "Shard", "ShardWriter", "TokenDataset",
    "TextTokenizer", "load_tokenizer", "save_pretrained_tokenizer", "train_tokenizer",
]
