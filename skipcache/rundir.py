"""The run directory format: what `tune` writes, how it resumes, how eval / export / predict open it.

The spec is `docs/run-format.md`; a change to what a version-1 reader reads needs a new
`FORMAT_VERSION` and a new golden fixture next to `tests/fixtures/run_v1/`.

Nothing in a run directory or a store is trusted as code or as a path to open blindly:
checkpoints are safetensors plus JSON (never a pickle), file names read back from JSON are
checked against fixed patterns, a store's weights source is used only when it reproduces the
store's weights hash, and names derived from store metadata are sanitized to one path component.

Public API:
    open_for_tune(cfg, store, out) -> TuneRun   the tune stage's handle (locks, config, resume)
    resume_store(cfg) -> FeatureStore | None    the store of the run `cfg.out` resumes
    default_out(key) -> Path                    runs/<dataset>-<model>-omega<w>-<time>, confined
    read_run(run_dir) -> (config, info)         config.json and run.json of a finished run, checked
    read_checkpoint(run_dir) -> Checkpoint      the latest checkpoint, verified, as tensors and JSON
    locate_store(run_dir, record) -> FeatureStore   the run's store, found and verified by key hash
    load_tuned(run_dir, device, store=None, full=False) -> TunedRun   a finished run, checked, loaded
    check_compatible(info, store)               another store fits the run (model, weights, omega)
    eval_file_name(store) -> str                eval.json name for another store, one component

Which weights a store's metadata may name, and loading them (`store_weights_source`,
`trusted_weights_source`, `load_deep_model`), belong to `skipcache.loading`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import MISSING, asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

from skipcache.baselines import DEFAULT_METHOD, get_method
from skipcache.errors import ConfigError, RunError, StoreError
from skipcache.loading import load_store_model, store_weights_source
from skipcache.placement import Placement
from skipcache.runtime import default_store_root, utc_now, write_text_atomic
from skipcache.store import FeatureStore, key_hash, store_path
from skipcache.store_layout import safe_component

FORMAT_VERSION = 1
CONFIG = "config.json"
RUN = "run.json"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.json"
WEIGHTS = "deep.safetensors"
LOCK = "tune.lock"
LEGACY_CHECKPOINT = "checkpoint.pt"
_TENSORS_RE = re.compile(r"checkpoint-e(\d{4,})\.safetensors")
_TMP_RE = re.compile(r"\..+\.tmp")
# TuneConfig fields that do not change what is trained: they may differ on --resume. Every other
# field (lr, seed, batch size, epochs, CSkip...) must match config.json. The store may move or be
# named differently; it must be the same store by key hash. Entries of config.json that are no
# longer TuneConfig fields (an old run's `workers`) are not compared.
RUNTIME_SETTINGS = frozenset({
    "store", "root", "dataset", "model", "omega", "out", "resume", "device", "precision",
    "pretrained", "progress", "checkpoint_every_s",
})
# Optimizer group entries that say how the update is computed on this device, not what it is.
_IMPLEMENTATION_KEYS = ("foreach", "fused", "differentiable", "capturable")


# ------------------------------------------------------------------------------- small helpers


def default_out(key: dict) -> Path:
    """`runs/<dataset>-<model>-omega<w>-<time>`: the part from the store key made one safe file
    name (`safe_component`), so the run stays directly under `runs/` whatever the key holds."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = safe_component(f"{key.get('dataset')}-{key.get('model')}-omega{key.get('omega')}", max_bytes=200)
    return Path("runs") / f"{name}-{stamp}"


def eval_file_name(store: FeatureStore) -> str:
    """`eval-<dataset>-<keyhash>.json`: the result file of a run evaluated on another store, one
    safe file name inside the run."""
    return f"eval-{safe_component(store.key.get('dataset'), max_bytes=200)}-{key_hash(store.key)}.json"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _replace_durably(tmp: Path, path: Path) -> None:
    """fsync `tmp`, rename it to `path` (atomic), fsync the folder."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _write_json_durably(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    _replace_durably(tmp, path)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> str:
    """Write a safetensors file atomically and durably; its sha256."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    digest = _sha256_file(tmp)
    _replace_durably(tmp, path)
    return digest


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunError(f"{what} {path} cannot be read ({type(exc).__name__}); restore it, or start a new --out") from None
    if not isinstance(data, dict):
        raise RunError(f"{what} {path} is not a JSON object; restore it, or start a new --out")
    return data


def _check_version(run_dir: Path, data: dict) -> None:
    version = data.get("format_version")
    if version is None:
        raise RunError(f"run {run_dir} has no format_version (written by an older skipcache); this skipcache reads "
                       f"version {FORMAT_VERSION}; retrain it with `skipcache tune`")
    if version != FORMAT_VERSION:
        raise RunError(f"run {run_dir} has run format version {version}; this skipcache reads version {FORMAT_VERSION}; "
                       "use the skipcache that wrote it, or retrain it")


def _jsonable(value: Any) -> Any:
    """JSON values; a nested config dataclass (CSkipConfig) becomes a dict of its fields."""
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    return json.loads(json.dumps(value, default=str))


# --------------------------------------------------------------------------- store of a run


def _store_record(store: FeatureStore, run_dir: Path) -> dict:
    """Where the run's store is: absolute, relative to the run directory, and its key."""
    absolute = os.path.abspath(store.path)
    return {"store": absolute, "store_relative": os.path.relpath(absolute, os.path.abspath(run_dir)),
            "store_key": _jsonable(store.key), "store_key_hash": key_hash(store.key)}


def locate_store(run_dir: Path, record: dict) -> FeatureStore:
    """The run's store: at its absolute path, else at its path relative to the run directory, else
    where `skipcache cache` would put it under the store root; each candidate must have the run's
    key hash. RunError naming every place tried otherwise."""
    run_dir = Path(run_dir)
    want = record.get("store_key_hash")
    candidates = []
    if record.get("store"):
        candidates.append(Path(record["store"]))
    if record.get("store_relative"):
        candidates.append(Path(os.path.normpath(Path(os.path.abspath(run_dir)) / record["store_relative"])))
    if isinstance(record.get("store_key"), dict):
        try:
            candidates.append(Path(os.path.abspath(store_path(default_store_root(), record["store_key"]))))
        except (ValueError, TypeError):
            pass
    seen, tried, wrong, broken = set(), [], [], []
    for path in candidates:
        if str(path) in seen:
            continue
        seen.add(str(path))
        if not path.exists():
            tried.append(str(path))
            continue
        try:
            store = FeatureStore.open(path)
        except StoreError as exc:  # damaged or incomplete: another candidate may still be the store
            broken.append(exc)
            continue
        found = key_hash(store.key)
        if found == want:
            return store
        wrong.append((path, found))
    if broken:
        raise broken[0]
    if wrong:
        path, found = wrong[0]
        raise RunError(f"store {path} is not the store run {run_dir} trained on (key hash {found}, the run's is {want}); "
                       "put the run's store back, or rebuild it with the same `skipcache cache` arguments")
    raise RunError(f"store of run {run_dir} (key hash {want}) is not at {' nor at '.join(tried) or 'any recorded path'}; "
                   "put it back, or rebuild it with the same `skipcache cache` arguments")


def check_compatible(info: dict, store: FeatureStore) -> None:
    """A run can be evaluated on another store (cross-dataset, domain shift) only if that store
    was cached with the same model, weights and omega: the tuned deep layers expect its tokens."""
    trained = info.get("store_key", {})
    for field in ("model", "weights_hash", "omega"):
        if store.key.get(field) != trained.get(field):
            raise RunError(
                f"store {store.path} was cached with {field}={store.key.get(field)!r}, the run trained on "
                f"{field}={trained.get(field)!r}; cache the target with the run's model, weights and --omega")


# ---------------------------------------------------------------------------- checkpoints


@dataclass
class Checkpoint:
    """The latest checkpoint of a run, verified: everything needed to continue training.

    Attributes:
        epoch: epochs completed.
        history: one metrics row per completed epoch.
        deep: the deep weights under open_clip's keys.
        optimizer: a state dict for `optimizer.load_state_dict` (tensors on the CPU).
        generator: the CSkip generator's state (uint8), or None when the run had none.
        store_key_hash: the store it trained on.
        manifest: checkpoint.json as read.
    """

    epoch: int
    history: list[dict]
    deep: dict[str, torch.Tensor]
    optimizer: dict
    generator: torch.Tensor | None
    store_key_hash: str
    manifest: dict


def _damaged(run_dir: Path, why: str) -> RunError:
    return RunError(f"checkpoint of run {run_dir} is damaged: {why}; start a new --out "
                    f"(or delete {CHECKPOINT} to retrain this run from scratch)")


def read_checkpoint(run_dir: Path) -> Checkpoint:
    """Read checkpoint.json and the tensors file it names, checking name, sha256 and contents;
    nothing is unpickled."""
    run_dir = Path(run_dir)
    manifest = _read_json(run_dir / CHECKPOINT, "checkpoint manifest")
    _check_version(run_dir, manifest)
    name = manifest.get("tensors")
    if not isinstance(name, str) or not _TENSORS_RE.fullmatch(name):
        raise _damaged(run_dir, f"{CHECKPOINT} names tensors file {name!r}, not checkpoint-eNNNN.safetensors in the run")
    path = run_dir / name
    if not path.is_file():
        raise _damaged(run_dir, f"{name}, named by {CHECKPOINT}, is missing")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != manifest.get("sha256"):
        raise _damaged(run_dir, f"{name} does not match the sha256 in {CHECKPOINT}")
    try:
        tensors = load_safetensors_bytes(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise _damaged(run_dir, f"{name} is not a safetensors file ({str(exc)[:100]})") from None
    epoch, history = manifest.get("epoch"), manifest.get("history")
    if not isinstance(epoch, int) or epoch < 0 or not isinstance(history, list) or len(history) != epoch:
        raise _damaged(run_dir, f"{CHECKPOINT} has epoch {epoch!r} and {len(history) if isinstance(history, list) else '?'} history rows")
    deep = {k[len("deep."):]: v for k, v in tensors.items() if k.startswith("deep.")}
    opt = manifest.get("optimizer", {})
    state: dict[int, dict] = {}
    for idx, values in opt.get("state", {}).items():
        state[int(idx)] = dict(values)
    for k, v in tensors.items():
        if k.startswith("optimizer."):
            _, idx, field = k.split(".", 2)
            state.setdefault(int(idx), {})[field] = v
    return Checkpoint(epoch=epoch, history=history, deep=deep,
                      optimizer={"state": state, "param_groups": opt.get("param_groups", [])},
                      generator=tensors.get("rng.generator"), store_key_hash=str(manifest.get("store_key_hash")),
                      manifest=manifest)


# -------------------------------------------------------------------------- the tune handle


def _settings(cfg) -> dict:
    """cfg's fields as JSON values, with the image learning rate resolved."""
    out = {f.name: _jsonable(getattr(cfg, f.name)) for f in fields(cfg)}
    if "lr_image" in out and out["lr_image"] is None and "lr" in out:
        out["lr_image"] = cfg.lr / 4
    return out


def _default_of(cfg, name: str):
    for f in fields(cfg):
        if f.name == name:
            if f.default is not MISSING:
                return _jsonable(f.default)
            if f.default_factory is not MISSING:  # type: ignore[misc]
                return _jsonable(f.default_factory())  # type: ignore[misc]
    return None


def changed_settings(cfg, saved: dict) -> list[str]:
    """`name old -> new` for every training setting of `cfg` that differs from config.json
    (nested settings by their dotted name: `cskip.r 0.5 -> 0.3`)."""
    now = _settings(cfg)
    changes = []
    for name, new in now.items():  # one level of nesting (the CSkip settings)
        old = saved.get(name, _default_of(cfg, name))
        if isinstance(new, dict) and isinstance(old, dict) and name not in RUNTIME_SETTINGS:
            changes += [f"{name}.{k} {old.get(k)!r} -> {v!r}" for k, v in new.items() if old.get(k) != v]
            now[name] = old  # reported field by field above
    lr_changed = "lr" in now and saved.get("lr", _default_of(cfg, "lr")) != now["lr"]
    for name, new in now.items():
        if name in RUNTIME_SETTINGS:
            continue
        old = saved.get(name, _default_of(cfg, name))
        if old == new:
            continue
        if name == "lr_image" and lr_changed and getattr(cfg, "lr_image", None) is None:
            continue  # follows lr (lr / 4): reported as the lr change
        changes.append(f"{name} {old!r} -> {new!r}")
    return changes


def _state(out: Path) -> tuple[str, dict | None]:
    """What `out` holds: missing, empty, foreign, legacy, started, checkpointed or finished."""
    if not out.exists():
        return "missing", None
    if not out.is_dir():
        raise RunError(f"--out {out} is a file; pass a folder for the run")
    names = {p.name for p in out.iterdir()} - {LOCK}
    names = {n for n in names if not _TMP_RE.fullmatch(n)}
    if LEGACY_CHECKPOINT in names:
        return "legacy", None
    if not names:
        return "empty", None
    if CONFIG not in names:
        return "foreign", None
    config = _read_json(out / CONFIG, "run config")
    _check_version(out, config)
    if RUN in names and _read_json(out / RUN, "run record").get("status") == "complete":
        return "finished", config
    if CHECKPOINT in names:
        return "checkpointed", config
    return "started", config


class TuneRun:
    """A run directory opened by the tune stage: locked, config.json written, resume decided.

    Attributes:
        path: the run directory.
        resuming: True when a checkpoint is to be loaded (`load_checkpoint`).
        config: what config.json holds.
    """

    def __init__(self, path: Path, resuming: bool, config: dict, lock_fd: int | None):
        self.path, self.resuming, self.config = path, resuming, config
        self._lock_fd = lock_fd
        self._weights_sha256: str | None = None
        self.finished = False  # set by open_for_tune: --resume of a run that has already finished

    # -- resume

    def load_checkpoint(self, deep, optimizer: torch.optim.Optimizer, generator: torch.Generator | None,
                        store: FeatureStore) -> tuple[int, list[dict]]:
        """Restore weights, optimizer and generator from the latest checkpoint; (epoch, history)."""
        ckpt = read_checkpoint(self.path)
        if ckpt.store_key_hash != key_hash(store.key):
            raise RunError(f"checkpoint in {self.path} was trained on another store ({ckpt.store_key_hash}); use a new --out")
        deep.load_deep_state_dict(ckpt.deep)
        current = optimizer.state_dict()
        groups = ckpt.optimizer["param_groups"]
        if len(groups) != len(current["param_groups"]):
            raise _damaged(self.path, f"{len(groups)} optimizer groups saved, {len(current['param_groups'])} expected")
        for saved, now in zip(groups, current["param_groups"]):
            for k in _IMPLEMENTATION_KEYS:  # keep this device's implementation of the same update
                if k in now:
                    saved[k] = now[k]
        optimizer.load_state_dict(ckpt.optimizer)
        if generator is not None and ckpt.generator is not None:
            generator.set_state(ckpt.generator.cpu())
        return ckpt.epoch, ckpt.history

    # -- writing

    def save_checkpoint(self, epoch: int, deep, optimizer: torch.optim.Optimizer, generator: torch.Generator | None,
                        history: list[dict], store: FeatureStore) -> None:
        """Write the checkpoint of `epoch` (tensors file, then checkpoint.json: the commit), drop
        older tensors files, rewrite metrics.jsonl from `history`."""
        tensors = {f"deep.{k}": v.detach().cpu().contiguous() for k, v in deep.deep_state_dict().items()}
        sd = optimizer.state_dict()
        scalars: dict[str, dict] = {}
        for idx, values in sd["state"].items():
            for field, v in values.items():
                if torch.is_tensor(v):
                    tensors[f"optimizer.{idx}.{field}"] = v.detach().cpu().contiguous().clone()
                elif v is not None:
                    scalars.setdefault(str(idx), {})[field] = _jsonable(v)
        if generator is not None:
            tensors["rng.generator"] = generator.get_state().cpu().contiguous()
        name = f"checkpoint-e{epoch:04d}.safetensors"
        digest = _save_tensors(tensors, self.path / name)
        _write_json_durably(self.path / CHECKPOINT, {
            "format_version": FORMAT_VERSION, "epoch": epoch, "tensors": name, "sha256": digest,
            "history": _jsonable(history), "store_key_hash": key_hash(store.key), "saved_utc": utc_now(),
            "optimizer": {"param_groups": _jsonable(sd["param_groups"]), "state": scalars},
        })
        for old in self.path.glob("checkpoint-e*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)
        # Rewritten from the checkpointed history, so a kill at any point never duplicates or loses a line.
        write_text_atomic(self.path / METRICS, "".join(json.dumps(r) + "\n" for r in history))

    def write_metrics(self, history: list[dict]) -> None:
        """metrics.jsonl from `history` alone, for an epoch that is not checkpointed (a resume from
        the last checkpoint rewrites it from that checkpoint's history: no line is duplicated)."""
        write_text_atomic(self.path / METRICS, "".join(json.dumps(r) + "\n" for r in history))

    def write_weights(self, deep, store: FeatureStore) -> None:
        """deep.safetensors: the tuned deep weights under open_clip's keys (sha256 kept for run.json)."""
        self._weights_sha256 = _save_tensors(deep.deep_state_dict(), self.path / WEIGHTS,
                                             metadata={"omega": str(deep.omega), "model": str(store.key["model"])})

    def finish(self, store: FeatureStore, record: dict) -> None:
        """run.json (the run's commit point), after `write_weights`; releases the lock."""
        if self._weights_sha256 is None:
            raise RuntimeError("write_weights must come before finish")
        info = dict(_jsonable(record))
        info.update(_store_record(store, self.path), format_version=FORMAT_VERSION, status="complete",
                    weights=WEIGHTS, weights_sha256=self._weights_sha256)
        _write_json_durably(self.path / RUN, info)
        self.close()

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _lock(out: Path) -> int | None:
    """Hold `tune.lock` in `out` (a POSIX record lock: released when the process ends, however)."""
    try:
        import fcntl
    except ImportError:  # no fcntl (Windows): no lock
        return None
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        try:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        except OSError:
            holder = "?"
        os.close(fd)
        raise RunError(f"run directory {out} is in use by another `skipcache tune` (pid {holder}); "
                       "wait for it to end, or pass another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _decide(out: Path, resume: bool) -> tuple[str, dict | None]:
    """The state of `out` if tune may go on there with `resume`; RunError otherwise."""
    state, config = _state(out)
    if state == "legacy":
        raise RunError(f"run {out} has a {LEGACY_CHECKPOINT} from an older skipcache; pickle checkpoints are never loaded "
                       "(they can run code); start a new --out")
    if state in ("missing", "empty") and resume:
        raise RunError(f"nothing to resume in {out}: no {CHECKPOINT}; drop --resume to start a new run")
    if state == "foreign":
        if resume:
            raise RunError(f"nothing to resume in {out}: it is not a run directory (no {CONFIG}); pass the --out of a `skipcache tune` run")
        raise RunError(f"run directory {out} is not empty and holds no run (no {CONFIG}); pass a new or empty folder as --out")
    if state == "checkpointed" and not resume:
        epoch = _read_json(out / CHECKPOINT, "checkpoint manifest").get("epoch", "?")
        raise RunError(f"run directory {out} holds an unfinished run (checkpoint at epoch {epoch} of "
                       f"{config.get('epochs', '?')}); pass --resume to continue it or --out for a new run")
    if state == "finished" and not resume:
        raise RunError(f"run directory {out} is not empty; pass --resume to continue it or --out for a new run")
    return state, config


def _clean(out: Path, *, keep: str | None) -> None:
    """Remove what a killed writer may have left: temporary files, tensors files other than `keep`;
    with keep=None (a restart) also the outputs of the abandoned attempt."""
    for p in out.iterdir():
        if _TMP_RE.fullmatch(p.name) and p.is_file():
            p.unlink(missing_ok=True)
        elif _TENSORS_RE.fullmatch(p.name) and p.name != keep:
            p.unlink(missing_ok=True)
    if keep is None:
        for name in (METRICS, WEIGHTS):
            (out / name).unlink(missing_ok=True)


def open_for_tune(cfg, store: FeatureStore, out: Path) -> TuneRun:
    """Open `out` for the tune stage with settings `cfg` (a TuneConfig) on `store`.

    - new or empty folder: a fresh run (`--resume` refused: nothing to resume);
    - config.json but no checkpoint yet (killed before its first epoch ended): started again
      from scratch, with or without `--resume` (with it, the settings must match);
    - a checkpoint: continued with `--resume` only, with the same training settings and store;
    - a finished run: `--resume` finds nothing to do (`.finished`); its outputs stay as they are;
    - anything else (other files, an old pickle checkpoint, another format version): refused.

    The folder is locked (`tune.lock`) for the life of the returned handle, so two tune
    processes never write one run.
    """
    out = Path(out)
    _decide(out, cfg.resume)  # refuse early, before creating anything
    out.mkdir(parents=True, exist_ok=True)
    fd = _lock(out)
    try:
        state, saved = _decide(out, cfg.resume)  # again, under the lock
        record = _store_record(store, out)
        if cfg.resume and saved is not None:
            changes = changed_settings(cfg, saved)
            if changes:
                raise ConfigError(f"--resume: settings differ from the run's {CONFIG}: {', '.join(changes)}; "
                                  "drop them or start a new --out")
            if saved.get("store_key_hash") not in (None, record["store_key_hash"]):
                raise RunError(f"run {out} trained on store {saved.get('store')} (key hash {saved.get('store_key_hash')}), "
                               f"not {store.path} (key hash {record['store_key_hash']}); pass the run's store, or start a new --out")
        resuming = state in ("checkpointed", "finished") and cfg.resume
        if resuming:
            # Same settings: only the store's whereabouts may have changed.
            config = {**saved, **{k: record[k] for k in ("store", "store_relative")}}
            if not (out / CHECKPOINT).exists():
                raise RunError(f"finished run {out} has no {CHECKPOINT} to resume from; it is complete: drop --resume")
            keep = _read_json(out / CHECKPOINT, "checkpoint manifest").get("tensors")
            _clean(out, keep=keep if isinstance(keep, str) else None)
        else:
            config = {**_settings(cfg), **record, "out": os.path.abspath(out), "format_version": FORMAT_VERSION,
                      "created_utc": utc_now()}
            _clean(out, keep=None)
        if config != saved:
            _write_json_durably(out / CONFIG, config)
        handle = TuneRun(out, resuming, config, fd)
        handle.finished = resuming and state == "finished"
        return handle
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise


def resume_store(cfg) -> FeatureStore | None:
    """With `--resume --out DIR` and no store named, the store DIR's config.json records (found
    and verified as in `locate_store`); None when that does not apply."""
    if not cfg.resume or cfg.store is not None or not cfg.out:
        return None
    out = Path(cfg.out)
    if not (out / CONFIG).is_file() or (out / LEGACY_CHECKPOINT).exists():
        return None
    config = _read_json(out / CONFIG, "run config")
    if config.get("format_version") != FORMAT_VERSION or not config.get("store_key_hash"):
        return None  # open_for_tune says what is wrong
    return locate_store(out, config)


# ------------------------------------------------------------------------ finished runs


def read_run(run_dir: Path) -> tuple[dict, dict]:
    """(config.json, run.json) of a finished run of this format version; RunError otherwise."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise RunError(f"{run_dir} is not a run directory (no {CONFIG}); pass the --out of a `skipcache tune` run")
    if not (run_dir / RUN).is_file() or not (run_dir / WEIGHTS).is_file():
        raise RunError(f"run {run_dir} has not finished (no {RUN} / {WEIGHTS}); finish it with `skipcache tune --out {run_dir} --resume`")
    config, info = _read_json(run_dir / CONFIG, "run config"), _read_json(run_dir / RUN, "run record")
    _check_version(run_dir, info)
    _check_version(run_dir, config)
    if info.get("status") != "complete":
        raise RunError(f"run {run_dir} has not finished (status {info.get('status')!r}); finish it with "
                       f"`skipcache tune --out {run_dir} --resume`")
    if not isinstance(info.get("store_key"), dict) or key_hash(info["store_key"]) != info.get("store_key_hash"):
        raise RunError(f"{RUN} of run {run_dir} is inconsistent (its store_key does not hash to store_key_hash); retrain it")
    return config, info


def _read_weights(run_dir: Path, info: dict) -> dict[str, torch.Tensor]:
    data = (run_dir / WEIGHTS).read_bytes()
    if hashlib.sha256(data).hexdigest() != info.get("weights_sha256"):
        raise RunError(f"{WEIGHTS} does not match the sha256 in {RUN} of run {run_dir} (damaged or replaced); "
                       "restore it, or retrain the run")
    try:
        return load_safetensors_bytes(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise RunError(f"{WEIGHTS} of run {run_dir} cannot be read ({str(exc)[:100]}); retrain the run") from None


@dataclass
class TunedRun:
    """A finished run, checked and loaded.

    Attributes:
        run_dir: the run directory.
        config: its config.json; `info`: its run.json.
        store: the store to use (the run's own, or the compatible one passed in).
        deep: the tuned model, eval mode, on the device (unless loaded with full=True): a DeepCLIP
            for Skip Tuning, FT and LoRA (merged), the method's model for CoOp and CLIP-Adapter;
            eval calls its `encode_image` and `encode_classes`.
        full: the whole open_clip model with the tuned weights merged in, as a LoadedModel (full=True).
        head: how `full` classifies raw images (`skipcache.baselines.Head`: plain CLIP, CoOp's
            learned prompts, CLIP-Adapter's adapter) and what export writes beside it (full=True).
        method: the method that trained the run (`skipcache.baselines`; `skip-tuning` for runs
            that predate the field).
    """

    run_dir: Path
    config: dict
    info: dict
    store: FeatureStore
    deep: Any = None
    full: Any = None
    head: Any = None
    method: str = DEFAULT_METHOD


def run_method_options(config: dict, info: dict) -> tuple[str, dict]:
    """(method name, its options as resolved when the run trained): run.json's record over config.json's."""
    name = config.get("method", DEFAULT_METHOD)
    options = {**(config.get("method_options") or {}), **(info.get("method_options") or {})}
    return name, options


def load_tuned(run_dir: Path, device: torch.device | str = "cpu", store: FeatureStore | Path | None = None, *,
               full: bool = False) -> TunedRun:
    """Open a finished run for eval, export or predict.

    Checks the format version, that the run finished, the sha256 of deep.safetensors, and the
    store: the run's own (found by `locate_store`, verified by key hash) when `store` is None,
    else `store` must be compatible (`check_compatible`). Then builds the deep model on `device`
    (or, with full=True, the whole open_clip model on the CPU) with the tuned weights.
    """
    run_dir = Path(run_dir)
    config, info = read_run(run_dir)
    if store is None:
        store = locate_store(run_dir, info)
    else:
        store = store if isinstance(store, FeatureStore) else FeatureStore.open(Path(store))
        check_compatible(info, store)
    weights = _read_weights(run_dir, info)
    source = store_weights_source(store, config.get("pretrained"),
                                  hint="put the weights file back where it was cached from, or retrain with --pretrained FILE")
    name, options = run_method_options(config, info)
    try:
        method = get_method(name)
        options = method.resolve_options(options)
    except ConfigError as exc:
        raise RunError(f"run {run_dir} was trained by a method this skipcache does not know ({exc}); use the skipcache that wrote it") from None
    if full:
        lm = load_store_model(store, source)
        try:
            head = method.full_head(lm.model, weights, options)
        except RunError as exc:
            raise RunError(f"run {run_dir}: {exc}") from None
        return TunedRun(run_dir, config, info, store, full=lm, head=head, method=name)
    place = Placement(torch.device(device) if isinstance(device, str) else device)
    model, _ = method.build(store, place, source, options)
    model.load_deep_state_dict(weights)
    return TunedRun(run_dir, config, info, store, deep=method.eval_model(model).eval(), method=name)
