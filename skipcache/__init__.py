"""skipcache: Skip Tuning for CLIP as a two-stage pipeline.

    import skipcache
    cached = skipcache.cache(skipcache.CacheConfig(dataset="synthetic", model="synth-vit", pretrained="synth"))
    run = skipcache.tune(skipcache.TuneConfig(store=cached.path, epochs=5, lr=1e-3))
    print(skipcache.evaluate(run.run_dir).accuracy)

Each stage is a function taking a config and returning a result; the CLI is a thin shell over
them. Names resolve lazily so that `import skipcache` stays cheap and the pretraining entry
point runs where zarr is not installed.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "CacheConfig": "skipcache.stages.cache",
    "CacheResult": "skipcache.stages.cache",
    "cache": ("skipcache.stages.cache", "run_cache"),
    "TuneConfig": "skipcache.stages.tune",
    "TuneResult": "skipcache.stages.tune",
    "tune": ("skipcache.stages.tune", "run_tune"),
    "EvalResult": "skipcache.stages.evaluate",
    "evaluate": ("skipcache.stages.evaluate", "run_eval"),
    "export": ("skipcache.stages.export", "run_export"),
    "predict": ("skipcache.stages.export", "run_predict"),
    "FeatureStore": "skipcache.store",
    "CSkipConfig": "skipcache.cskip",
    "SkipcacheError": "skipcache.errors",
    "load_model": "skipcache.loading",
    "split_model": "skipcache.model",
    "get_dataset": "skipcache.data",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'skipcache' has no attribute {name!r}")
    module, attr = target if isinstance(target, tuple) else (target, name)
    return getattr(import_module(module), attr)
