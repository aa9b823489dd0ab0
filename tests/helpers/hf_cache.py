"""Small Hugging Face caches, laid out as a real download would have left them.

``build_hf_cache`` prepares a dataset in the ``datasets`` cache the way
``load_dataset(NAME, CONFIG)`` leaves a Hub dataset with Parquet data: the packaged Parquet
builder with the Hub's config (``configure_builder_class``, as ``HubDatasetModuleFactory``
does), written to ``<cache>/<namespace>___<name>/<config>/0.0.0/<commit>``. Offline,
``load_dataset(NAME, CONFIG, split=...)`` then finds it through its fallback to the cache.

``build_hub_file`` puts one repository file in the ``huggingface_hub`` cache the way
``hf_hub_download`` does (blob, snapshot link, ``refs/main``); ``datasets`` downloads the data
files of ``load_dataset(REPO, data_files=...)`` there.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def _commit(*parts) -> str:
    return hashlib.sha1(repr(parts).encode()).hexdigest()


def build_hf_cache(cache_dir: str | Path, name: str, config: str | None, split: str,
                   rows: dict[str, list], commit: str | None = None) -> Path:
    """Prepares ``rows`` (column -> values) as ``split`` of ``name`` / ``config`` (None: the
    ``default`` config) in the datasets cache ``cache_dir``; returns the prepared folder.
    One call prepares one config with one split."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets.data_files import DataFilesDict
    from datasets.load import configure_builder_class
    from datasets.naming import camelcase_to_snakecase
    from datasets.packaged_modules.parquet.parquet import Parquet, ParquetConfig

    config_name = config or "default"
    commit = commit or _commit(name, config_name, split, rows)
    namespace, _, short = name.rpartition("/")
    folder = camelcase_to_snakecase(short)
    if namespace:
        folder = f"{namespace}___{folder}"
    with tempfile.TemporaryDirectory() as src:
        # The Hub's data file; gone after preparing, as the loader must not need it.
        data_file = os.path.join(src, f"{split}-00000-of-00001.parquet")
        pq.write_table(pa.table(rows), data_file)
        files = DataFilesDict.from_local_or_remote({split: [data_file]})
        builder_cls = configure_builder_class(
            Parquet, [ParquetConfig(name=config_name, data_files=files)],
            default_config_name=config_name, dataset_name=short)
        builder = builder_cls(cache_dir=str(cache_dir), dataset_name=short,
                              config_name=config_name, hash=commit)
        out = Path(cache_dir, folder, builder.config_id, str(builder.config.version), commit)
        builder.download_and_prepare(output_dir=str(out))
    return out


def build_hub_file(hub_cache: str | Path, repo_id: str, filename: str, content: bytes,
                   repo_type: str = "dataset", commit: str | None = None) -> Path:
    """Stores ``content`` as ``filename`` of ``repo_id`` in the hub cache ``hub_cache``, at
    ``commit`` which ``refs/main`` points to; returns the snapshot path."""
    commit = commit or _commit(repo_id, filename)
    repo = Path(hub_cache, f"{repo_type}s--{repo_id.replace('/', '--')}")
    blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(content)
    snapshot = repo / "snapshots" / commit / filename
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    if snapshot.is_symlink() or snapshot.exists():
        snapshot.unlink()
    snapshot.symlink_to(os.path.relpath(blob, snapshot.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot
