"""The `skipcache` command line: a thin typer shell over the stage functions.

Each command parses its options into a config, calls one library function and prints the result
(a rich table, or one JSON document on stdout with `--json`). A `SkipcacheError` becomes a
one-line `error: ...` on stderr and a non-zero exit code; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from skipcache.errors import ConfigError, SkipcacheError
from skipcache.model import DEFAULT_OMEGA
from skipcache.runtime import DATA_ENV, STORE_ENV, default_store_root

out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)  # scripts: no broken paths
err = Console(stderr=True, soft_wrap=True)


# Library errors name config fields; these are the `tune` flags that set the nested ones.
FLAGS_OF_FIELDS = {"cskip.r": "--r", "cskip.lam": "--lam", "cskip.max_top": "--max-top",
                   "cskip.variant": "--cskip-variant", "cskip.subset": "--cskip-subset"}


def _print_error(message: str) -> None:
    for name, flag in FLAGS_OF_FIELDS.items():
        if message.startswith(name + " "):
            message = f"{flag} ({name}){message[len(name):]}"
            break
    # The message is plain text: escape it, or rich eats `[...]` in it as markup.
    err.print(f"[red]error:[/red] {escape(message)}", markup=True, highlight=False, soft_wrap=True)


class _OneLineUsageErrors(TyperGroup):
    """A malformed command line (unknown option, value of the wrong type, missing argument) is one
    `error: ...` line that points at `--help`, like every other user error, not a framed usage block."""

    # typer ships its own click; its usage errors all derive from BadParameter's base class.
    _usage_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")

    @classmethod
    def _guard(cls, call):
        try:
            return call()
        except cls._usage_error as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":
                raise  # `skipcache` alone prints the help
            where = exc.ctx.command_path if exc.ctx is not None else "skipcache"
            _print_error(f"{exc.format_message().rstrip('.')}; see `{where} --help`")
            raise typer.Exit(exc.exit_code) from None

    def make_context(self, *args, **kwargs):
        return self._guard(lambda: super(_OneLineUsageErrors, self).make_context(*args, **kwargs))

    def invoke(self, ctx):
        return self._guard(lambda: super(_OneLineUsageErrors, self).invoke(ctx))


app = typer.Typer(cls=_OneLineUsageErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Skip Tuning for CLIP: cache the frozen shallow layers once, fine-tune the deep layers many times.")

RootOpt = typer.Option(None, "--root", help=f"Store root (default: ${STORE_ENV} or ./store).")
DeviceOpt = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda or cuda:N.")
JsonOpt = typer.Option(False, "--json", help="Print one JSON document on stdout and nothing else there.")


def _root(root: Optional[Path]) -> Path:
    """The store root: --root, else $SKIPCACHE_STORE, else ./store; refused if it is a file."""
    path = root if root is not None else default_store_root()
    if path.exists() and not path.is_dir():
        if root is None and os.environ.get(STORE_ENV):
            raise ConfigError(f"store root {path} (from ${STORE_ENV}) is a file, not a folder; "
                              f"set {STORE_ENV} to a folder or pass --root DIR")
        raise ConfigError(f"store root {path} is a file, not a folder; pass --root DIR or set {STORE_ENV} to a folder")
    return path


def _store(store: Path, root: Optional[Path]) -> Path:
    """A store path as given, else relative to the store root (`skipcache ls` prints them so)."""
    def exists(p: Path) -> bool:
        return p.exists() or Path(f"{p}.partial").exists()

    if store.is_absolute() or exists(store):
        return store
    under_root = _root(root) / store
    return under_root if exists(under_root) else store


def _at_least(option: str, value: int, low: int, fix: str) -> None:
    """A CLI-only setting (no config checks it) below its minimum is a one-line error."""
    if value < low:
        raise ConfigError(f"{option} must be >= {low}, got {value}; {fix}")


def _device(device: str) -> str:
    """Check --device before anything is read or written (unknown names, CUDA missing)."""
    from skipcache.runtime import resolve_device

    resolve_device(device)
    return device


def handle_errors(fn):
    """Turn a SkipcacheError into `error: <message>` on stderr and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SkipcacheError as exc:
            _print_error(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted: completed shards/epochs are kept; rerun the same command (tune: add --resume) to continue")
            raise typer.Exit(130) from None

    return wrapper


def _parse_options(pairs: list[str]) -> dict:
    """KEY=VALUE strings to a dict; values that parse as JSON (numbers, true/false) are converted."""
    from skipcache.errors import ConfigError

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"dataset option {pair!r} is not KEY=VALUE; e.g. -o num_classes=10")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _table(title: str, columns: list[str], rows: list[list]) -> Table:
    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*[Text("–" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)) for v in r])  # Text: no markup in user strings
    return table


@app.command()
@handle_errors
def cache(
    dataset: str = typer.Option(..., "--dataset", help="Dataset name (see `skipcache datasets`)."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help=f"Dataset folder (default: ${DATA_ENV})."),
    option: list[str] = typer.Option([], "--option", "-o", help="Dataset option KEY=VALUE, e.g. -o num_classes=10 (repeatable)."),
    model: str = typer.Option("ViT-B-16", "--model", help="open_clip model name, or local-dir:DIR."),
    pretrained: str = typer.Option("openai", "--pretrained", help="openai (or another open_clip tag), synth, a weights file, or none."),
    omega: int = typer.Option(DEFAULT_OMEGA, "--omega", help="Frozen blocks per tower (0..N)."),
    shots: int = typer.Option(16, "--shots", help="Training images per class (0: all)."),
    seed: int = typer.Option(1, "--seed", help="Seed of the few-shot sample and the augmentation."),
    classes: str = typer.Option("base", "--classes", help="base: train on base classes, test base and new; all: every class."),
    views: int = typer.Option(1, "--views", help="Augmented views per training image (1: no augmentation)."),
    dtype: str = typer.Option("float16", "--dtype", help="Storage dtype: float16, bfloat16 or float32."),
    template: Optional[str] = typer.Option(None, "--template", help="Prompt template with {} (overrides --templates)."),
    templates: str = typer.Option("coop", "--templates", help="Named prompt set: coop (CoOp's per-dataset prompts) or skipt (the Skip Tuning authors')."),
    sampler: str = typer.Option("stable", "--sampler", help="Few-shot sampler: stable (per-class, order-independent) or coop (CoOp's picks, image for image)."),
    root: Optional[Path] = RootOpt,
    force: bool = typer.Option(False, "--force", help="Rebuild even if a complete store with this key exists."),
    device: str = DeviceOpt,
    batch_size: int = typer.Option(64, "--batch-size", help="Images per forward pass."),
    workers: int = typer.Option(0, "--workers", help="Image-decoding worker processes."),
    as_json: bool = JsonOpt,
):
    """Run the frozen layers 1..omega once and write a feature store (resumes if interrupted)."""
    from skipcache.stages.cache import CacheConfig, result_dict, run_cache

    _at_least("--workers", workers, 0, "pass 0 to decode images in the main process")
    cfg = CacheConfig(dataset=dataset, data_root=data_root, dataset_options=_parse_options(option), model=model, pretrained=pretrained, omega=omega,
                      shots=shots, seed=seed, classes=classes, views=views, dtype=dtype, template=template,
                      templates=templates, sampler=sampler,
                      root=_root(root), force=force, device=_device(device), batch_size=batch_size, workers=workers,
                      progress=not as_json)
    result = run_cache(cfg)
    if as_json:
        return _print_json(result_dict(result))
    verb = "reused existing store" if result.reused else f"cached in {result.seconds:.1f} s ({result.images_per_s:.1f} img/s)"
    out.print(f"{verb}: {result.path}")
    out.print(_table("zero-shot top-1 (%)", ["split", "images", "accuracy"],
                     [[s, result.rows[s], result.zeroshot_acc.get(s, float('nan'))] for s in result.rows]))


@app.command()
@handle_errors
def tune(
    store: Optional[Path] = typer.Argument(None, help="Store path (default: newest complete store under --root)."),
    method: str = typer.Option("skip-tuning", "--method", help="skip-tuning (default), ft (store at omega 0), ft-lskip, ft-cskip, fast (omega N-N/4, r 0.25), coop, clip-adapter, lora, paper-schedule or ft-conventional (stores at omega 0); see docs/baselines.md."),
    method_option: Optional[list[str]] = typer.Option(None, "--method-option", metavar="KEY=VALUE", help="A setting of the method as KEY=VALUE, repeatable: e.g. rank=8 (lora), n_ctx=4 or full_context=true (coop), omega=6 (paper-schedule)."),
    root: Optional[Path] = RootOpt,
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Pick the newest store of this dataset."),
    model: Optional[str] = typer.Option(None, "--model", help="Pick the newest store of this model."),
    omega: Optional[int] = typer.Option(None, "--omega", help="Pick the newest store with this omega."),
    epochs: int = typer.Option(20, "--epochs"),
    batch_size: int = typer.Option(4, "--batch-size"),
    lr: float = typer.Option(2e-5, "--lr", help="Learning rate of the text side."),
    lr_image: Optional[float] = typer.Option(None, "--lr-image", help="Learning rate of the image side (default lr/4)."),
    warmup_epochs: Optional[int] = typer.Option(None, "--warmup-epochs", help="Epochs at constant --warmup-lr before the cosine schedule (default: 1, or 0 when --epochs is 1)."),
    warmup_lr: float = typer.Option(1e-6, "--warmup-lr", help="Learning rate of the warm-up epochs, >= 0."),
    weight_decay: float = typer.Option(5e-4, "--weight-decay", help="SGD weight decay, >= 0 (paper: 5e-4)."),
    momentum: float = typer.Option(0.9, "--momentum", help="SGD momentum, in [0, 1) (paper: 0.9)."),
    r: float = typer.Option(0.5, "--r", help="CSkip ratio of always-kept classes, in (0, 1]; with --cskip-variant paper-code r > 1 is a count of classes, as in the authors' code."),
    lam: float = typer.Option(0.3, "--lam", help="CSkip decay of the tail keep probability, > 0."),
    max_top: int = typer.Option(50, "--max-top", help="Cap on CSkip's always-kept set (the authors' code: 50; changes nothing while r*M <= 50)."),
    no_cap: bool = typer.Option(False, "--no-cap", help="No cap on the always-kept set: paper Eq. 7 as written (r*M classes always kept)."),
    cskip_variant: str = typer.Option("eq7", "--cskip-variant", help="eq7 (resampled every step) or paper-code."),
    cskip_subset: str = typer.Option("batch", "--cskip-subset", help="batch (one fixed-size subset per step, shared by the batch) or image (one per image; the text tower runs on their union)."),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16."),
    no_cskip: bool = typer.Option(False, "--no-cskip", help="Use every class for every image (LSkip only)."),
    rank: str = typer.Option("zeroshot", "--rank", help="Class ranking for CSkip: zeroshot or dynamic."),
    batching: str = typer.Option("shuffle", "--batching", help="shuffle (across classes) or class (one class per batch, as the paper's code)."),
    seed: int = typer.Option(1, "--seed"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Run directory (default: runs/<dataset>-<model>-omega<w>-<time>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    checkpoint_every: float = typer.Option(60.0, "--checkpoint-every", help="Seconds between resumable checkpoints (written at epoch ends, and after the last epoch); 0: every epoch."),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", help="Weights file, if the store's source moved."),
    device: str = DeviceOpt,
    as_json: bool = JsonOpt,
):
    """Train blocks omega+1..N on a store with CSkip; write a run directory."""
    from skipcache.cskip import CSkipConfig
    from skipcache.stages.tune import TuneConfig, result_dict, run_tune

    skip = CSkipConfig(r=r, lam=lam, max_top=None if no_cap else max_top, variant=cskip_variant, enabled=not no_cskip,
                       subset=cskip_subset)
    cfg = TuneConfig(store=None if store is None else _store(store, root), method=method,
                     method_options=_method_options(method_option or []), root=_root(root), dataset=dataset, model=model, omega=omega, out=out_dir,
                     epochs=epochs, batch_size=batch_size, lr=lr, lr_image=lr_image, warmup_epochs=warmup_epochs, warmup_lr=warmup_lr,
                     weight_decay=weight_decay, momentum=momentum, cskip=skip, precision=precision, rank=rank, batching=batching, seed=seed,
                     resume=resume, pretrained=pretrained, device=device, progress=not as_json,
                     checkpoint_every_s=checkpoint_every)
    cfg.validate()  # every setting before the device or the store is looked at
    _device(device)
    result = run_tune(cfg)
    if as_json:
        return _print_json(result_dict(result))
    f = result.final
    out.print(f"run: {result.run_dir}  ({result.seconds:.1f} s, median step {result.step_time_median_s * 1000:.1f} ms, "
              f"peak {result.peak_memory_mib:.0f} MiB by {result.peak_memory_method})")
    out.print(f"last epoch: loss {f.get('loss', float('nan')):.4f}  train acc {f.get('train_acc', float('nan')):.1f}%  "
              f"classes kept per image {f.get('classes_kept_per_image', float('nan')):.1f}")
    out.print(f"next: skipcache eval {result.run_dir}")


def _method_options(items: list[str]) -> dict:
    """`--method-option KEY=VALUE` items as a dict; values read as JSON where they parse (8, 0.2,
    true, null), else as text (a phrase: ctx_init=a photo of a)."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--method-option takes KEY=VALUE, got {item!r}; e.g. --method-option rank=8")
        try:
            options[key.strip()] = json.loads(value)
        except ValueError:
            options[key.strip()] = value
    return options


@app.command("eval")
@handle_errors
def eval_(
    run_dir: Path = typer.Argument(..., help="Run directory of `skipcache tune`."),
    store: Optional[Path] = typer.Option(None, "--store", help="Evaluate on another store (same model, weights, omega): cross-dataset or domain shift."),
    device: str = DeviceOpt,
    batch_size: int = typer.Option(256, "--batch-size"),
    as_json: bool = JsonOpt,
):
    """Accuracy on the cached test splits: base, new and H (percent), next to zero-shot."""
    from skipcache.stages.evaluate import run_eval

    _at_least("--batch-size", batch_size, 1, "e.g. --batch-size 256")
    result = run_eval(run_dir, store=store, device=_device(device), batch_size=batch_size)
    if as_json:
        return _print_json(result.to_json())
    keys = [k for k in ("base", "new", "H", "all") if k in result.accuracy]
    out.print(_table(f"top-1 accuracy (%) of {run_dir}", ["method", *keys],
                     [["zero-shot", *[result.zeroshot[k] for k in keys]], [result.method, *[result.accuracy[k] for k in keys]]]))


@app.command()
@handle_errors
def inspect(store: Path = typer.Argument(..., help="Store path, or a path under --root as `skipcache ls` prints it."),
            root: Optional[Path] = RootOpt, as_json: bool = JsonOpt):
    """What a store holds: key, splits, sizes, zero-shot accuracy."""
    from skipcache.store import FeatureStore

    summary = FeatureStore.open(_store(store, root), allow_incomplete=True).summary()
    if as_json:
        return _print_json(summary)
    for k in ("path", "complete", "storage_dtype", "size_mib", "created_utc"):
        if k in summary:
            out.print(f"[bold]{k}[/bold]: {summary[k]}")
    out.print("[bold]key[/bold]: " + json.dumps(summary.get("key", {}), sort_keys=True))
    splits = summary.get("splits", {})
    rows = [[s, v.get("n"), v.get("views"), v.get("classes") if isinstance(v.get("classes"), int) else len(v.get("classes", [])),
             v.get("size_mib", float("nan")), v.get("zeroshot_acc_pct")] for s, v in splits.items()]
    out.print(_table("splits", ["split", "images", "views", "classes", "MiB", "zero-shot %"], rows))


@app.command("ls", context_settings={"allow_extra_args": True})
@handle_errors
def ls(ctx: typer.Context, root: Optional[Path] = RootOpt, as_json: bool = JsonOpt):
    """List the stores under a root."""
    from skipcache.store import list_stores

    if ctx.args:  # `skipcache ls DIR`: one way to name the root, as in every other command
        raise ConfigError(f"pass the store root with --root: skipcache ls --root {ctx.args[0]}")
    stores = list_stores(_root(root))
    if as_json:
        return _print_json(stores)
    if not stores:
        out.print(f"no stores under {_root(root)}; build one with `skipcache cache --dataset ...`")
        return
    base = _root(root)

    def rel(p) -> str:
        try:
            return str(Path(p).relative_to(base))
        except ValueError:
            return str(p)

    rows = [[rel(st["path"]), "yes" if st.get("complete") else "no (resume: rerun cache)", st.get("size_mib", 0.0),
             str(st.get("created_utc", ""))[:16].replace("T", " ")] for st in stores]
    out.print(_table(f"stores under {base}", ["store", "complete", "MiB", "created (UTC)"], rows))


@app.command()
@handle_errors
def verify(store: Path = typer.Argument(..., help="Store path, or a path under --root as `skipcache ls` prints it."),
           root: Optional[Path] = RootOpt):
    """Read every chunk of a store; name corrupted or non-finite ones (exit 1 if any)."""
    from skipcache.errors import CorruptStore
    from skipcache.store import FeatureStore

    store = _store(store, root)
    problems = FeatureStore.open(store, allow_incomplete=True).verify()
    if problems:
        for p in problems:
            err.print(p, markup=False, highlight=False, soft_wrap=True)
        raise CorruptStore(f"{len(problems)} problem(s) in {store}; rebuild with `skipcache cache ... --force`")
    out.print(f"ok: {store}")


@app.command()
@handle_errors
def export(run_dir: Path = typer.Argument(..., help="Run directory."),
           out_path: Path = typer.Option(..., "--out", help="FILE.safetensors, or a directory for open_clip's local-dir:."),
           force: bool = typer.Option(False, "--force", help="Overwrite an existing export at --out.")):
    """Write a tuned run as a plain open_clip checkpoint (pretrained + tuned deep weights)."""
    from skipcache.stages.export import run_export

    result = run_export(run_dir, out_path, force=force)
    out.print(f"wrote {result.path} ({result.tensors} tensors, {result.size_mib:.1f} MiB); "
              f"load with open_clip.create_model({result.model!r}, pretrained={str(result.path)!r})")


@app.command()
@handle_errors
def predict(
    run_dir: Path = typer.Argument(..., help="Run directory."),
    images: list[Path] = typer.Argument(..., help="Image files."),
    top_k: int = typer.Option(5, "--top-k"),
    device: str = DeviceOpt,
    batch_size: int = typer.Option(32, "--batch-size"),
    as_json: bool = JsonOpt,
):
    """Top-k classes for raw images through the tuned model."""
    from skipcache.stages.export import run_predict

    _at_least("--top-k", top_k, 1, "e.g. --top-k 5")
    _at_least("--batch-size", batch_size, 1, "e.g. --batch-size 32")
    preds = run_predict(run_dir, images, top_k=top_k, device=_device(device), batch_size=batch_size)
    if as_json:
        return _print_json([{"image": p.image, "top": [{"class": c, "prob": v} for c, v in p.top]} for p in preds])
    for p in preds:
        out.print(f"{p.image}: " + ", ".join(f"{c} {100 * v:.1f}%" for c, v in p.top), markup=False, highlight=False)


@app.command()
@handle_errors
def models(as_json: bool = JsonOpt):
    """List model names (open_clip's and the built-in tiny ones) and built-in weights."""
    from skipcache.loading import BUILTIN_WEIGHTS, list_models

    names = list_models()
    if as_json:
        return _print_json({"models": names, "builtin_weights": BUILTIN_WEIGHTS})
    out.print("built-in: tiny (random init, for tests), synth-vit --pretrained synth (pretrained offline on synthetic data)")
    out.print(", ".join(names), highlight=False)


@app.command()
@handle_errors
def datasets(data_root: Optional[Path] = typer.Option(None, "--data-root", help=f"Data root to look in (default: ${DATA_ENV})."),
             as_json: bool = JsonOpt):
    """List the datasets and whether each is found under the data root."""
    from skipcache.data import list_datasets
    from skipcache.data.registry import dataset_status, resolve_data_root

    infos = list_datasets()
    status = {d.name: dataset_status(d.name, data_root) for d in infos}
    if as_json:
        return _print_json([{"name": d.name, "needs_root": d.needs_root, "found": status[d.name][0],
                             "status": status[d.name][1], "description": d.description} for d in infos])

    def found(name: str) -> str:
        ok, detail = status[name]
        return detail if ok is None else "yes" if ok else f"no: {detail}"

    root = resolve_data_root(data_root)
    title = f"datasets (data root: {root if root is not None else f'none; pass --data-root or set {DATA_ENV}'})"
    out.print(_table(title, ["name", "found", "description"], [[d.name, found(d.name), d.description] for d in infos]))
    out.print("check one in depth: skipcache check-data NAME")


@app.command("check-data")
@handle_errors
def check_data(name: str = typer.Argument(..., help="Dataset name (see `skipcache datasets`)."),
               data_root: Optional[Path] = typer.Option(None, "--data-root", help=f"Data root (default: ${DATA_ENV})."),
               as_json: bool = JsonOpt):
    """Check a dataset's copy: what is missing, where to get it (exit 1 if it cannot be used)."""
    from skipcache.data.check import check_dataset
    from skipcache.errors import DataError

    report = check_dataset(name, data_root)
    if as_json:
        _print_json(report.to_json())
        if not report.ok:
            raise typer.Exit(DataError.exit_code)
        return

    def show(console: Console, findings) -> None:
        for f in findings:
            console.print(f"{f.level}: {f.message}", markup=False, highlight=False)
            if f.fix:
                console.print(f"  fix: {f.fix}", markup=False, highlight=False)

    if not report.ok:
        show(err, report.findings)
        doc = f"; CoOp's instructions: {report.doc}" if report.doc else ""
        raise DataError(f"{name}: {len(report.errors)} problem(s) under {report.folder or report.root or 'no data root'}{doc}")
    if report.folder is None:
        out.print(f"{name}: built in, nothing to check", markup=False, highlight=False)
        return
    sizes = ", ".join(f"{s} {n:,}" for s, n in report.images.items())
    kind = " (test only)" if report.test_only else ""
    out.print(f"ok: {name} in {report.folder}: {report.classes:,} classes; images: {sizes}{kind}", markup=False, highlight=False)
    show(out, report.warnings)


@app.command()
@handle_errors
def run(
    pipeline: Path = typer.Argument(..., help="Pipeline file (see pipelines/)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: runs/pipelines/<name>, the same every time: "
                                           "running again keeps finished runs and resumes interrupted ones)."),
    override: list[str] = typer.Option([], "--set", help="Override a field: cache.omega=4, method.1.epochs=20, 'grid.seed=[1]' (repeatable)."),
    root: Optional[Path] = RootOpt,
    device: str = DeviceOpt,
    as_json: bool = JsonOpt,
):
    """Run a declarative pipeline (a grid of datasets, seeds, shots x methods); print the paper's table."""
    from skipcache.pipeline import run_pipeline

    result = run_pipeline(pipeline, out=out_dir, device=device, root=None if root is None else _root(root), overrides=override,
                          progress=not as_json,
                          log=(lambda *a: None) if as_json else (lambda msg: err.print(msg, markup=False, highlight=False)))
    if as_json:
        return _print_json(result)
    out.print(result["markdown"], markup=False, highlight=False, emoji=False)
    out.print(f"results: {result['out']}/results.md, results.csv, results.json", markup=False, highlight=False)


@app.command()
@handle_errors
def bench(
    preset: str = typer.Option("cpu", "--preset", help="tiny (a smoke run), cpu (ViT-B/16 on the CPU, `make benchmark`) or gpu (the paper's settings)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Output folder for bench.json, report.md and the plots (default: build/bench/<preset>)."),
    only: Optional[str] = typer.Option(None, "--only", help="Comma-separated rows of the method table, e.g. ft-conventional,skip-tuning,coop,coop-cached (default: every one)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads in each measuring process (default: torch's)."),
    no_sweeps: bool = typer.Option(False, "--no-sweeps", help="Skip the cost-vs-classes and cost-vs-omega sweeps."),
    no_accuracy: bool = typer.Option(False, "--no-accuracy", help="Skip training every method for accuracy."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Epochs of the accuracy runs (default: the preset's: 5, the demo's recipe; tiny: 1)."),
    device: str = DeviceOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON document on stdout (progress on stderr)."),
):
    """Every training method on one workload: time, memory and accuracy, beside the paper's Tables 4 and 5."""
    from skipcache.bench.__main__ import main as bench_main

    if preset not in ("tiny", "cpu", "gpu"):
        raise ConfigError(f"--preset must be tiny, cpu or gpu, got {preset!r}")
    if epochs is not None:
        _at_least("--epochs", epochs, 1, "e.g. --epochs 5")
    argv = ["--preset", preset, "--device", _device(device)]
    argv += ["--out", str(out_dir)] if out_dir is not None else []
    argv += ["--only", only] if only else []
    argv += ["--threads", str(threads)] if threads else []
    argv += ["--no-sweeps"] * no_sweeps + ["--no-accuracy"] * no_accuracy + ["--json"] * as_json
    argv += ["--epochs", str(epochs)] if epochs is not None else []
    code = bench_main(argv)
    if code:
        raise typer.Exit(code)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("root").setLevel(logging.ERROR)
    app()


if __name__ == "__main__":
    main()
