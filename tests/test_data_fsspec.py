"""Shards read over fsspec URLs give the same samples as the plain path."""

from __future__ import annotations

import fsspec
import pytest

from tests.data_fixtures import config, make_shards, stream, take


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("fsspec"), 90, 20)


@pytest.mark.timeout(60)
def test_file_url_matches_plain_path(shards):
    plain = take(stream(config(shards, num_workers=2)), 15)  # past the first epoch (12 steps)
    assert take(stream(config(f"file://{shards}", num_workers=2)), 15) == plain


@pytest.mark.timeout(60)
def test_memory_url_matches_plain_path(shards):
    mem = fsspec.filesystem("memory")
    root = "/fsspec-test-shards"
    for path in sorted(shards.iterdir()):
        mem.pipe_file(f"{root}/{path.name}", path.read_bytes())
    try:
        plain = take(stream(config(shards)), 15)
        # workers are forked, so they see the parent's in-memory filesystem
        assert take(stream(config(f"memory://{root}")), 15) == plain
        assert take(stream(config(f"memory://{root}", num_workers=2)), 15) == plain
        assert take(stream(config(f"memory://{root}/manifest.json")), 3) == plain[:3]
    finally:
        mem.rm(root, recursive=True)
