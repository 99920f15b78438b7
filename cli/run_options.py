"""The run options of ``finetune`` and ``study`` as typer flags, made from ``RunOptions``.

Each field of :class:`sbn_surgery.train.options.RunOptions` becomes one flag: its name with ``-``
for ``_`` (plus its short name and alias), its help text, its default shown from the model, its
choices (a ``Literal``) as the metavar, its help panel. Every flag defaults to ``None`` (not
given), so a command can tell a flag given on the command line from a value of ``--config`` or
of the stored run, and the library resolves the defaults (and checks the choices: one line). :func:`with_run_options` adds the flags to a command function and
hands it the given ones as one ``options`` dict.
"""

from __future__ import annotations

import functools
import inspect
import typing
from typing import Any, Callable, Optional

import typer

from sbn_surgery.errors import SbnSurgeryError

from .common import parse_kv

#: Fields typed as a comma-separated text on the command line, and the type of each item.
_COMMA_LISTS = {"opt_betas": float, "decay_milestones": int, "mean": float, "std": float,
                "scale": float, "ratio": float}


def _choices(annotation: Any) -> Optional[tuple[str, ...]]:
    """The values of a ``Literal`` field (shown as the metavar ``a|b|c``)."""
    inner = [a for a in typing.get_args(annotation) if a is not type(None)]
    if inner and typing.get_origin(inner[0]) is typing.Literal:
        return typing.get_args(inner[0])
    return None


def _cli_type(name: str, annotation: Any) -> Any:
    if name == "input_size":
        return Optional[tuple[int, int, int]]
    if name == "model_kwargs":
        return Optional[list[str]]
    if name in _COMMA_LISTS:
        return Optional[str]
    if _choices(annotation) is not None:
        return Optional[str]  # checked by RunOptions' Literal: a bad one is one line, exit 2
    return annotation


def _help(field: Any) -> str:
    extra = field.json_schema_extra
    text = field.description or ""
    default = extra["default"]
    if default is not None and "Default:" not in text and "[default:" not in text:
        if isinstance(default, bool):
            shown = "on" if default else "off"
        elif isinstance(default, list):
            shown = ",".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in default)
        else:
            shown = f"{default:g}" if isinstance(default, float) else str(default)
        text += f" [default: {shown}]"
    return text


def option_parameters(exclude: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """One keyword parameter with a ``typer.Option`` per run option not in ``exclude``."""
    from sbn_surgery.train.options import FIELDS, flag

    params = []
    for name, field in FIELDS.items():
        if name in exclude:
            continue
        extra = field.json_schema_extra
        cli_type = _cli_type(name, field.annotation)
        decls = [flag(name)]
        if "bool" in str(field.annotation):
            decls = [f"{flag(name)}/--no-{name.replace('_', '-')}"]
        if extra["alias"]:
            decls.append(flag(extra["alias"]))
        if extra["short"]:
            decls.append(extra["short"])
        choices = _choices(field.annotation)
        metavar = extra["metavar"] or ("|".join(choices) if choices else None)
        info = typer.Option(None, *decls, help=_help(field), metavar=metavar,
                            rich_help_panel=extra["panel"], show_default=False)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info,
                                        annotation=cli_type))
    return params


def parse_given(values: dict[str, Any]) -> dict[str, Any]:
    """The flags given (not None), as the library takes them: ``KEY=VALUE``
    lists as a dict, comma lists as lists."""
    given: dict[str, Any] = {}
    for name, value in values.items():
        if value is None:
            continue
        if name == "model_kwargs":
            value = parse_kv(value, "--model-kwargs") or None
        elif name in _COMMA_LISTS:
            value = _comma_list(name, value)
        elif isinstance(value, tuple):
            value = list(value)
        if value is not None:
            given[name] = value
    return given


def _comma_list(name: str, text: str) -> list:
    from sbn_surgery.train.options import flag

    kind = _COMMA_LISTS[name]
    try:
        return [kind(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise SbnSurgeryError(f"{flag(name)} expects comma-separated "
                              f"{'numbers' if kind is float else 'integers'}, e.g. "
                              f"{'0.9,0.999' if kind is float else '30,60,90'}; got {text!r}"
                              ) from None


class _RunOptionsCommand:
    """A command function with the run options added to its signature, built on first use: the
    options come from ``RunOptions`` (pydantic), which ``sbn-surgery --help`` need not import.
    Called, it hands the given flags to the function as one ``options`` dict."""

    def __init__(self, func: Callable, exclude: tuple[str, ...]) -> None:
        functools.update_wrapper(self, func, assigned=("__module__", "__name__", "__qualname__",
                                                       "__doc__"), updated=())
        self._func, self._exclude = func, exclude
        self._built: Optional[tuple[inspect.Signature, dict[str, Any], list[str]]] = None

    def _build(self) -> tuple[inspect.Signature, dict[str, Any], list[str]]:
        if self._built is None:
            own = [p for p in inspect.signature(self._func).parameters.values()
                   if p.name != "options"]
            extra = option_parameters(self._exclude + tuple(p.name for p in own))
            hints = typing.get_type_hints(self._func)
            hints.pop("options", None)
            hints.pop("return", None)
            self._built = (inspect.Signature(own + extra),
                           {**hints, **{p.name: p.annotation for p in extra}},
                           [p.name for p in extra])
        return self._built

    @property
    def __signature__(self) -> inspect.Signature:  # read by inspect.signature (typer)
        return self._build()[0]

    @property
    def __annotations__(self) -> dict[str, Any]:  # read by typing.get_type_hints (typer)
        return self._build()[1]

    def __call__(self, **kwargs: Any) -> Any:
        options = parse_given({n: kwargs.pop(n) for n in self._build()[2]})
        return self._func(options=options, **kwargs)


def with_run_options(exclude: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Decorator: the command gets the run options as flags, and receives the given ones as
    ``options`` (a dict). The command's own parameters come first, in their order. The flags are
    made when typer first reads the command's signature (running or helping that command)."""

    def wrap(func: Callable) -> Callable:
        return _RunOptionsCommand(func, exclude)  # type: ignore[return-value]

    return wrap
