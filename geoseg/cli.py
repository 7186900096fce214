"""The ``geoseg`` command line: a thin click group; each command calls one library function.

Errors from geoseg become one line on stderr and exit code 1 (2 for bad usage); ``-v`` shows the
traceback.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import yaml

from geoseg import __version__
from geoseg.errors import ConfigError, GeosegError, Interrupted, command_line

log = logging.getLogger("geoseg")
_state = {"verbose": 0, "interrupted": 0}


def _setup_logging(verbose: int, quiet: bool) -> None:
    _state["verbose"] = verbose
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
    # a warning is one line that names no source line of geoseg's: what it says is for users
    from rasterio.errors import NotGeoreferencedWarning

    warnings.showwarning = _show_warning
    # a scene without a CRS is refused, or predicted on purpose with --allow-no-crs
    warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)
    # Dask's own chatter (worker start-up, closing comms) only at -vv
    for name in ("distributed", "tornado", "asyncio"):
        logging.getLogger(name).setLevel(logging.INFO if verbose > 1 else logging.ERROR)
    # after Ctrl-C, what Dask's event loop logs as it is torn down mid-call (e.g. distributed's
    # sync() cancelling a call it had not yet started: a NameError with a traceback) is noise:
    # the user asked to stop, and "geoseg: interrupted" says what was kept
    _state["interrupted"] = 0
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_interrupt)
    # on the loggers that emit it, and on the handlers Dask's logging config gives its loggers
    # (a logger's filter does not see its children's records; a handler's does)
    import distributed  # noqa: F401  (its logging config makes those handlers; every command
    # that logs here runs on Dask anyway)

    names = ("tornado.application", "tornado", "distributed", "asyncio")
    targets: list[Any] = [logging.getLogger(n) for n in names]
    targets += [h for n in names for h in logging.getLogger(n).handlers]
    for target in targets:
        if not any(isinstance(f, _AfterInterrupt) for f in target.filters):
            target.addFilter(_AfterInterrupt())


def _on_interrupt(signum: int, frame: Any) -> None:
    """Ctrl-C: note it (so the loop's teardown noise is dropped), then stop as Python does."""
    _state["interrupted"] = 1
    raise KeyboardInterrupt


class _AfterInterrupt(logging.Filter):
    """Drops Dask's and tornado's log records once Ctrl-C was pressed (unless ``-vv``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _state["interrupted"] or _state["verbose"] > 1


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    text = " ".join(str(message).split())
    log.warning("geoseg: warning: %s", text)


def common(f: Callable[..., Any]) -> Callable[..., Any]:
    """-v/-q on every command."""
    f = click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")(f)
    f = click.option(
        "-v",
        "--verbose",
        count=True,
        help="More detail; tracebacks on error (-vv: Dask's logs too).",
    )(f)
    return f


def computes(f: Callable[..., Any]) -> Callable[..., Any]:
    """Options of every command that computes on a Dask cluster."""
    f = click.option("--overwrite", is_flag=True, help="Replace outputs that exist.")(f)
    f = click.option(
        "--scheduler",
        envvar="DASK_SCHEDULER_ADDRESS",
        metavar="ADDRESS",
        help="Use an existing Dask scheduler (e.g. tcp://10.0.0.5:8786) instead of a local cluster. "
        "Default: $DASK_SCHEDULER_ADDRESS.",
    )(f)
    f = click.option(
        "--workers",
        type=click.IntRange(min=1),
        metavar="N",
        help="Worker processes of the local Dask cluster (default: one per core, at most 8).",
    )(f)
    return common(f)


def _may_run_here(kw: dict[str, Any]) -> None:
    """A command that may run a small scene's worker in this process (no cluster named) has
    the memory that worker will use backed while it imports (:func:`geoseg.allocator.warm_heap`)."""
    if kw.get("scheduler") is None and kw.get("workers") is None:
        from geoseg.allocator import warm_heap

        warm_heap()


def polygon_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--min-area and --simplify, for the commands that write polygons."""
    f = click.option(
        "--simplify",
        type=click.FloatRange(min=0),
        default=0.0,
        help="Simplify the edges between polygons, tolerance in metres (neighbours keep their "
        "shared edges). Default: none.",
    )(f)
    return click.option(
        "--min-area",
        type=click.FloatRange(min=0),
        default=0.0,
        help="Merge patches smaller than this many square metres into their neighbours first.",
    )(f)


def _floats(value: str | None, flag: str) -> list[float]:
    try:
        return [float(v) for v in value.split(",") if v.strip()] if value else []
    except ValueError:
        raise click.BadParameter(
            f"expected numbers joined by commas, got {value!r}", param_hint=flag
        ) from None


def _window(value: str) -> int | str:
    """A number of pixels, or the text as given (auto, or a mistake predict names)."""
    v = value.strip()
    return int(v) if v.lstrip("-").isdigit() else v.lower() if v.lower() == "auto" else value


def _ints(value: str | None) -> list[int] | None:
    if value is None or value == "":
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(
            f"expected comma-separated integers such as 1,2,3; got {value!r}"
        ) from None


def _code(key: Any) -> Any:
    """A truth code: an integer, or a reference label's name (for reference points)."""
    text = str(key).strip()
    return int(text) if text.lstrip("-").isdigit() else text


def _class_map(value: str | None) -> dict[Any, int] | None:
    """``CODE:ID,...`` or a YAML file of ``CODE: ID``; a code may be a label's name."""
    if not value:
        return None
    pairs: list[Any] | None = None
    if os.path.exists(value):
        data = yaml.safe_load(Path(value).read_text())
        pairs = list(data.items()) if isinstance(data, dict) else None
    elif ":" in value:
        pairs = [p.split(":", 1) for p in value.split(",")]
    try:
        return {_code(k): int(v) for k, v in pairs} if pairs else _bad_class_map(value)
    except (TypeError, ValueError):
        return _bad_class_map(value)


def _bad_class_map(value: str) -> dict[Any, int]:
    raise ConfigError(
        f"--class-map {value!r}: expected CODE:ID pairs such as 11:1,12:1,21:2, or a YAML file "
        "mapping truth codes to class ids"
    )


def _kv(values: tuple[str, ...]) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for item in values:
        if "=" not in item:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = yaml.safe_load(v)
    return out


class GeosegGroup(click.Group):
    """Turns errors into one line on stderr and exit code 1; ``-v`` adds the traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with command_line():  # hints name --options, not Python keywords
                return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except GeosegError as exc:
            self._fail(ctx, str(exc))
        except KeyboardInterrupt as exc:
            note = str(exc) if isinstance(exc, Interrupted) else ""
            click.echo("geoseg: interrupted" + (f"; {note}" if note else ""), err=True)
            ctx.exit(130)
        except Exception as exc:
            self._fail(
                ctx,
                f"unexpected {type(exc).__name__}: {exc} (run again with -v for the "
                "traceback, and please report it)",
            )

    @staticmethod
    def _fail(ctx: click.Context, message: str) -> None:
        if _state["verbose"]:
            traceback.print_exc()
        click.echo(f"geoseg: error: {message}", err=True)
        ctx.exit(1)


@click.group(
    cls=GeosegGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="geoseg")
def cli() -> None:
    """Land-cover maps from satellite and aerial scenes of any size, on Dask.

    \b
    Start with:  geoseg demo
    """


@cli.command(
    epilog="""\b
Example:
  geoseg train scene.tif labels.tif -o model.bundle --epochs 30 --window 64
  geoseg train scene.tif fields.gpkg --label-field crop -o model.bundle --bands 2,3,4,8
  geoseg train a.tif b.tif a_labels.tif b_labels.gpkg -o model.bundle --val-fraction 0.2
  geoseg train scene.tif labels.tif -o model.bundle --resume model.bundle.checkpoint
  geoseg train scene.tif labels.tif -o model.bundle --members 3
"""
)
@click.argument("inputs", nargs=-1, required=True, metavar="SCENE... LABELS...")
@click.option("-o", "--output", required=True, help="The model bundle to write.")
@click.option(
    "--arch", default="unet", show_default=True, help="unet, fcn8s, deeplabv3plus or segformer."
)
@click.option(
    "--arch-arg",
    "arch_args",
    multiple=True,
    metavar="KEY=VALUE",
    help="Architecture argument, repeatable (e.g. depth=3 base_width=16).",
)
@click.option("--bands", help="Scene bands to use, 1-based, in order (e.g. 1,2,3,4). Default: all.")
@click.option(
    "--band-names",
    help="Names the bundle records for those bands (blue,green,red), by which STAC assets are "
    "found. Default: the band descriptions, a STAC item's asset keys, else 'band N'.",
)
@click.option(
    "--init-weights",
    metavar="PATH",
    help="A ResNet state dict in the torchvision/timm layout (ImageNet, SSL4EO-S12, ...) "
    "loaded into DeepLabV3+'s backbone first (--arch deeplabv3plus --arch-arg "
    "backbone=resnet50); the first convolution is adapted to the band count.",
)
@click.option(
    "--derive",
    multiple=True,
    metavar="NAME=A,B",
    help="A derived band the model reads after --bands: the normalised difference (A-B)/(A+B) "
    "of two bands by name or number (ndvi=nir,red or ndvi=4,3); repeat for more. Recorded in "
    "the bundle and computed on the workers, in training and prediction.",
)
@click.option(
    "--classes", "classes", help="YAML class list (id, name, color). Default: from the labels."
)
@click.option("--label-field", help="Column of vector labels that holds the class codes.")
@click.option("--ignore", help="Label codes that mean unlabelled (e.g. 0,99).")
@click.option("--within", help="Polygons: train only on windows wholly inside them.")
@click.option("--val-region", help="Polygons: validation pixels; no training window touches them.")
@click.option(
    "--val-fraction",
    type=float,
    help="Share of labelled pixels kept for validation, as whole blocks (e.g. 0.2).",
)
@click.option(
    "--val-seed",
    type=int,
    help="Seed of the --val-fraction split. Default: --seed (the members of --members share "
    "the first's).",
)
@click.option(
    "--sampler",
    default="balanced",
    show_default=True,
    type=click.Choice(["balanced", "random", "grid"]),
    help="Windows around labelled pixels with every class equally likely, around random "
    "labelled pixels, or on a grid.",
)
@click.option(
    "--resume",
    help="A checkpoint (NAME.bundle.checkpoint) of a stopped run with the same settings.",
)
@click.option(
    "--nodata", type=float, help="The scene's fill value, if the scene does not declare one."
)
@click.option(
    "--window",
    default="auto",
    show_default=True,
    help="Training window, px; auto: 64, or less for a training area smaller than that.",
)
@click.option(
    "--predict-window",
    default=256,
    show_default=True,
    help="Prediction window stored in the bundle, px (predict chooses its own for throughput "
    "unless given --window).",
)
@click.option("--epochs", default=10, show_default=True)
@click.option("--batch-size", default=16, show_default=True)
@click.option(
    "--samples-per-epoch",
    type=int,
    help="Windows per epoch. Default: twice the labelled area in windows, at least 256.",
)
@click.option("--lr", default=2e-3, show_default=True, help="Learning rate (AdamW, cosine decay).")
@click.option(
    "--loss",
    default="ce+lovasz",
    show_default=True,
    help="ce, dice, focal, lovasz, or a weighted sum such as ce+0.5*dice.",
)
@click.option(
    "--label-smoothing",
    default=0.0,
    show_default=True,
    help="Label smoothing of the cross-entropy.",
)
@click.option(
    "--augment",
    default="light",
    show_default=True,
    help="none, light, strong, or a YAML pipeline file.",
)
@click.option(
    "--balance/--no-balance",
    default=False,
    show_default=True,
    help="Weight the loss by inverse square-root class frequency (off: measured better on "
    "held-out data).",
)
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--members",
    default=1,
    show_default=True,
    help="Train this many models (seeds SEED, SEED+1, ...; each kept as NAME.memberK.bundle) "
    "and write the bundle of their mean probabilities: every window then runs each. On "
    "held-out NC two scored mIoU 0.289-0.324, three 0.292-0.330, one 0.274-0.316 by its seed.",
)
@click.option(
    "--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"])
)
@computes
def train(
    inputs: tuple[str, ...],
    output: str,
    arch_args: tuple[str, ...],
    bands: str | None,
    band_names: str | None,
    derive: tuple[str, ...],
    window: str,
    ignore: str | None,
    balance: bool,
    verbose: int,
    quiet: bool,
    **kw: Any,
) -> None:
    """Train a model on each SCENE with its LABELS (a class raster on the scene's pixel grid, of
    any extent, or a vector file), given in the same order: scenes first, then as many label
    files. A SCENE may be band files joined by commas or a STAC item, as for predict.

    Writes the bundle (the best epoch by validation mIoU, or the last), a checkpoint after every
    epoch (NAME.checkpoint) and a log line per epoch (NAME.log.jsonl)."""
    from geoseg.stages.train import train as run

    _setup_logging(verbose, quiet)
    if len(inputs) < 2 or len(inputs) % 2:
        raise click.UsageError(
            f"got {len(inputs)} path{'' if len(inputs) == 1 else 's'}; give the scenes, then "
            "one label file per scene"
        )
    half = len(inputs) // 2
    result = run(
        list(zip(inputs[:half], inputs[half:])),
        None,
        output,
        arch_args=_kv(arch_args),
        bands=_ints(bands),
        band_names=[n.strip() for n in band_names.split(",")] if band_names else None,
        derive=list(derive) or None,
        window=_window(window),
        ignore=_ints(ignore) or (),
        balance=balance,
        **kw,
    )
    made = f" and its {len(result.members)} members beside it" if result.members else ""
    click.echo(f"wrote {result.path}{made}")


@cli.command(
    epilog="""\b
Example:
  geoseg predict model.bundle scene.tif -o classes.tif --block 2048 --workers 4
  geoseg predict model.bundle a.tif b.tif /vsis3/bucket/c.tif -o maps/ --probabilities
  geoseg predict model.bundle B2.tif,B3.tif,B4.tif -o classes.tif
  geoseg predict model.bundle items.json -o region.tif --mosaic --within region.gpkg
  geoseg predict model.bundle item.json -o c.tif --asset-map blue=B02 --mask SCL --mask-values 3,8,9

\b
SCENES: raster files or GDAL URLs; band files joined with commas (one scene); STAC Items
(.json); ItemCollections (a scene per item); text files listing one scene per line.
"""
)
@click.argument("bundle")
@click.argument("scenes", nargs=-1, required=True)
@click.option(
    "-o",
    "--output",
    required=True,
    help="The class map (Cloud-Optimized GeoTIFF) to write; with several scenes, a folder.",
)
@click.option(
    "--probabilities", is_flag=True, help="Also write NAME_probabilities.tif, a band per class."
)
@click.option(
    "--window",
    default="auto",
    show_default=True,
    help="Model window, px, or auto: the window and batch that map the scenes soonest, from "
    "the model's speed measured once per model and device. Never larger than one that holds "
    "the largest scene whole.",
)
@click.option(
    "--overlap",
    help="Window overlap: px, exact (the default: from the receptive field, the tiled map equals "
    "a whole-scene one) or effective (measured at training: tiles change under 0.05 % of "
    "pixels).",
)
@click.option(
    "--block",
    type=int,
    help="Block size, px: the unit of scheduling and resuming. Default: 2048, or less so that "
    "each local worker gets two blocks.",
)
@click.option(
    "--batch-size",
    type=int,
    help="Windows per forward pass. Default: chosen with the window by --window auto; for a "
    "given --window, 8 on a GPU, one 512 px window's worth on a CPU.",
)
@click.option(
    "--blend",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "trim", "gaussian", "cosine", "none"]),
)
@click.option(
    "--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"])
)
@click.option(
    "--precision",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
    help="auto: bf16 where the CPU or GPU has it, else fp32 (CPU) or fp16 (GPU).",
)
@click.option(
    "--tta",
    default="none",
    show_default=True,
    type=click.Choice(["none", "flips", "d4"]),
    help="Test-time augmentation: average the class probabilities over 4 flips and turns of "
    "each window (flips) or all 8 (d4); costs a model pass each.",
)
@click.option("--allow-no-crs", is_flag=True, help="Predict a scene that has no CRS.")
@click.option(
    "--strict",
    is_flag=True,
    help="Refuse a scene whose values, pixel size or CRS differ from the training scene's "
    "(default: a warning for each).",
)
@click.option(
    "--polygons",
    help="Also write the class map's polygons here (.geojson, .gpkg, .parquet, .fgb); with "
    "several scenes, a folder of <scene>.gpkg.",
)
@click.option("--mosaic", is_flag=True, help="One class map of all SCENES (-o is one .tif).")
@click.option(
    "--composite",
    default="mean",
    show_default=True,
    type=click.Choice(["mean", "max-confidence", "first", "last"]),
    help="Where scenes of a mosaic overlap: their mean probabilities, the most confident "
    "scene, the first or the last with valid data.",
)
@click.option("--within", help="Map only this area (a vector file); elsewhere nodata.")
@click.option("--bounds", help="Map only W,S,E,N (in the output CRS); elsewhere nodata.")
@click.option("--crs", help="A mosaic's CRS. Default: the first scene's.")
@click.option(
    "--resolution", help="A mosaic's pixel size (30 or 30,30). Default: the finest scene's."
)
@click.option(
    "--resampling",
    default="bilinear",
    show_default=True,
    type=click.Choice(["nearest", "bilinear", "cubic", "cubic_spline", "lanczos", "average"]),
    help="For bands on another grid (masks: always nearest).",
)
@click.option(
    "--mask", help="A band number (STAC: an asset) whose --mask-values are not predicted."
)
@click.option("--mask-values", help="Values of --mask to leave out, e.g. 3,8,9,10.")
@click.option("--asset-map", help="STAC: the asset of each band the bundle reads (red=B04,...).")
@polygon_options
@computes
def predict(
    bundle: str,
    scenes: tuple[str, ...],
    output: str,
    min_area: float,
    simplify: float,
    mask_values: str | None,
    window: str,
    verbose: int,
    quiet: bool,
    **kw: Any,
) -> None:
    """Predict the class maps of SCENES with the model BUNDLE, all in one Dask graph, or with
    --mosaic one class map of them all."""
    _may_run_here(kw)
    from geoseg.stages.predict import predict_scenes

    _setup_logging(verbose, quiet)
    runs = predict_scenes(
        bundle,
        list(scenes),
        output,
        window=_window(window),
        min_area=min_area,
        simplify=simplify,
        mask_values=_floats(mask_values, "--mask-values"),
        **kw,
    )
    for r in runs:
        also = [str(p) for p in (r.probabilities, r.polygons) if p]
        click.echo(f"wrote {r.path}" + "".join(f" and {p}" for p in also))


@cli.command(
    epilog="""\b
Example:
  for s in 0 1 2; do geoseg train scene.tif labels.tif -o m$s.bundle --seed $s; done
  geoseg ensemble m0.bundle m1.bundle m2.bundle -o models.bundle
  (geoseg train --members 3 does both in one command)
"""
)
@click.argument("bundles", nargs=-1, required=True)
@click.option("-o", "--output", required=True, help="The ensemble bundle to write.")
@click.option("--overwrite", is_flag=True, help="Replace an output that exists.")
@common
def ensemble(
    bundles: tuple[str, ...], output: str, overwrite: bool, verbose: int, quiet: bool
) -> None:
    """One bundle that predicts the mean class probabilities of BUNDLES (trained with the same
    settings and other seeds); every window then runs every model."""
    from geoseg.bundle import combine_bundles

    _setup_logging(verbose, quiet)
    b = combine_bundles(list(bundles), output, overwrite=overwrite)
    click.echo(f"wrote {output}: an ensemble of {b.contract.members} {b.contract.arch} models")


@cli.command(
    epilog="""\b
Example:
  geoseg vectorize classes.tif -o polygons.geojson
  geoseg vectorize classes.tif -o polygons.gpkg --classes 1,5
  geoseg vectorize classes.tif -o polygons.parquet --min-area 5000 --simplify 15
"""
)
@click.argument("classes")
@click.option(
    "-o", "--output", required=True, help="Polygons: .geojson (WGS84), .gpkg, .parquet or .fgb."
)
@click.option("--classes", "only", help="Only these class ids (e.g. 1,5).")
@click.option("--crs", help="CRS of the output (not for GeoJSON, which is always WGS84).")
@click.option("--block", default=2048, show_default=True, help="Block size, px.")
@polygon_options
@computes
def vectorize(
    classes: str, output: str, only: str | None, verbose: int, quiet: bool, **kw: Any
) -> None:
    """Turn the class map CLASSES into polygons."""
    from geoseg.stages.vectorize import vectorize as run

    _setup_logging(verbose, quiet)
    n = run(classes, output, classes=_ints(only), **kw).polygons
    click.echo(f"wrote {n} polygons to {output}")


@cli.command(
    epilog="""\b
Example:
  geoseg sample classes.tif -o sample.gpkg --size 600
  geoseg sample classes.tif -o sample.gpkg --size 900 --regions provinces.gpkg --region-field NAME
  (label the points' 'reference' column, then)
  geoseg evaluate classes.tif sample.gpkg --truth-field reference -o accuracy.html
"""
)
@click.argument("classes")
@click.option(
    "-o", "--output", required=True, help="The points: .gpkg, .geojson, .shp or .parquet."
)
@click.option(
    "--size",
    type=click.IntRange(min=1),
    default=600,
    show_default=True,
    help="Points in the sample.",
)
@click.option(
    "--allocation",
    type=click.Choice(["proportional", "equal", "neyman"]),
    default="proportional",
    show_default=True,
    help="Points per stratum: proportional to its area, equal, or Neyman (area x sqrt(U(1-U)), "
    "U the expected user's accuracy, 0.8).",
)
@click.option(
    "--min-per-class",
    type=click.IntRange(min=0),
    default=50,
    show_default=True,
    help="At least this many points per stratum (or all its pixels).",
)
@click.option("--regions", help="Polygons: strata are the map classes within each region.")
@click.option("--region-field", help="Column that names the regions (default: 'name').")
@click.option("--within", help="Polygons: sample only inside them.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the draw.")
@click.option("--block", default=2048, show_default=True, help="Block size, px.")
@computes
def sample(classes: str, output: str, verbose: int, quiet: bool, **kw: Any) -> None:
    """Draw a stratified random sample of points from the class map CLASSES for reference
    labelling; its design goes beside it (SAMPLE.design.json)."""
    from geoseg.stages.sample import sample as run

    _setup_logging(verbose, quiet)
    result = run(classes, output, **kw)
    for name, k in result.allocation.items():
        click.echo(f"{k:>6}  {name}")
    click.echo(f"wrote {sum(result.allocation.values())} points to {result.points}")
    click.echo(f"wrote the design to {result.design}")


@cli.command(
    epilog="""\b
Example:
  geoseg evaluate classes.tif truth.tif -o report.json
  geoseg evaluate classes.tif truth.gpkg --truth-field code -o report.html --regions counties.gpkg --region-field NAME
  geoseg evaluate classes.tif worldcover.tif -o report.csv --resample nearest --class-map 10:5,40:2,80:6
"""
)
@click.argument("classes")
@click.argument("truth")
@click.option(
    "-o", "--output", required=True, help="The report: .json, .csv, .html (one page) or .md."
)
@click.option("--truth-field", help="Column of vector truth that holds the class codes.")
@click.option("--ignore", help="Truth codes to leave out (e.g. 0,99).")
@click.option("--regions", help="Polygons to score one by one (regions may overlap).")
@click.option("--region-field", help="Column that names the regions (default: 'name').")
@click.option("--within", help="Polygons: score only pixels inside them.")
@click.option(
    "--class-map",
    help="Truth codes onto the class map's ids: CODE:ID,... (e.g. 11:1,12:1,21:2) or a YAML file "
    "of CODE: ID.",
)
@click.option(
    "--resample",
    type=click.Choice(["nearest"]),
    help="Warp a truth raster on another grid onto the class map's (else that is an error).",
)
@click.option(
    "--design",
    "design",
    metavar="DESIGN.json|simple",
    help="Reference points: the sample's design file (default: SAMPLE.design.json beside the "
    "points, when there), or 'simple' for a simple random or systematic sample (no strata).",
)
@click.option(
    "--strata",
    help="Reference points: a raster on the class map's grid whose values are the sample's "
    "strata (default: the class map's classes).",
)
@click.option(
    "--bootstrap",
    type=click.IntRange(min=0),
    default=0,
    metavar="N",
    help="Dense truth: 95 % intervals from N resamples of the blocks (e.g. 1000).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the bootstrap.")
@click.option("--block", default=2048, show_default=True, help="Block size, px.")
@computes
def evaluate(
    classes: str,
    truth: str,
    output: str,
    ignore: str | None,
    class_map: str | None,
    design: str | None,
    verbose: int,
    quiet: bool,
    **kw: Any,
) -> None:
    """Score the class map CLASSES against TRUTH: a class raster, polygons, or reference
    points (then the estimates of accuracy and area of the good-practice guidance, with 95 %
    confidence intervals)."""
    from geoseg.report import sample_table, score_table
    from geoseg.stages.evaluate import evaluate as run

    _setup_logging(verbose, quiet)
    mapping = _class_map(class_map)
    report = run(
        classes,
        truth,
        output,
        ignore=_ints(ignore) or (),
        code_map=mapping,
        design=design if design in ("simple", "stratified") else "stratified",
        design_file=None if design in (None, "simple", "stratified") else design,
        **kw,
    )
    if not quiet:
        click.echo(sample_table(report) if report.sample is not None else score_table(report))
    click.echo(f"wrote {output}")


def _summary(result: Any) -> None:
    from geoseg.report import score_table

    report = result.report
    click.echo(score_table(report))
    base = report.baseline_majority_class
    if base is not None and report.overall.miou is not None and base.miou is not None:
        click.echo(
            f"\nmIoU {report.overall.miou:.3f} on the scored area; majority-class baseline "
            f"(class {base.class_id} everywhere, same pixels) {base.miou:.3f}\n"
        )
    est = report.sample
    if est is not None and est.overall.value is not None:
        hw = est.overall.half_width
        interval = (
            f" ± {hw:.3f} (95 %)"
            if hw is not None
            else f", no 95 % interval ({est.overall.note or 'no standard error'})"
        )
        click.echo(
            f"reference points: {report.sample_points}; estimated overall accuracy "
            f"{est.overall.value:.3f}{interval}; areas and their intervals in the report\n"
        )
    width = max(len(k) for k in result.outputs)
    for k, v in result.outputs.items():
        click.echo(f"{k:<{width}}  {v}")


@cli.command(
    epilog="""\b
Example:
  geoseg run workflows/iguazu.yaml -o iguazu-out --workers 2
"""
)
@click.argument("workflow")
@click.option("-o", "--output", help="Output folder. Default: the workflow's 'output'.")
@computes
def run(workflow: str, output: str | None, verbose: int, quiet: bool, **kw: Any) -> None:
    """Run a whole pipeline (train, predict, vectorize, evaluate) from a YAML WORKFLOW."""
    _may_run_here(kw)
    from geoseg.pipeline import run_workflow

    _setup_logging(verbose, quiet)
    _summary(run_workflow(workflow, output, **kw))


@cli.command(
    epilog="""\b
Example:
  geoseg demo -o /tmp/geoseg-demo --workers 2
"""
)
@click.option("-o", "--output", default="geoseg-demo", show_default=True, help="Output folder.")
@computes
def demo(output: str, verbose: int, quiet: bool, **kw: Any) -> None:
    """Train, predict, vectorize and evaluate on the NC Landsat 7 scene shipped with geoseg."""
    _may_run_here(kw)
    from geoseg.pipeline import demo_workflow, run_workflow

    _setup_logging(verbose, quiet)
    _summary(run_workflow(demo_workflow(), output, **kw))


@cli.group()
def cluster() -> None:
    """A local Dask cluster kept between commands (start, status, stop).

    \b
    Commands that name no cluster (no --scheduler, --workers or DASK_SCHEDULER_ADDRESS) use it,
    with torch, the model and its kernels already warm in its workers: a small scene no longer
    pays for starting them. It stops itself after --idle-timeout without work.
    """


@cluster.command("start")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    metavar="N",
    help="Worker processes (default: one per core, at most 8).",
)
@click.option(
    "--idle-timeout",
    default="15m",
    show_default=True,
    help="Stop after this long without work (seconds, or a time such as 90s, 15m, 2h).",
)
@common
def cluster_start(workers: int | None, idle_timeout: str, verbose: int, quiet: bool) -> None:
    """Start the kept cluster on 127.0.0.1 (if none runs) and print its address."""
    from geoseg import resident
    from geoseg.cluster import default_workers

    _setup_logging(verbose, quiet)
    r, new = resident.start(workers or default_workers(), idle_timeout)
    said = "started" if new else "already running"
    click.echo(
        f"geoseg cluster {said} at {r.address}: {r.workers} worker processes, stops after "
        f"{r.idle_timeout} without work; 'geoseg cluster stop' stops it"
    )


@cluster.command("status")
@common
def cluster_status(verbose: int, quiet: bool) -> None:
    """Say whether a kept cluster runs, where, and with how many workers."""
    from geoseg import resident
    from geoseg.cluster import count_workers

    _setup_logging(verbose, quiet)

    r = resident.find()
    if r is None:
        click.echo("no kept cluster runs ('geoseg cluster start')")
    else:
        click.echo(resident.describe(r, count_workers(r.address)))


@cluster.command("stop")
@common
def cluster_stop(verbose: int, quiet: bool) -> None:
    """Stop the kept cluster and its workers."""
    from geoseg import resident

    _setup_logging(verbose, quiet)
    r = resident.stop()
    click.echo(f"geoseg cluster at {r.address} stopped" if r else "no kept cluster runs")


def main() -> None:
    """The ``geoseg`` command: the workers' allocator settings first (a small scene's worker
    runs in this process, :mod:`geoseg.allocator`), then the command line."""
    from geoseg.allocator import set_worker_malloc

    set_worker_malloc()
    cli()
