"""What a data set says about its classes, and how its labels meet a trained model's.

Every DataModule exposes `num_classes`, `class_names` (one per contiguous label, in label order)
and `category_ids` (COCO's category id of each label; None for other formats). A configured
`data.num_classes` is only a check of what the data say (`check_num_classes`).

A model records the class names it was trained with (`model_config["class_names"]`, see
`pvtlab.pipeline.model_config`). Evaluating it on other data maps the data's classes onto the
model's labels by name (`label_mapping`): a subset of the model's classes is scored on those
classes, a class the model does not know is an error naming it, and the trained head is kept.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from pvtlab.config import ConfigError

log = logging.getLogger(__name__)

__all__ = [
    "CLASS_LIST_FILES",
    "check_num_classes",
    "label_mapping",
    "read_class_list",
]

# A segmentation set's own class list, looked for in this order under its root.
CLASS_LIST_FILES = ("classes.txt", "manifest.json")


def check_num_classes(
    configured: int | None, found: int, source: str | Path, what: str = "classes"
) -> None:
    """A set `data.num_classes` must equal what the data say: `found` `what` (classes, class
    folders, categories) read from `source`."""
    if configured is not None and int(configured) != found:
        raise ConfigError(
            f"data.num_classes={configured} but {source} has {found} {what}; remove "
            f"data.num_classes (it is read from the data) or set data.num_classes={found}"
        )


def read_class_list(root: Path) -> tuple[tuple[str, ...], Path] | None:
    """The class names a data set folder lists, and the file they came from; None if none.

    `classes.txt`: one name a line, in label order (blank lines and `#` comments skipped).
    `manifest.json`: a `classes` list of names (the shapes generator writes one).
    """
    text_file = root / CLASS_LIST_FILES[0]
    if text_file.is_file():
        names = [
            line.strip()
            for line in text_file.read_text().splitlines()
            if line.strip() and not line.strip().startswith("#")
        ]
        if not names:
            raise ConfigError(f"{text_file} lists no class; write one class name a line")
        return _unique(names, text_file), text_file
    manifest = root / CLASS_LIST_FILES[1]
    if manifest.is_file():
        try:
            classes = json.loads(manifest.read_text()).get("classes")
        except (json.JSONDecodeError, AttributeError) as error:
            raise ConfigError(f"{manifest} is not a JSON object: {error}") from error
        if classes is None:
            return None
        if not isinstance(classes, list) or not classes:
            raise ConfigError(f"{manifest}: `classes` must be a non-empty list of class names")
        return _unique([str(c) for c in classes], manifest), manifest
    return None


def _unique(names: Sequence[str], source: Path) -> tuple[str, ...]:
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"{source} names class(es) {repeated} more than once")
    return tuple(names)


def label_mapping(
    data_names: Sequence[str],
    model_names: Sequence[str] | None,
    model_num_classes: int,
    source: str | Path,
) -> list[int]:
    """The model's label of each of the data's classes (`data_names`, in the data's label order).

    By name when the model records its class names; a model without names (a released file)
    takes classes named by their index (`0`, `1`, ...) or, when the counts agree, the data's own
    order. A class the model does not know is a ConfigError naming it; a subset is logged.
    """
    data_names = [str(n) for n in data_names]
    if model_names:
        index = {str(name): label for label, name in enumerate(model_names)}
        unknown = [n for n in data_names if n not in index]
        if unknown:
            raise ConfigError(
                f"{source} holds class(es) {unknown[:10]}{' ...' if len(unknown) > 10 else ''} "
                f"that the model does not know; it was trained on {len(index)} classes "
                f"({', '.join(list(index)[:10])}{', ...' if len(index) > 10 else ''})"
            )
        mapping = [index[n] for n in data_names]
        how = "by name"
    elif all(n.isdigit() for n in data_names):
        mapping = [int(n) for n in data_names]
        beyond = [
            n for n, label in zip(data_names, mapping, strict=True) if label >= model_num_classes
        ]
        if beyond:
            raise ConfigError(
                f"{source} holds class index(es) {beyond[:10]} beyond the model's "
                f"{model_num_classes} classes (0..{model_num_classes - 1})"
            )
        how = "by class index"
    elif len(data_names) == model_num_classes:
        return list(range(model_num_classes))
    else:
        raise ConfigError(
            f"{source} has {len(data_names)} classes and the model {model_num_classes}, and the "
            "model records no class names to match them by: name the class folders by the "
            "model's class index (0, 1, ...) or evaluate a pvtlab checkpoint, which records them"
        )
    if mapping == list(range(model_num_classes)):
        return mapping
    log.warning(
        "%s holds %d of the model's %d classes: they are scored %s, on the model's own %d-class "
        "head",
        source,
        len(set(mapping)),
        model_num_classes,
        how,
        model_num_classes,
    )
    return mapping
