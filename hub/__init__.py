"""Released model names -> local model directories: download, resume, safe extraction, cache.

    import hub
    d = hub.resolve_model("gpt2ja-small")    # the cached directory, downloaded when missing
    m = hub.load("gpt2ja-small")             # the same, then model.load(d)

A name that is an existing directory is used as it is.  No TensorFlow is
imported here except to check a freshly extracted checkpoint.
"""
from .download import (RELEASED_MODELS, cache_dir, cached_model_dir, cached_models, download_model, is_released,
                       model_path, model_urls, offline, remove_model, resolve_model)

__all__ = ["RELEASED_MODELS", "cache_dir", "cached_model_dir", "cached_models", "download_model", "is_released",
           "model_path", "model_urls", "offline", "remove_model", "resolve_model", "load"]


def load(name_or_dir, device=None, download: bool = True):
    """``model.load`` of a model directory or a released name (downloaded into the cache when missing)."""
    import model

    return model.load(str(resolve_model(name_or_dir, download=download)), device=device)
