"""A hub id as MODEL: resolved through huggingface-hub's cache (offline here, as on CI)."""

from __future__ import annotations

import shutil

import pytest

from kiln.compiler.config import resolve_model
from kiln.runtime.errors import KilnError


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty hub cache, offline. huggingface-hub reads its environment once at import (and
    transformers may have imported it already), so set its constants as well."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    return tmp_path


def _fill_cache(cache, repo_id: str, source) -> None:
    """Lay out `source` as huggingface-hub's cache would after a download of `repo_id`."""
    org, name = repo_id.split("/")
    repo = cache / f"models--{org}--{name}"
    commit = "0" * 40
    shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_hub_id_resolves_from_cache(offline_cache, checkpoint):
    _fill_cache(offline_cache, "kiln-test/tiny-llama", checkpoint("tiny-llama"))
    path = resolve_model("kiln-test/tiny-llama")
    assert (path / "config.json").is_file()
    assert (path / "model.safetensors").is_file()


def test_unknown_hub_id_offline_is_a_clear_error(offline_cache):
    with pytest.raises(KilnError, match=r"could not be fetched.*HF_HUB_OFFLINE"):
        resolve_model("kiln-test/no-such-model")


def test_missing_local_path_is_not_taken_for_a_hub_id():
    with pytest.raises(KilnError, match="does not exist"):
        resolve_model("./no/such/dir")
