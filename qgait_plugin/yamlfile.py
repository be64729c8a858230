"""Read a YAML config file strictly: one reader for every YAML file the package reads.

``yaml.safe_load`` never runs code, but it still lets four careless or hostile inputs through,
which :func:`load_yaml` refuses with a :class:`~qgait_plugin.errors.ConfigError` naming the file
(and the line or key path):

* a **duplicate key** (``quant:`` twice): YAML keeps the last one silently, so the run trains
  something other than what the first section says. The message names the key and both lines.
  Keys merged in with ``<<: *anchor`` may be overridden; that is what merging is for.
* a **non-finite number** (``.nan``, ``.inf``, ``1e999``) anywhere in the file: no setting of
  ours means "not a number", and a NaN slips past every range check. The message names the key
  path (``quant.idd.weight``).
* an **alias bomb**: a few lines of nested ``&anchor`` / ``*alias`` references stand for billions
  of values. Loading them is cheap (aliases are shared), but anything that walks or prints the
  value is not. The file is refused while composing, before anything is built, when its aliases
  expand to more than :data:`MAX_EXPANDED_NODES` nodes, or refer to themselves.
* an **empty file** (or only comments, or ``null``): running with every default is almost never
  what the user meant.

Malformed YAML and undecodable bytes are a ``ConfigError`` too, with PyYAML's line and column.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, Optional, Union

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .errors import ConfigError, InputNotFound

#: the most nodes a file may stand for with its aliases expanded (real configs have a few hundred)
MAX_EXPANDED_NODES = 100_000

_FLOAT_TAG = "tag:yaml.org,2002:float"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader; :func:`load_yaml` adds the checks between composing and constructing."""


def _line(node: Node) -> int:
    return node.start_mark.line + 1


def _key_text(loader: StrictLoader, key: Node) -> str:
    return str(loader.construct_object(key)) if isinstance(key, ScalarNode) else f"<{key.id} at line {_line(key)}>"


def _expanded_size(root: Node) -> None:
    """Refuse a node graph whose aliases expand to more than :data:`MAX_EXPANDED_NODES` nodes, or to a cycle."""
    sizes: Dict[int, int] = {}
    active: set = set()
    stack = [(root, False)]
    while stack:  # iterative post-order: the nesting depth is the file's, not Python's
        node, done = stack.pop()
        key = id(node)
        if done:
            active.discard(key)
            if isinstance(node, MappingNode):
                children = [n for pair in node.value for n in pair]
            elif isinstance(node, SequenceNode):
                children = list(node.value)
            else:
                children = []
            size = 1 + sum(sizes[id(c)] for c in children)
            if size > MAX_EXPANDED_NODES:
                raise ConfigError(f"line {_line(node)}: the value starting here expands (through aliases) to more "
                                  f"than {MAX_EXPANDED_NODES:,} values; refused (an alias bomb, or far too large for "
                                  "a config)")
            sizes[key] = size
            continue
        if key in sizes:
            continue
        if key in active:
            raise ConfigError(f"line {_line(node)}: an alias refers to the value that contains it; recursive "
                              "values are refused")
        active.add(key)
        stack.append((node, True))
        if isinstance(node, MappingNode):
            stack.extend((n, False) for pair in node.value for n in pair)
        elif isinstance(node, SequenceNode):
            stack.extend((n, False) for n in node.value)


def _check_values(loader: StrictLoader, root: Node) -> None:
    """Duplicate keys and non-finite numbers, named by key path (each shared node checked once, the first
    problem in file order reported)."""
    seen: set = set()
    stack = [(root, "")]
    while stack:
        node, path = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, ScalarNode):
            if node.tag == _FLOAT_TAG:
                value = loader.construct_yaml_float(node)
                if not math.isfinite(value):
                    raise ConfigError(f"{path or '<top level>'}: {node.value} (line {_line(node)}) is not a finite "
                                      "number; no setting takes NaN or infinity")
        elif isinstance(node, SequenceNode):
            stack.extend(reversed([(child, f"{path}[{i}]") for i, child in enumerate(node.value)]))
        elif isinstance(node, MappingNode):
            first: Dict[Any, Node] = {}
            children = []
            for key_node, value_node in node.value:
                if key_node.tag == _MERGE_TAG:
                    children.append((value_node, path))
                    continue
                name = _key_text(loader, key_node)
                if isinstance(key_node, ScalarNode):
                    key = loader.construct_object(key_node)
                    try:
                        earlier = first.get(key)
                    except TypeError:  # unhashable: the constructor names it
                        earlier = None
                    if earlier is not None:
                        where = f"{path}.{name}" if path else name
                        raise ConfigError(f"{where}: duplicate key (lines {_line(earlier)} and {_line(key_node)}); "
                                          "YAML would keep only the last one silently. Keep one of them")
                    try:
                        first[key] = key_node
                    except TypeError:
                        pass
                children.append((value_node, f"{path}.{name}" if path else name))
            stack.extend(reversed(children))


def load_yaml(path: Union[str, os.PathLike[str]], what: str = "YAML config file") -> Any:
    """The data in the YAML file at ``path``, checked as the module docstring says.

    ``what`` names the file's role in the not-found message. Every refusal is a
    :class:`ConfigError` (an :class:`InputNotFound` for a missing file) that starts with the path.
    """
    p = os.fspath(path)
    if os.path.isdir(p):
        raise ConfigError(f"{p}: is a folder; expected a {what}")
    if not os.path.isfile(p):
        raise InputNotFound(f"{p}: {what} not found")
    try:
        with open(p, "rb") as f:
            loader = StrictLoader(f)
            try:
                node: Optional[Node] = loader.get_single_node()
                if node is None:
                    raise ConfigError("is empty; expected a YAML mapping of settings")
                _expanded_size(node)
                _check_values(loader, node)
                data = loader.construct_document(node)
            finally:
                loader.dispose()
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
    except yaml.YAMLError as e:
        detail = " ".join(str(e).split())  # PyYAML's messages span lines; they give the line and column
        detail = detail if len(detail) <= 400 else detail[:397] + "..."
        raise ConfigError(f"{p}: not a valid YAML file ({detail})") from None
    except RecursionError:
        raise ConfigError(f"{p}: nested too deeply to be a config") from None
    if data is None:
        raise ConfigError(f"{p}: holds no settings (null); expected a YAML mapping of settings")
    return data
