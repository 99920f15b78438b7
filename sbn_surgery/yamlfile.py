"""The one bounded reader for the YAML files a user hands over (``--recipe``, ``--config``).

Every such file is untrusted, so reading it can neither hang nor exhaust memory, and no error
echoes what it holds:

* only a regular file is read (checked after following links, and again on the opened file);
  it is opened without blocking, so a FIFO or device never stalls the command;
* at most :attr:`YamlRules.max_bytes` are read; the text must be UTF-8;
* the document is composed (``yaml.SafeLoader``, no Python objects) and refused when it nests
  deeper than :attr:`YamlRules.max_depth` or expands to more than :attr:`YamlRules.max_nodes`
  values once aliases are counted at each use, as deep and as large as what they refer to (a
  "billion laughs" bomb, or a chain of shallow anchors that nests thousands of levels deep), or
  an alias refers to itself; only then is it constructed;
* a key is quoted in a message only when it looks like an option name (:func:`key_text`);
  anything else is named by its file and line.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .errors import SbnSurgeryError

__all__ = ["YamlRules", "read_yaml_file", "read_text", "parse_yaml", "key_text", "key_lines"]

#: What a key must look like to be quoted back: an option or field name.
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,39}")


@dataclass(frozen=True)
class YamlRules:
    """How one kind of file is read and named in errors."""

    label: str  # how a message names the file: "recipe file", "--config"
    noun: str  # what such a file is: "a recipe", "an options file"
    error: type[SbnSurgeryError]
    shape_hint: str  # what to do with a file nested too deeply
    max_bytes: int = 1 << 20
    max_depth: int = 32
    max_nodes: int = 20_000


def key_text(key: Any) -> Optional[str]:
    """``repr(key)`` when ``key`` looks like an option name (short, identifier characters), else
    None: the caller says where the key is instead of what it says."""
    return repr(key) if isinstance(key, str) and _NAME.fullmatch(key) else None


def key_lines(root: Optional[yaml.Node]) -> dict[str, int]:
    """Top-level key (as text) -> its 1-based line, for a mapping document."""
    if not isinstance(root, yaml.MappingNode):
        return {}
    return {str(k.value): k.start_mark.line + 1 for k, _ in root.value
            if isinstance(k, yaml.ScalarNode)}


def read_text(path: Union[str, os.PathLike], rules: YamlRules) -> str:
    """The UTF-8 text of ``path``: a regular file of at most ``rules.max_bytes`` bytes.
    ``FileNotFoundError`` is left to the caller (which may name alternatives)."""
    path = Path(path)
    try:
        st = os.stat(path)  # follows links: what is checked is what would be read
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise rules.error(f"{rules.label} {path} cannot be read: {exc.strerror}") from None
    _check_stat(path, st, rules)
    try:  # O_NONBLOCK: should the file have become a FIFO since, opening it does not wait
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise rules.error(f"{rules.label} {path} cannot be read: {exc.strerror}") from None
    try:
        _check_stat(path, os.fstat(fd), rules)
        data = os.read(fd, rules.max_bytes + 1)
    except OSError as exc:
        raise rules.error(f"{rules.label} {path} cannot be read: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > rules.max_bytes:
        raise rules.error(f"{rules.label} {path} is over {rules.max_bytes} bytes; "
                          f"{rules.noun} has at most that.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise rules.error(f"{path}:{line}: not UTF-8 text (byte {exc.start}: "
                          f"{data[exc.start:exc.start + 1]!r}); {rules.noun} is a UTF-8 YAML "
                          "file. Save it as UTF-8.") from None


def _check_stat(path: Path, st: os.stat_result, rules: YamlRules) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else \
            "not a regular file (a FIFO, device or socket)"
        raise rules.error(f"{rules.label} {path} is {kind}; give a .yaml file.")
    if st.st_size > rules.max_bytes:
        raise rules.error(f"{rules.label} {path} is {st.st_size} bytes; {rules.noun} has at most "
                          f"{rules.max_bytes}. Is this the right file?")


def _children(node: yaml.Node) -> list[yaml.Node]:
    if not isinstance(node.value, list):
        return []
    return [c for item in node.value for c in (item if isinstance(item, tuple) else (item,))]


def _check_shape(root: Optional[yaml.Node], source: str, rules: YamlRules) -> None:
    """Refuse a document nested too deeply or too large once aliases are expanded (an alias
    counts, at each use, as deep and as large as what it refers to), or whose aliases refer to
    themselves. Iterative, so deep input cannot exhaust the stack."""
    if root is None:
        return
    size: dict[int, int] = {}  # a node's values, expanded
    height: dict[int, int] = {}  # its levels, expanded
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 1, False)]
    open_ids: set[int] = set()
    while stack:
        node, depth, done = stack.pop()
        key, where = id(node), f"{source}:{node.start_mark.line + 1}"
        if done:
            open_ids.discard(key)
            kids = _children(node)
            size[key] = 1 + sum(size[id(c)] for c in kids)
            height[key] = 1 + max((height[id(c)] for c in kids), default=0)
            if size[key] > rules.max_nodes:
                raise rules.error(f"{where}: YAML expands to more than {rules.max_nodes} values "
                                  f"(aliases repeat what they refer to); write {rules.noun} out "
                                  "plainly.")
            continue
        reach = depth - 1 + height.get(key, 1)  # an alias: as deep as what it refers to
        if reach > rules.max_depth:
            raise rules.error(f"{where}: YAML nested more than {rules.max_depth} levels deep "
                              f"(aliases count as deep as what they refer to); "
                              f"{rules.shape_hint}")
        if key in height:
            continue
        if key in open_ids:
            raise rules.error(f"{where}: a YAML alias refers to itself (a recursive structure); "
                              "remove the alias.")
        open_ids.add(key)
        stack.append((node, depth, True))
        stack.extend((c, depth + 1, False) for c in _children(node))


def parse_yaml(text: str, source: str, rules: YamlRules) -> tuple[Optional[yaml.Node], Any]:
    """(composed root node, constructed data) of ``text``, within ``rules``' limits; any problem
    is one ``rules.error`` naming ``source`` and the line."""
    if len(text) > rules.max_bytes:
        raise rules.error(f"{source}: {len(text)} characters; {rules.noun} has at most "
                          f"{rules.max_bytes}. Is this the right file?")
    try:
        return _compose_and_build(text, source, rules)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = str(getattr(exc, "problem", None) or "not YAML")[:120]
        raise rules.error(f"{where}: YAML syntax error: {problem}. Fix the YAML at that "
                          "line.") from None
    except RecursionError:
        raise rules.error(f"{source}: YAML nested too deeply to parse; {rules.shape_hint}") \
            from None


def _compose_and_build(text: str, source: str,
                       rules: YamlRules) -> tuple[Optional[yaml.Node], Any]:
    """What ``yaml.safe_load`` does, in one pass over the text, with the shape checked between
    composing the nodes and building the data."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        _check_shape(root, source, rules)
        return root, (None if root is None else loader.construct_document(root))
    finally:
        loader.dispose()


def read_yaml_file(path: Union[str, os.PathLike],
                   rules: YamlRules) -> tuple[str, Optional[yaml.Node], Any]:
    """(text, root node, data) of the YAML file ``path``, read and parsed within ``rules``."""
    text = read_text(path, rules)
    root, data = parse_yaml(text, str(path), rules)
    return text, root, data
