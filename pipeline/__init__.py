"""Shard builder: VFHQ / CelebV-HQ clips -> annotated WebDataset shards plus a parquet index."""

__version__ = "0.1.0"
