"""Load ``gateway.yaml``: YAML with line numbers, ``${VAR}`` interpolation, pydantic validation.

Every error names the key path and the YAML line it came from, e.g.::

    gateway.yaml: plugins[1].config.limits -> line 23: Input should be a valid string
"""
from __future__ import annotations

import os
import stat
import re
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import BaseModel, ValidationError

from .model import GatewayConfig

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
#: "${" that does not start a well-formed ${NAME} or ${NAME:-default}
_BAD_VAR = re.compile(r"\$\{(?![A-Za-z_][A-Za-z0-9_]*(?::-[^}]*)?\})")
#: A config file larger than this, or that expands (through YAML aliases) to more values, is refused.
MAX_BYTES = 2**20
MAX_VALUES = 200_000


#: libyaml's parser when PyYAML has it (several times faster), else the pure-Python one
_COMPOSER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class ConfigError(Exception):
    """A configuration problem; ``str()`` is a message fit for an operator."""

    def __init__(self, problems: list[str], source: str = "gateway.yaml") -> None:
        self.problems = problems
        self.source = source
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


Path_ = tuple[Any, ...]


class _Lines:
    """Maps key paths (tuples of keys / indexes) to the YAML line they start on."""

    def __init__(self) -> None:
        self.lines: dict[Path_, int] = {}
        self.count = 0  # values built so far
        # one constructor for every scalar (it remembers each node, so an aliased one is built once)
        self.loader = yaml.SafeLoader("")

    def find(self, path: Iterable[Any]) -> int | None:
        path = tuple(path)
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get(())


def fmt_path(path: Iterable[Any]) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "<root>"


def _interpolate(value: str, path: Path_, line: int, problems: list[str], env: dict[str, str]) -> str:
    if _BAD_VAR.search(value):
        problems.append(f"{fmt_path(path)} -> line {line}: malformed ${{...}}: write ${{NAME}} or ${{NAME:-default}}")
        return ""

    def repl(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in env and env[name] != "":
            return env[name]
        if default is not None:
            return default
        problems.append(f"{fmt_path(path)} -> line {line}: environment variable {name} is not set "
                        f"(use ${{{name}:-default}} to give a default)")
        return ""

    return _VAR.sub(repl, value)


class _TooBig(Exception):
    pass


def _construct(node: yaml.Node, path: Path_, lines: _Lines, problems: list[str], env: dict[str, str]) -> Any:
    lines.count += 1
    if lines.count > MAX_VALUES:  # aliases can make a small file expand beyond any memory
        raise _TooBig
    lines.lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        merged: dict[Any, Any] = {}
        for knode, vnode in node.value:
            if knode.tag == "tag:yaml.org,2002:merge":  # "<<: *defaults" (or a list of them)
                sub = _Lines()  # the merged keys' lines do not replace those written here
                sub.count, sub.loader = lines.count, lines.loader
                for src in (vnode.value if isinstance(vnode, yaml.SequenceNode) else [vnode]):
                    m = _construct(src, path, sub, problems, env)
                    if not isinstance(m, dict):
                        problems.append(f"{fmt_path(path)} -> line {knode.start_mark.line + 1}: "
                                        "'<<' merges a mapping (or a list of mappings)")
                        continue
                    for k, v in m.items():
                        merged.setdefault(k, v)
                lines.count = sub.count
                for k, ln in sub.lines.items():
                    lines.lines.setdefault(k, ln)
                continue
            if not isinstance(knode, yaml.ScalarNode):
                problems.append(f"{fmt_path(path)} -> line {knode.start_mark.line + 1}: a key must be a plain value")
                continue
            key = knode.value
            if key in out:
                problems.append(f"{fmt_path(path + (key,))} -> line {knode.start_mark.line + 1}: duplicate key")
            lines.lines[path + (key,)] = knode.start_mark.line + 1
            out[key] = _construct(vnode, path + (key,), lines, problems, env)
        for k, v in merged.items():  # keys written in the mapping itself win
            out.setdefault(k, v)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(v, path + (i,), lines, problems, env) for i, v in enumerate(node.value)]
    # Scalars: resolve with the safe constructor, then interpolate strings.
    value = lines.loader.construct_object(node) if node.tag != "tag:yaml.org,2002:str" else node.value
    if isinstance(value, str) and "${" in value:
        value = _interpolate(value, path, node.start_mark.line + 1, problems, env)
        # An interpolated plain value stays the string it is (validation reads "8080" as a number
        # where the setting is one, and a secret that looks like a number stays a string); an empty
        # one is null, and a flow collection ("[10.0.0.0/8]") becomes a list or mapping. Read as a
        # YAML document, a secret such as "#x" became null, "a #b" lost its end and "a: b" a mapping.
        if not node.style:  # plain (None from PyYAML's parser, "" from libyaml's)
            if value == "":
                value = None
            elif value.lstrip()[:1] in ("[", "{"):
                try:
                    loaded = yaml.safe_load(value)
                except yaml.YAMLError:
                    loaded = None
                if isinstance(loaded, (list, dict)):
                    value = loaded
    return value


def parse_yaml(text: str, source: str, env: dict[str, str] | None = None) -> tuple[dict[str, Any], _Lines]:
    env = dict(os.environ) if env is None else env
    try:
        node = yaml.compose(text, Loader=_COMPOSER)
    except yaml.YAMLError as e:
        raise ConfigError([_yaml_problem(e, text)], source) from None
    lines = _Lines()
    problems: list[str] = []
    try:
        data = _construct(node, (), lines, problems, env) if node is not None else {}
    except _TooBig:
        raise ConfigError([f"line 1: the document expands to more than {MAX_VALUES} values (YAML aliases?)"],
                          source) from None
    except RecursionError:
        raise ConfigError(["line 1: the document nests too deeply, or a YAML alias contains itself "
                           "(e.g. `x: &a [*a]`)"], source) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(["line 1: the top level must be a mapping"], source)
    if problems:
        raise ConfigError(problems, source)
    return data, lines


def _yaml_problem(e: yaml.YAMLError, text: str) -> str:
    """"line N: invalid YAML: ...", with the line where the problem is (or, for a scanner error
    about something left open, such as a quote, where it was opened)."""
    mark = getattr(e, "context_mark", None) or getattr(e, "problem_mark", None)
    if mark is None and isinstance(getattr(e, "position", None), int):  # a reader error: bad character
        line = text.count("\n", 0, e.position) + 1  # type: ignore[attr-defined]
        return f"line {line}: invalid YAML: a character YAML does not allow"
    where = f"line {mark.line + 1}" if mark is not None else "?"
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)
    return f"{where}: invalid YAML: {(context + ': ') if context else ''}{problem}"


#: Pydantic names a union member in an error's location ("list[...]", "literal[...]"); the key path
#: an operator reads has none of that.
_UNION_PART = re.compile(r"^(?:list|literal|function-\w+|union|tagged-union|str|int|float|bool|dict)\[.*\]$|^(?:str|int|float|bool|list|dict|none)$")


def validation_problems(err: ValidationError, lines: _Lines, prefix: Path_ = ()) -> list[str]:
    out: list[str] = []
    for e in err.errors(include_url=False):
        loc = prefix
        for p in e["loc"]:
            # a union member's name is dropped, unless the YAML has a key by that name there
            if isinstance(p, str) and _UNION_PART.match(p) and loc + (p,) not in lines.lines:
                continue
            loc = loc + (p,)
        line = lines.find(loc)
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        item = f"{fmt_path(loc)} -> line {line if line else '?'}: {msg}"
        if item not in out:
            out.append(item)
    return out


def load_config_text(text: str, source: str = "gateway.yaml", env: dict[str, str] | None = None) -> GatewayConfig:
    data, lines = parse_yaml(text, source, env)
    dup = _duplicate_plugin(data, lines)
    if dup:
        raise ConfigError([dup], source)
    try:
        cfg = GatewayConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(validation_problems(e, lines), source) from None
    # Plugin configs are validated against each plugin's own model.
    from gateway.plugin import registry  # late import: the core depends on config, not the reverse

    problems: list[str] = []
    for name, value in cfg.upstream.headers.items():
        bad = header_problem(name, value)
        if bad:  # the value is a credential: the message never repeats it
            problems.append(f"upstream.headers.{name} -> line {lines.find(('upstream', 'headers', name)) or '?'}: {bad}")
    if not database_url_ok(cfg.database.url):
        problems.append(f"database.url -> line {lines.find(('database', 'url')) or '?'}: not a valid database URL "
                        "(driver://user:password@host:port/name; percent-encode special characters)")
    for i, spec in enumerate(cfg.plugins):
        cls = registry.get(spec.name)
        if cls is None:
            broken = registry.error(spec.name)
            problems.append(f"plugins[{i}].name -> line {lines.find(('plugins', i, 'name'))}: " + (
                f"plugin {spec.name!r} is installed but failed to load: {broken}" if broken else
                f"unknown plugin {spec.name!r} (known: {', '.join(sorted(registry.names()))})"))
            continue
        try:
            spec._validated = cls.Config.model_validate(spec.config)
        except ValidationError as e:
            problems += validation_problems(e, lines, ("plugins", i, "config"))
    names = [p.name for p in cfg.plugins]
    for j, route in enumerate(cfg.routes):
        for pname, ov in route.plugins.items():
            if pname not in names:
                problems.append(f"routes[{j}].plugins.{pname} -> line {lines.find(('routes', j, 'plugins', pname))}: "
                                f"plugin {pname!r} is not in the plugins list")
                continue
            spec = cfg.plugins[names.index(pname)]
            if ov.config and spec.validated is not None:
                cls = registry.get(pname)
                merged = deep_merge(spec.config, ov.config)
                try:
                    ov._validated = cls.Config.model_validate(merged)
                except ValidationError as e:
                    problems += validation_problems(e, lines, ("routes", j, "plugins", pname, "config"))
    if problems:
        raise ConfigError(problems, source)
    cfg._source = source
    return cfg


def _duplicate_plugin(data: Any, lines: _Lines) -> str | None:
    """A plugin named twice in the list, reported at its second entry (the model would only know
    the list as a whole)."""
    plugins = data.get("plugins") if isinstance(data, dict) else None
    if not isinstance(plugins, list):
        return None
    first: dict[str, int] = {}
    for i, p in enumerate(plugins):
        name = p.get("name") if isinstance(p, dict) else None
        if not isinstance(name, str):
            continue
        if name in first:
            return (f"plugins[{i}].name -> line {lines.find(('plugins', i, 'name')) or '?'}: plugin {name!r} is "
                    f"listed twice (first as plugins[{first[name]}]); use routes to give it other settings per path")
        first[name] = i
    return None


_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def header_problem(name: str, value: str) -> str | None:
    """Why ``name: value`` cannot be sent as an HTTP header (None if it can); never quotes the value."""
    if not _TOKEN.match(name):
        return "not a valid header name"
    if any(c in value for c in "\r\n\x00"):
        return "header value must not contain CR, LF or NUL"
    return None


def database_url_ok(url: str) -> bool:
    """True if SQLAlchemy can parse ``url`` (host, port and all); the URL itself is never echoed."""
    from sqlalchemy.engine import make_url

    try:
        u = make_url(url)
        u.port  # noqa: B018  (a non-numeric port only fails when read)
    except Exception:
        return False
    return True


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(path: str | os.PathLike[str], env: dict[str, str] | None = None) -> GatewayConfig:
    p = Path(path)
    try:
        st = p.stat()
        if p.is_dir():
            raise ConfigError(["cannot read: Is a directory"], str(p))
        if not stat.S_ISREG(st.st_mode) and not _readable_stream(p):
            # A FIFO or a device would block the read (and a reload, and the shutdown behind it).
            raise ConfigError(["not a regular file"], str(p))
        if stat.S_ISREG(st.st_mode) and st.st_size > MAX_BYTES:
            raise ConfigError([f"the file is larger than {MAX_BYTES // 2**20} MiB"], str(p))
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError([f"cannot read: {e.strerror}"], str(p)) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError([f"line {line}: not UTF-8 text (byte {e.start})"], str(p)) from None
    cfg = load_config_text(text, str(p), env)
    # The path as given (made absolute), not its target: a reload re-reads a symlink (a release
    # "current" link, a Kubernetes ConfigMap's ..data link) and so follows it to its new target.
    # A stream (``-c /dev/stdin``) is read once: there is nothing to reload from.
    cfg._path = None if _readable_stream(p) else os.path.abspath(p)
    return cfg


def _readable_stream(p: Path) -> bool:
    """/dev/stdin and the like (``-c /dev/stdin``, process substitution): read once at start."""
    return str(p).startswith(("/dev/fd/", "/proc/self/fd/")) or str(p) == "/dev/stdin"


def plugin_config_problems(model: type[BaseModel], data: dict[str, Any]) -> list[str]:
    try:
        model.model_validate(data)
    except ValidationError as e:
        return validation_problems(e, _Lines())
    return []
