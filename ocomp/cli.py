"""The `ocomp` command line (click). Thin: parse, call ocomp.api, print.

Exit codes: 0 ok, 1 bad input or unsupported model (one line on stderr),
2 usage error. `--debug` shows tracebacks.
"""

from __future__ import annotations

import functools
import sys
import traceback
from typing import Any, Callable

import click

from . import __version__
from .errors import OcompError, UsageError
from .pipeline import Option, registry
from .report import json_text

_DEBUG = {"on": False}


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def handle_errors(func: Callable) -> Callable:
    """One line and an exit code instead of a traceback (unless --debug)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except UsageError as exc:
            if _DEBUG["on"]:
                traceback.print_exc()
            _fail(str(exc), 2)
        except OcompError as exc:
            if _DEBUG["on"]:
                traceback.print_exc()
            _fail(str(exc), 1)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - bugs still get one line; --debug has the traceback
            if _DEBUG["on"]:
                traceback.print_exc()
            first = str(exc).splitlines()[0] if str(exc) else ""
            _fail(f"internal error: {type(exc).__name__}: {first} (run with --debug for the traceback)", 1)

    return wrapper


class _OptionType(click.ParamType):
    """A pass option's declared type as a click type: conversion errors become usage errors (exit 2)."""

    def __init__(self, option: Option):
        self.option = option
        self.name = getattr(option.type, "__name__", "value").upper()

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        try:
            return self.option._one(value)
        except (ValueError, TypeError) as exc:
            self.fail(str(exc), param, ctx)


def pass_options(func: Callable) -> Callable:
    """Add one CLI flag for every option every registered pass declares (`--<pass>-<option>`)."""
    for pass_name, cls in sorted(registry().items(), reverse=True):
        for option in reversed(cls.options):
            dest = f"opt__{pass_name}__{option.name}"
            flag = option.flag(pass_name)
            default_text = "" if option.default in (None, (), "") else f" [default: {option.default}]"
            if option.type is bool:
                no_flag = f"--{pass_name}-no-{option.name.replace('_', '-')}"
                decl = click.option(f"{flag}/{no_flag}", dest, default=None, help=option.help + default_text)
            else:
                decl = click.option(flag, dest, type=_OptionType(option), default=None, multiple=option.multiple,
                                    help=option.help + default_text, metavar=_OptionType(option).name)
            func = decl(func)
    return func


def collect_pass_options(kwargs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    options: dict[str, dict[str, Any]] = {}
    for key in [k for k in kwargs if k.startswith("opt__")]:
        value = kwargs.pop(key)
        if value is None or value == ():
            continue
        _, pass_name, name = key.split("__", 2)
        options.setdefault(pass_name, {})[name] = value
    return options


def data_options(func: Callable) -> Callable:
    """Preprocessing and batching options for --calib / --data / --eval / --inputs."""
    decls = [
        click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
                     help="Samples per batch when streaming data."),
        click.option("--limit", type=click.IntRange(min=1), default=None, help="Use at most N samples."),
        click.option("--size", type=click.IntRange(min=1), default=None,
                     help="Images: resize the shorter side to this (default: the model's input size)."),
        click.option("--crop", type=click.IntRange(min=1), default=None,
                     help="Images: center-crop to this square size after resizing (default: no crop)."),
        click.option("--mean", default=None, help="Images: per-channel mean, comma-separated, in the --scale units "
                     "(default 0)."),
        click.option("--std", default=None, help="Images: per-channel std, comma-separated (default 1)."),
        click.option("--layout", type=click.Choice(["NCHW", "NHWC"]), default=None,
                     help="Images: tensor layout (default: guessed from the model's input shape)."),
        click.option("--scale", type=click.Choice(["0-1", "0-255"]), default=None,
                     help="Images: pixel range before mean/std (default 0-1)."),
    ]
    for decl in reversed(decls):
        func = decl(func)
    return func


def make_data_options(kwargs: dict[str, Any], needed: bool = True) -> Any:
    """DataOptions from the CLI flags (popped from kwargs); None when no data set is used."""
    keys = ("batch_size", "limit", "size", "crop", "mean", "std", "layout", "scale")
    values = {k: kwargs.pop(k) for k in keys}
    if not needed:
        return None
    from .data import DataOptions

    return DataOptions.from_cli(**values)


def input_shape_option(func: Callable) -> Callable:
    return click.option("--input-shape", "input_shape", multiple=True, metavar="NAME=D0,D1,...",
                        help="Fix an input's shape (repeatable), e.g. for models with dynamic spatial dims.")(func)


def _debug_callback(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:
        _DEBUG["on"] = True
    return value


debug_option = click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_debug_callback,
                            help="Show tracebacks on errors.")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, "--version", prog_name="ocomp")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
def main(debug: bool) -> None:
    """ocomp: shrink trained ONNX CNNs (structured pruning, ternary weights, BN recalibration)."""
    _DEBUG["on"] = debug  # set per invocation; a subcommand's own --debug may turn it on afterwards


@main.command()
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("-o", "--output", required=True, type=click.Path(), help="Where to write the compressed model.")
@click.option("--passes", "passes", default=None, help="Comma-separated passes, run in order (e.g. prune,ternary).")
@click.option("--recipe", type=click.Path(), default=None, help="TOML recipe: passes and their options.")
@click.option("--calib", type=click.Path(), default=None, help="Calibration data (.npz, .npy, folder).")
@click.option("--eval", "eval_data", type=click.Path(), default=None,
              help="Evaluate original and compressed model on this data set and print them side by side.")
@click.option("--report", type=click.Path(), default=None, help="Write the full report as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="Print only the summary.")
@input_shape_option
@data_options
@pass_options
@debug_option
@handle_errors
def compress(model: str, output: str, passes: str | None, recipe: str | None, calib: str | None,
             eval_data: str | None, report: str | None, quiet: bool, input_shape: tuple[str, ...],
             **kwargs: Any) -> None:
    """Compress MODEL with the given passes and write it to OUTPUT."""
    from . import api
    from .report import render_report, render_summary

    options = collect_pass_options(kwargs)
    data_opts = make_data_options(kwargs, needed=calib is not None or eval_data is not None)
    if not passes and not recipe:
        raise UsageError(f"give --passes or --recipe; valid passes: {', '.join(sorted(registry()))}")
    result = api.compress(model, output, passes, options, calib=calib, recipe=recipe, report=report,
                          eval_data=eval_data, input_shapes=api.parse_input_shapes(input_shape),
                          data_options=data_opts, progress=not quiet and sys.stderr.isatty())
    if not quiet:
        for rep in result.reports:
            click.echo(render_report(rep))
            click.echo()
    click.echo(render_summary(result.reports, result.before, result.after))
    if result.evaluation is not None:
        from .evaluate import render_evaluation

        click.echo()
        click.echo(render_evaluation(result.evaluation, result.before, result.after))
    click.echo(f"wrote {output}" + (f" and {report}" if report else ""))


@main.command()
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@input_shape_option
@debug_option
@handle_errors
def inspect(model: str, as_json: bool, input_shape: tuple[str, ...]) -> None:
    """Ops, per-layer params/MACs/weight bits, totals and file size of MODEL."""
    from . import api
    from .report import render_stats

    stats = api.inspect(model, api.parse_input_shapes(input_shape))
    click.echo(json_text(stats.to_dict()) if as_json else render_stats(stats))


@main.command()
@click.argument("model_a", type=click.Path(dir_okay=True))
@click.argument("model_b", type=click.Path(dir_okay=True))
@click.option("--inputs", type=click.Path(), default=None, help="Inputs (.npz named after the model inputs, ...).")
@click.option("--random", "random_n", type=click.IntRange(min=1), default=None,
              help="Compare on N random standard-normal inputs (default 8 when --inputs is not given).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@input_shape_option
@data_options
@debug_option
@handle_errors
def compare(model_a: str, model_b: str, inputs: str | None, random_n: int | None, seed: int, as_json: bool,
            input_shape: tuple[str, ...], **kwargs: Any) -> None:
    """Run MODEL_A and MODEL_B on the same inputs and compare every output."""
    from . import api
    from .report import render_comparison

    if inputs is not None and random_n is not None:
        raise UsageError("give --inputs or --random, not both")
    data_opts = make_data_options(kwargs, needed=inputs is not None)
    results, count = api.compare(model_a, model_b, inputs, random_n or 8, seed,
                                 api.parse_input_shapes(input_shape), data_opts)
    click.echo(json_text({"samples": count, "outputs": results}) if as_json
               else render_comparison(results, count))


@main.command(name="eval")
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("--data", "data", required=True, type=click.Path(), help="Evaluation data (labels give accuracy).")
@click.option("--reference", type=click.Path(), default=None, help="Reference model for fidelity figures.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@input_shape_option
@data_options
@debug_option
@handle_errors
def evaluate(model: str, data: str, reference: str | None, as_json: bool, input_shape: tuple[str, ...],
             **kwargs: Any) -> None:
    """Accuracy (top-1/top-5, with labels) and fidelity to --reference of MODEL on --data."""
    from . import api
    from .evaluate import render_single

    result = api.evaluate(model, data, reference, api.parse_input_shapes(input_shape), make_data_options(kwargs),
                          progress=sys.stderr.isatty())
    click.echo(json_text(result) if as_json else render_single(result))


@main.command(name="passes")
@debug_option
def list_passes() -> None:
    """The passes and their options."""
    for name, cls in registry().items():
        click.echo(f"{name}: {cls.summary()}")
        if cls.needs:
            click.echo(f"  needs: {', '.join(sorted(cls.needs))}")
        for option in cls.options:
            metavar = "" if option.type is bool else f" {getattr(option.type, '__name__', 'value').upper()}"
            repeat = " (repeatable)" if option.multiple else ""
            click.echo(f"  {option.flag(name)}{metavar}{repeat}: {option.help} [default: {option.default}]")
        click.echo()


if __name__ == "__main__":  # pragma: no cover
    main()
