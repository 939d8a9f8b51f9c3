"""The `ocomp` command line (click). Thin: parse, call ocomp.api, print.

Exit codes: 0 ok, 1 bad input or unsupported model (one line on stderr),
2 usage error. `--debug` shows tracebacks.
"""

from __future__ import annotations

import os
import signal
import sys

_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def _exit_on_signal(signum: int, frame: Any) -> None:
    """Start-up (imports) and shutdown: nothing to clean up, so one line and the conventional exit code."""
    os.write(2, f"error: {_signal_text(signum)}\n".encode())
    os._exit(128 + signum)


def _signal_text(signum: int) -> str:
    return "interrupted" if signum == signal.SIGINT else f"terminated by {signal.Signals(signum).name}"


def _is_program() -> bool:
    """True when this process is the `ocomp` command (console script or `python -m ocomp`), not a host
    program (pytest, a notebook) that merely imports the module: only then are signal handlers ours."""
    main_module = sys.modules.get("__main__")
    spec = getattr(main_module, "__spec__", None)
    return (os.path.basename(sys.argv[0] if sys.argv else "") == "ocomp"
            or getattr(spec, "name", None) == "ocomp.__main__")


if _is_program():  # before the slow imports below (onnx, numpy: seconds), so Ctrl-C never shows a traceback
    for _signum in _SIGNALS:
        signal.signal(_signum, _exit_on_signal)

import functools  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from typing import Any, Callable  # noqa: E402

import click  # noqa: E402

from . import __version__  # noqa: E402
from .errors import GuardError, OcompError, OcompWarning, UsageError  # noqa: E402
from .pipeline import Option, OptionError, registry  # noqa: E402
from .report import json_text  # noqa: E402

_DEBUG = {"on": False}


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


class Terminated(BaseException):
    """SIGTERM/SIGHUP during a command: raised where the process is, so `finally` blocks and the atomic
    writer's cleanup run (no temp file is left behind), like KeyboardInterrupt for SIGINT."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(signum)


def _warning_printer(original: Callable) -> Callable:
    """ocomp's own warnings as one `warning:` line on stderr; other libraries' warnings as before."""

    def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if not issubclass(category, OcompWarning):
            original(message, category, filename, lineno, file, line)
            return
        text = str(message).splitlines()[0] if str(message) else category.__name__
        click.echo(f"warning: {text}", err=True)

    return show


def handle_errors(func: Callable) -> Callable:
    """One line and an exit code instead of a traceback (unless --debug); warnings as `warning:` lines;
    SIGINT/SIGTERM/SIGHUP end the command cleanly (exit 130/143/129, temp files removed)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        in_main = threading.current_thread() is threading.main_thread()
        previous = {signum: signal.getsignal(signum) for signum in _SIGNALS} if in_main else {}
        try:
            if in_main:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                for signum in _SIGNALS:
                    if signum != signal.SIGINT:
                        signal.signal(signum, _raise_terminated)
            with warnings.catch_warnings():
                warnings.simplefilter("always", OcompWarning)
                warnings.showwarning = _warning_printer(warnings.showwarning)
                return func(*args, **kwargs)
        except GuardError as exc:
            if _DEBUG["on"]:
                traceback.print_exc()
            _fail(str(exc), 3)
        except UsageError as exc:
            if _DEBUG["on"]:
                traceback.print_exc()
            _fail(exc.flag_message() if isinstance(exc, OptionError) else str(exc), 2)
        except OcompError as exc:
            if _DEBUG["on"]:
                traceback.print_exc()
            _fail(str(exc), 1)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except Terminated as exc:
            _fail(_signal_text(exc.signum), 128 + exc.signum)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - bugs still get one line; --debug has the traceback
            if _DEBUG["on"]:
                traceback.print_exc()
            first = str(exc).splitlines()[0] if str(exc) else ""
            _fail(f"internal error: {type(exc).__name__}: {first} (run with --debug for the traceback)", 1)
        finally:
            for signum, handler in previous.items():  # shutdown: back to the one-line handler (or the host's)
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    return wrapper


class _OptionType(click.ParamType):
    """A pass option's declared type as a click type: conversion errors become usage errors (exit 2)."""

    def __init__(self, option: Option):
        self.option = option
        self.name = getattr(option.type, "__name__", "value").upper()

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        from .api import negative_value

        try:
            converted = self.option._one(value)
        except (ValueError, TypeError) as exc:
            self.fail(str(exc), param, ctx)
        problem = negative_value(converted)
        if problem:
            self.fail(problem, param, ctx)
        return converted


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
@click.option("--min-agreement", type=click.FloatRange(0, 100), default=85.0, show_default=True, metavar="PCT",
              help="Accuracy guard: least top-1 agreement with the original (classifier outputs) or IoU of the "
                   "maps thresholded at 0.5 (score maps), in percent.")
@click.option("--min-cosine", type=click.FloatRange(0, 1), default=0.95, show_default=True,
              help="Accuracy guard: least cosine similarity to the original of other outputs (boxes, embeddings).")
@click.option("--max-top1-drop", type=click.FloatRange(0, 100), default=5.0, show_default=True, metavar="PT",
              help="Accuracy guard: largest top-1 accuracy drop in points (with labels).")
@click.option("--force", is_flag=True, help="Write the output even when the accuracy guard fails.")
@click.option("--max-drop", type=click.FloatRange(0, 100), default=None, metavar="PT",
              help="Mixed precision: each weighted layer ternary, int8 (onnxruntime QDQ) or float, the smallest model "
                   "losing at most PT points on --calib (top-1 accuracy with labels, top-1 agreement without); needs a "
                   "ternary pass.")
@click.option("--target-size", default=None, metavar="SIZE",
              help="Mixed precision: the most accurate ternary/int8/float mix whose file fits SIZE: a ratio to the "
                   "original (8x) or a size (120KB, 1.5MB); needs --calib and a ternary pass.")
@click.option("--latency/--no-latency", default=True, show_default=True,
              help="Time the original and the compressed model (batch 1, median of at least 5 runs) on this machine.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Intra-op threads for the latency measurement (default: onnxruntime's, all cores).")
@input_shape_option
@data_options
@pass_options
@debug_option
@handle_errors
def compress(model: str, output: str, passes: str | None, recipe: str | None, calib: str | None,
             eval_data: str | None, report: str | None, quiet: bool, min_agreement: float, min_cosine: float,
             max_top1_drop: float, force: bool, max_drop: float | None, target_size: str | None, latency: bool,
             threads: int | None, input_shape: tuple[str, ...], **kwargs: Any) -> None:
    """Compress MODEL with the given passes and write it to OUTPUT.

    With --eval (or --calib alone: its last 20%, at most 256 samples, held back from the passes) the
    compressed model's fidelity to the original is checked before anything is written; below the
    thresholds the command exits with 3 and writes nothing, unless --force."""
    from . import api
    from .guard import GuardOptions
    from .report import render_report, render_summary

    options = collect_pass_options(kwargs)
    data_opts = make_data_options(kwargs, needed=calib is not None or eval_data is not None)
    if not passes and not recipe:
        raise UsageError(f"give --passes or --recipe; valid passes: {', '.join(sorted(registry()))}")
    guard = GuardOptions(min_agreement=min_agreement / 100, min_cosine=min_cosine,
                         max_top1_drop=max_top1_drop / 100, force=force)
    result = api.compress(model, output, passes, options, calib=calib, recipe=recipe, report=report,
                          eval_data=eval_data, input_shapes=api.parse_input_shapes(input_shape),
                          data_options=data_opts, progress=not quiet and sys.stderr.isatty(), guard=guard,
                          latency=latency, threads=threads, max_drop=max_drop, target_size=target_size)
    if not quiet:
        for rep in result.reports:
            click.echo(render_report(rep))
            click.echo()
    click.echo(render_summary(result.reports, result.before, result.after, result.latency, result.guard))
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
