"""`ovsam weights list | download | verify`: what a model needs, fetching it, checking files.

The model code (segment_anything, the builder) is imported only by `verify`, inside it; `list`
and `download` import open_clip (and with it torch) only to look up or fetch the CLIP weights.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from enum import Enum
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table

from ovsam_cli.common import (
    CacheDirOpt,
    ClipWeightsOpt,
    OfflineOpt,
    QuietOpt,
    err_console,
    fail,
    info,
    offline_flag,
    out_console,
    user_errors,
)
from ovsam_model import weights as W
from ovsam_model.runtime import human_size
from ovsam_model.registry import MODEL_REGISTRY, SAM_CHECKPOINTS, ModelSpec, WeightFile, get_spec, with_sam_variant

if TYPE_CHECKING:
    from torch import nn

app = typer.Typer(no_args_is_help=True, help="List, download and verify model weights.")

# Model names are checked by the registry (one-line error listing them) and listed in the help
# texts: as a choice metavar they would be broken mid-name at 80 columns.
MODEL_NAMES = ", ".join(MODEL_REGISTRY)
SamVariant = Enum("SamVariant", {name: name for name in SAM_CHECKPOINTS}, type=str)  # type: ignore[misc]


class ListFormat(str, Enum):
    table = "table"
    tsv = "tsv"
    json = "json"


SamVariantOpt = Annotated[
    Optional[SamVariant],
    typer.Option("--sam-variant", help="SAM for the baselines (default vit_h); OVSAM models always use ViT-H's "
                                       "prompt encoder."),
]


def _spec(model: str, sam_variant: Optional[SamVariant]) -> ModelSpec:
    spec = get_spec(model)
    if sam_variant is not None:
        if spec.kind == "ovsam":
            raise typer.BadParameter(f"{model} is not a baseline; it has no SAM variant", param_hint="--sam-variant")
        spec = with_sam_variant(spec, sam_variant.value)
    return spec


def _file_label(wf: WeightFile) -> str:
    return f"{wf.filename} → {wf.extract_to}" if wf.extract_to else wf.filename


def _rows(specs: list[ModelSpec], cache_dir: Optional[Path]) -> list[dict]:
    rows = []
    cache = W.resolve_cache_dir(cache_dir)
    for spec in specs:
        for wf in spec.files:
            cached = W.is_cached(wf, cache)
            recorded = W.recorded_sha256(cache / wf.cache_name)
            rows.append({
                "model": spec.name, "component": wf.component, "file": _file_label(wf), "url": wf.url,
                "size": wf.size, "cached": {True: "yes", False: "no", None: "wrong size"}[cached],
                "sha256": "known" if wf.sha256 else ("recorded" if recorded else "no"),
            })
        if spec.clip_pretrained:
            hit = W.cached_clip_file(spec, cache)
            rows.append({
                "model": spec.name, "component": "clip", "file": f"open_clip {spec.clip_model}/{spec.clip_pretrained}",
                "url": "", "size": None, "cached": "yes" if hit else "no", "sha256": "open_clip",
            })
    return rows


@app.command("list")
def list_weights(
    model: Annotated[Optional[str], typer.Option("--model", metavar="MODEL", help=f"Only this model: {MODEL_NAMES}.")] = None,
    cache_dir: CacheDirOpt = None,
    fmt: Annotated[ListFormat, typer.Option("--format", help="table for people, tsv/json for scripts.")] = ListFormat.table,
) -> None:
    """Every weight file of every model: size, whether it is cached, whether its sha256 is known."""
    with user_errors():
        specs = [get_spec(model)] if model else list(MODEL_REGISTRY.values())
    rows = _rows(specs, cache_dir)
    if fmt is ListFormat.json:
        typer.echo(json.dumps(rows, indent=1))
        return
    cols = ("model", "component", "file", "size", "cached", "sha256")
    if fmt is ListFormat.tsv:
        typer.echo("\t".join(cols))
        for r in rows:
            typer.echo("\t".join(str(r[c] if c != "size" else r[c] or "") for c in cols))
        return
    table = Table(*cols, title=f"weights (cache: {W.resolve_cache_dir(cache_dir)})", title_justify="left")
    for r in rows:
        table.add_row(*(human_size(r[c]) if c == "size" else str(r[c]) for c in cols))
    out_console.print(table)


@app.command()
def download(
    model: Annotated[str, typer.Argument(metavar="MODEL", help=f"Model whose files to fetch: {MODEL_NAMES}.")],
    sam_variant: SamVariantOpt = None,
    cache_dir: CacheDirOpt = None,
    offline: OfflineOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fetch every weight file of MODEL (and its CLIP) into the cache, verifying checksums.

    Prints component<TAB>path lines on stdout.
    """
    with user_errors():
        spec = _spec(model, sam_variant)
    if spec.downloads_nothing:
        info(f"{spec.name} has random weights: there is nothing to download", quiet)
        return
    if W.is_offline(offline_flag(offline)):
        fail(f"cannot download {spec.name} in offline mode (--offline, OVSAM_OFFLINE=1 or HF_HUB_OFFLINE=1 is set)")
    cache = W.resolve_cache_dir(cache_dir)
    info(f"downloading the weights of {spec.name} into {cache}", quiet)
    with user_errors():
        paths = W.resolve_weights(spec, cache_dir=cache, offline=False, progress=not quiet)
        clip = W.download_clip(spec, cache)
    for component, path in paths.items():
        typer.echo(f"{component}\t{path}")
    if clip is not None:
        typer.echo(f"clip\t{clip}")
    info(f"done. To run without network, set OVSAM_OFFLINE=1 (or pass --offline); the files are in {cache} "
         f"(copy that folder and point --cache-dir or OVSAM_CACHE_DIR at it elsewhere).", quiet)


def _build_random_model(spec: ModelSpec) -> nn.Module:
    """The model of `spec` with random weights: what the files are loaded into."""
    from torch import nn

    from ovsam_model.builder import build_model, build_sam

    if spec.kind == "ovsam":
        return build_model(spec, random_weights=True)
    return nn.ModuleDict({"sam": build_sam(spec.sam_variant or "vit_h")})


def _find(wf: WeightFile, folder: Path) -> Optional[Path]:
    for name in (wf.filename, wf.extract_to):
        if name and (folder / name).is_file():
            return folder / name
    return None


def _verify_clip(spec: ModelSpec, model: nn.Module, path: Path) -> None:
    import open_clip

    from ovsam_model.checkpoint import CheckpointError, state_mismatch

    trunk = getattr(model, "trunk", None)
    clip = getattr(trunk, "clip", None)
    if clip is None:
        clip = open_clip.create_model(spec.clip_model, pretrained=None, force_quick_gelu=spec.clip_quick_gelu)
    where = f"{path.name} (component clip → trunk.clip)"
    try:
        open_clip.load_checkpoint(clip, str(path), strict=True)
    except Exception as e:  # open_clip raises RuntimeError/KeyError/pickle errors
        try:  # name the first bad key rather than torch's multi-line summary
            problem = state_mismatch(clip, open_clip.factory.load_state_dict(str(path)))
        except Exception:
            problem = None
        if problem is None:
            from ovsam_model.checkpoint import load_failure_reason

            problem = load_failure_reason(e)
        raise CheckpointError(f"{where}: {problem}") from e


def _check(component: str, path: Path, load: Callable[[Path], None]) -> Optional[str]:
    """Load one file strictly and print its ok / FAILED line; the failure, or None."""
    from ovsam_model.checkpoint import CheckpointError

    try:
        load(path)
    except CheckpointError as e:
        typer.echo(f"FAILED  {component:<16} {e}")
        return str(e)
    typer.echo(f"ok      {component:<16} {path.name}")
    return None


@app.command()
def verify(
    model: Annotated[str, typer.Option("--model", metavar="MODEL", help=f"Model whose file layouts to check: {MODEL_NAMES}.")],
    weights_dir: Annotated[Path, typer.Option("--weights-dir", exists=True, file_okay=False,
                                              help="Folder with weight files under their official names.")],
    clip_weights: ClipWeightsOpt = None,
    sam_variant: SamVariantOpt = None,
) -> None:
    """Load every file of MODEL found in --weights-dir strictly into a randomly initialised model.

    One line per component on stdout (ok / absent / FAILED with the first bad key); exit 0 when every file found loads, 1 otherwise.
    """
    with user_errors():
        spec = _spec(model, sam_variant)
    if spec.downloads_nothing:
        fail(f"{spec.name} has random weights: there is no weight file to verify")
    found = {wf.component: _find(wf, weights_dir) for wf in spec.files}
    if not any(found.values()) and clip_weights is None:
        names = ", ".join(wf.filename for wf in spec.files) or "none"
        fail(f"no weight file of {spec.name} in {weights_dir} (looked for: {names})", code=1)
    from ovsam_model.checkpoint import load_weight_file

    with err_console.status(f"building {spec.name} with random weights"), user_errors():
        net = _build_random_model(spec)
    results = []
    for wf in spec.files:
        path = found[wf.component]
        if path is None:
            typer.echo(f"absent  {wf.component:<16} {wf.filename} not in {weights_dir}")
        else:
            results.append(_check(wf.component, path, partial(load_weight_file, net, wf)))
    if clip_weights is not None:
        results.append(_check("clip", clip_weights, partial(_verify_clip, spec, net)))
    failures = [problem for problem in results if problem is not None]
    if failures:
        fail(f"{len(failures)} file(s) do not fit {spec.name}; first: {failures[0]}", code=1)
