"""Check a composed config against the signatures of the objects it will build, before any is.

Every node with a `_target_` becomes a call; a key the target does not take, or a value of a type
its annotation rules out, is reported here with the valid keys, instead of as a TypeError deep in
the run (or never, when the value is silently misused).
"""

from __future__ import annotations

import collections.abc
import difflib
import inspect
import os
import types
import typing
from collections.abc import Iterator, Sequence
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

# Arguments the pipeline passes itself: a config that set them would be overridden.
PIPELINE_ARGUMENTS = {
    "task": ("model", "model_config"),
    "head": ("backbone", "num_classes"),
}
HYDRA_KEYS = ("_target_", "_partial_", "_convert_", "_recursive_", "_args_")


def argument_problems(cfg: DictConfig, groups: Sequence[str] | None = None) -> list[str]:
    """One line per key that the node's `_target_` does not take or per value of a wrong type."""
    problems: list[str] = []
    for path, node in _target_nodes(cfg, groups):
        problems.extend(_check_node(path, node))
    return problems


def _target_nodes(
    cfg: DictConfig, groups: Sequence[str] | None
) -> Iterator[tuple[str, DictConfig]]:
    def walk(path: str, node: Any) -> Iterator[tuple[str, DictConfig]]:
        if isinstance(node, DictConfig):
            if "_target_" in node:
                yield path, node
            for key in node:
                if not str(key).startswith("_"):
                    yield from walk(f"{path}.{key}" if path else str(key), node._get_node(key))
        elif isinstance(node, ListConfig):
            for index, item in enumerate(node):
                yield from walk(f"{path}[{index}]", item)

    for key in groups if groups is not None else list(cfg):
        if key != "hydra" and key in cfg:
            yield from walk(str(key), cfg._get_node(key))


def _check_node(path: str, node: DictConfig) -> list[str]:
    try:
        target = get_object(str(node._target_))
    except Exception as error:  # an import error of any kind
        return [f"{path}._target_={node._target_} cannot be imported ({error})"]
    try:
        function = target.__init__ if inspect.isclass(target) else target
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return []
    try:
        hints = typing.get_type_hints(function)
    except Exception:  # annotations naming types that are not importable here
        hints = {}
    parameters = signature.parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    skip = set(HYDRA_KEYS) | set(PIPELINE_ARGUMENTS.get(path, ()))
    name = f"{target.__module__}.{target.__qualname__}"
    valid = [k for k, p in parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    problems = []
    for key in node:
        key = str(key)
        if key in skip:
            continue
        if key not in parameters:
            if not takes_any:
                close = difflib.get_close_matches(key, valid, n=1)
                hint = f" Did you mean {path}.{close[0]}?" if close else ""
                problems.append(
                    f"{path}.{key} is not an argument of {name}.{hint} Valid keys: "
                    f"{', '.join(k for k in valid if k not in skip)}."
                )
            continue
        if key not in hints or OmegaConf.is_missing(node, key):
            continue
        try:
            value = OmegaConf.to_container(node, resolve=True)[key]
        except Exception:  # an interpolation that only resolves at run time
            continue
        if isinstance(node._get_node(key), DictConfig) and "_target_" in node[key]:
            continue  # built by Hydra first
        if not _matches(value, hints[key]):
            problems.append(
                f"{path}.{key}={value!r} is a {type(value).__name__}; {name} expects "
                f"{_describe(hints[key])}."
            )
    return problems


def _matches(value: Any, hint: Any) -> bool:
    """Whether a plain config value can stand for an argument annotated `hint` (lenient)."""
    if hint is Any or hint is object or isinstance(hint, typing.TypeVar):
        return True
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    base = origin or hint
    if base in (list, tuple, collections.abc.Sequence, collections.abc.Iterable):
        if not isinstance(value, list | tuple):
            return False
        inner = [a for a in args if a is not Ellipsis]
        return len(inner) != 1 or all(_matches(v, inner[0]) for v in value)
    if base in (dict, collections.abc.Mapping, collections.abc.MutableMapping):
        return isinstance(value, dict)
    if inspect.isclass(base):
        if isinstance(value, base):
            return True
        if issubclass(base, os.PathLike):
            return isinstance(value, str)
    # Callables, and classes no plain value is (an nn.Module): not checked here.
    return True


def _describe(hint: Any) -> str:
    text = getattr(hint, "__name__", None) if typing.get_origin(hint) is None else None
    return text or str(hint).replace("typing.", "")
