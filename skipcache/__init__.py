"""skipcache: Skip Tuning for CLIP as a two-stage pipeline.

    import skipcache
    cached = skipcache.cache(skipcache.CacheConfig(dataset="synthetic", model="synth-vit", pretrained="synth"))
    run = skipcache.tune(skipcache.TuneConfig(store=cached.path, epochs=5, lr=1e-3))
    print(skipcache.evaluate(run.run_dir).accuracy)

Each stage is a function taking a config and returning a result; the CLI is a thin shell over
them. Names resolve lazily so that `import skipcache` stays cheap and the pretraining entry
point runs where zarr is not installed.

`import skipcache` also registers the built-in model configs (`tiny`, `synth-vit`) with
open_clip: at once if open_clip is already imported, else as soon as it is, without importing
it (or torch) here.
"""

import importlib.abc
import logging
import sys
from importlib import import_module
from pathlib import Path

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


_MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"


def register_model_configs(open_clip=None) -> None:
    """Add the built-in model configs to open_clip's registry (idempotent)."""
    if open_clip is None:
        import open_clip
    known = set(open_clip.list_models())
    for path in sorted(_MODEL_CONFIG_DIR.glob("*.json")):
        if path.stem not in known:
            open_clip.add_model_config(path)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Runs `register_model_configs` right after open_clip is first imported."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "open_clip":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, loader) -> None:
        self._loader = loader

    def __getattr__(self, name):  # resources, get_filename, ... of the real loader
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        if _HOOK in sys.meta_path:
            sys.meta_path.remove(_HOOK)
        try:
            register_model_configs(module)
        except Exception as exc:  # never break someone's `import open_clip`
            logging.getLogger(__name__).warning("could not register skipcache's model configs "
                                                "with open_clip: %s", exc)


_HOOK = _RegisterOnImport()
if isinstance(sys.modules.get("open_clip"), type(sys)):
    register_model_configs(sys.modules["open_clip"])
elif "open_clip" not in sys.modules and not any(isinstance(f, _RegisterOnImport)
                                                for f in sys.meta_path):
    sys.meta_path.insert(0, _HOOK)
