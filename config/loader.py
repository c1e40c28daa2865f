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

#: "$${" (a literal "${"), ``${NAME}`` / ``${NAME:-default}`` (group 1 the name, 2 the default),
#: or a "${" that starts neither (group 1 None)
_DOLLAR = re.compile(r"\$\$\{|\$\{(?:([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\})?")
#: A config file larger than this, or that expands (through YAML aliases) to more values, is refused.
MAX_BYTES = 2**20
MAX_VALUES = 200_000
#: Deeper nesting is refused before libyaml composes the document: its composer recurses in C, one
#: call per level, and some 25,000 levels (a 60 KB file) overflow the stack and kill the process.
#: A real config nests some 8 levels.
MAX_DEPTH = 100
_YAML_TAG = "tag:yaml.org,2002:"


#: libyaml's parser when PyYAML has it (several times faster), else the pure-Python one
_COMPOSER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class ConfigError(Exception):
    """A configuration problem; ``str()`` is a message fit for an operator."""

    def __init__(self, problems: list[str], source: str = "gateway.yaml") -> None:
        self.problems = problems
        self.source = source
        #: the file's (inode, size, mtime) before it was read, when it was (see file_state)
        self.read_state: tuple[int, int, int] | None = None
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


Path_ = tuple[Any, ...]


class _Lines:
    """Maps key paths (tuples of keys / indexes) to the YAML line they start on."""

    def __init__(self) -> None:
        self.lines: dict[Path_, int] = {}
        self.count = 0  # values built so far
        #: paths whose value was already reported (an unset variable, a value YAML cannot read):
        #: validation's complaint about the null left there would only repeat it
        self.bad: set[Path_] = set()
        #: paths whose value holds a variable set in the form Kubernetes gives a service's address
        #: (GATEWAY_PORT=tcp://10.96.0.12:8080 for a Service named gateway): (name, value)
        self.service_links: dict[Path_, tuple[str, str]] = {}
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
    parent: Any = None
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + shown_key(str(part), header=parent in _HEADER_MAPS)
        parent = part
    return out or "<root>"


#: Settings whose keys are header names, their values credentials (upstream.headers, an exporter's
#: headers, the headers plugin's request / response).
_HEADER_MAPS = frozenset({"headers", "request", "response"})
#: The start of a key made of what a header name may hold (an HTTP token).
_TOKEN_START = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{0,64}")
#: A value typed into a key: a name, then = or : or a blank, then something long.
_KEY_WITH_VALUE = re.compile(r"[^=:\s]+\s*[=:\s]\s*\S{8,}")


def shown_key(key: str, header: bool = True) -> str:
    """A mapping key as a message shows it. A value typed into a key (``Authorization=Bearer
    sk-...``, ``"Authorization Bearer sk-..."``, a secret alone as a header's name) is a secret:
    never quoted. A header map's key is cut at the first character a header name cannot hold, and
    one longer than 24 characters is not shown (header names are short, secrets long); any other
    key only when it looks like a name and a value (a misspelt setting, ``max body size``, is named
    in full)."""
    head = _TOKEN_START.match(key).group(0)  # type: ignore[union-attr]
    if header:
        if len(head) < len(key):
            return f"{head[:24]}…(rest not shown)"
        return key if len(key) <= 24 else f"<a {len(key)}-character name, not shown>"
    if _KEY_WITH_VALUE.match(key) and len(key) > 24:
        return f"{head[:24]}…(rest not shown)"
    return key


#: A Kubernetes service link: the address of a Service, in every pod of its namespace, under its
#: name's ``_PORT`` (and ``_PORT_<n>_TCP``) variables.
_SERVICE_LINK = re.compile(r"^(?:tcp|udp|sctp)://[0-9a-fA-F.:\[\]]+:\d+$")
_SERVICE_LINK_NAME = re.compile(r"^[A-Z0-9_]+_PORT(?:_\d+_(?:TCP|UDP|SCTP))?$")
#: A whole value that is a variable reference in another tool's syntax: the shell's $NAME, a
#: Kubernetes manifest's $(NAME), a template's {{ ... }}, Windows' %NAME%.
_NOT_SUBSTITUTED = re.compile(r"^(?:\$[A-Za-z_]\w*|\$\([A-Za-z_]\w*\)|\{\{.*\}\}|%[A-Za-z_]\w*%)$", re.S)


def _interpolate(value: str, path: Path_, line: int, problems: list[str], env: dict[str, str],
                 links: dict[Path_, tuple[str, str]] | None = None) -> str:
    """``${NAME}`` and ``${NAME:-default}`` from ``env``; ``$${`` is a literal ``${``. A default is
    taken as written: one holding another ``${`` (``${A:-${B}}``, which the pattern would cut at
    the first ``}``) is refused rather than read as something else. No message repeats the value."""
    for m in _DOLLAR.finditer(value):
        if m.group(0) == "$${":
            continue
        if m.group(1) is None:
            problems.append(f"{fmt_path(path)} -> line {line}: malformed ${{...}}: write ${{NAME}} or "
                            "${NAME:-default} ($${ for a literal ${)")
            return ""
        if m.group(2) is not None and "${" in m.group(2):
            problems.append(f"{fmt_path(path)} -> line {line}: a default cannot hold another ${{...}} "
                            f"(${{{m.group(1)}:-...}}): write the default value itself, e.g. "
                            f"${{{m.group(1)}:-value}}")
            return ""

    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$${":
            return "${"
        name, default = m.group(1), m.group(2)
        if name in env and env[name] != "":
            if links is not None and _SERVICE_LINK_NAME.match(name) and _SERVICE_LINK.match(env[name]):
                links[path] = (name, env[name])  # (an address, no secret: shown if the value is refused)
            return env[name]
        if default is not None:
            return default
        problems.append(f"{fmt_path(path)} -> line {line}: environment variable {name} is not set "
                        f"(use ${{{name}:-default}} to give a default)")
        return ""

    return _DOLLAR.sub(repl, value)


class _TooBig(Exception):
    pass


def _construct(node: yaml.Node, path: Path_, lines: _Lines, problems: list[str], env: dict[str, str]) -> Any:
    lines.count += 1
    if lines.count > MAX_VALUES:  # aliases can make a small file expand beyond any memory
        raise _TooBig
    lines.lines.setdefault(path, node.start_mark.line + 1)
    if not node.tag.startswith(_YAML_TAG) or _COLLECTION_TAG.get(type(node), node.tag) != node.tag:
        return _unreadable(node, path, lines, problems)  # `!vault x`, `!env FOO`: a tag nothing here reads
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        merged: dict[Any, Any] = {}
        for knode, vnode in node.value:
            if knode.tag == "tag:yaml.org,2002:merge":  # "<<: *defaults" (or a list of them)
                sub = _Lines()  # the merged keys' lines do not replace those written here
                sub.count, sub.loader, sub.bad = lines.count, lines.loader, lines.bad
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
            if not path and key.startswith("x-"):  # docker-compose style: holds anchors, is not read
                out[key] = None
                continue
            out[key] = _construct(vnode, path + (key,), lines, problems, env)
        for k, v in merged.items():  # keys written in the mapping itself win
            out.setdefault(k, v)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(v, path + (i,), lines, problems, env) for i, v in enumerate(node.value)]
    # Scalars: resolve with the safe constructor, then interpolate strings.
    try:
        value = lines.loader.construct_object(node) if node.tag != "tag:yaml.org,2002:str" else node.value
    except (yaml.YAMLError, ValueError, OverflowError):  # `2020-13-45`, `!!int abc`, 5,000 digits
        return _unreadable(node, path, lines, problems)
    if path == ("admin", "token") and isinstance(value, str) and (_NOT_SUBSTITUTED.match(value.strip()) or any(
            m.group(2) is not None and _NOT_SUBSTITUTED.match(m.group(2).strip()) for m in _DOLLAR.finditer(value))):
        # `$GATEWAY_ADMIN_TOKEN` written in the file (or as a default: ${A:-$B}): only ${NAME} is
        # substituted, and the token would be the variable's name, which anyone can guess (a
        # value read from the environment is taken as it is)
        problems.append(f"admin.token -> line {node.start_mark.line + 1}: the token is written like a variable the "
                        "gateway does not substitute ($NAME, $(NAME), {{ ... }} or %NAME%): write ${NAME} to read it "
                        "from the environment")
        lines.bad.add(path)
        return None
    if isinstance(value, str) and "${" in value:
        before = len(problems)
        value = _interpolate(value, path, node.start_mark.line + 1, problems, env, lines.service_links)
        if len(problems) > before:
            lines.bad.add(path)
        # An interpolated plain value stays the string it is (validation reads "8080" as a number
        # where the setting is one, and a secret that looks like a number stays a string); an empty
        # one is null, and a flow collection ("[10.0.0.0/8]") becomes a list or mapping. Read as a
        # YAML document, a secret such as "#x" became null, "a #b" lost its end and "a: b" a mapping.
        if not node.style:  # plain (None from PyYAML's parser, "" from libyaml's)
            if value == "":
                # (in upstream.headers an empty value stays one: the header is then not sent, while
                # a name with no value at all, `{Authorization=Bearer x}`, is a mistake and refused)
                value = "" if path[:2] == ("upstream", "headers") else None
            elif value.lstrip()[:1] in ("[", "{"):
                try:
                    loaded = yaml.safe_load(value)
                except yaml.YAMLError as e:
                    if value.lstrip().startswith("[") and _IPV6_UNQUOTED.search(value):
                        # `[::1/128, fd00::/8]`: left a string, the setting would only say "not a
                        # valid list" (another value that is not YAML stays the string it is: a
                        # secret may start with "{")
                        why = (getattr(e, "problem", None) or str(e).splitlines()[0]).strip()
                        problems.append(f"{fmt_path(path)} -> line {node.start_mark.line + 1}: the value from the "
                                        f"environment looks like a YAML list but is not one ({why}){_IPV6_HINT}")
                        lines.bad.add(path)
                        return None
                    loaded = None
                except (ValueError, OverflowError, RecursionError):
                    loaded = None
                if isinstance(loaded, (list, dict)):
                    value = loaded
    return value


#: The one tag a mapping or a list is read with: another (`!!set {a, b}`, `!!python/object:x {}`)
#: would make it something the config does not hold.
_COLLECTION_TAG = {yaml.MappingNode: _YAML_TAG + "map", yaml.SequenceNode: _YAML_TAG + "seq"}


def _unreadable(node: yaml.Node, path: Path_, lines: _Lines, problems: list[str]) -> None:
    """Report a value the safe constructor cannot build, by path and line and why, never quoting it
    (it may be a secret: ``!!int sk-...`` made int() repeat it); the value is left null."""
    tag = node.tag
    if not tag.startswith(_YAML_TAG):
        why = f"tag {tag[:40]} is not supported"
    elif not isinstance(node, yaml.ScalarNode):
        why = f"tag !!{tag[len(_YAML_TAG):][:40]} is not supported"
    elif tag == _YAML_TAG + "timestamp":
        why = "it reads as a date or time that does not exist; quote it if it is text"
    elif tag in (_YAML_TAG + "int", _YAML_TAG + "float") and len(str(node.value)) > 1000:
        why = "a number with too many digits"
    else:
        why = f"not a valid !!{tag[len(_YAML_TAG):]}"
    problems.append(f"{fmt_path(path)} -> line {node.start_mark.line + 1}: not a value YAML can read here ({why})")
    lines.bad.add(path)
    return None


def _too_deep(text: str) -> int | None:
    """The line where the nesting first goes deeper than MAX_DEPTH, else None. The event parser
    does not recurse (100,000 levels parse), and stops being read at the first level too many."""
    depth = 0
    for ev in yaml.parse(text, Loader=_COMPOSER):
        if isinstance(ev, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                return ev.start_mark.line + 1
        elif isinstance(ev, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
    return None


def parse_yaml(text: str, source: str, env: dict[str, str] | None = None) -> tuple[dict[str, Any], _Lines]:
    data, lines, problems = _parse_yaml(text, source, env)
    if problems:
        raise ConfigError(problems, source)
    return data, lines


def _parse_yaml(text: str, source: str, env: dict[str, str] | None) -> tuple[dict[str, Any], _Lines, list[str]]:
    """The document as data, the line of each path, and the problems found building it (unset
    variables, unreadable values, duplicate keys: each leaves a value, so validation can go on and
    report its own problems with them). A file that cannot be read as a whole raises ConfigError."""
    env = dict(os.environ) if env is None else env
    try:
        deep = _too_deep(text)
        node = yaml.compose(text, Loader=_COMPOSER) if deep is None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        if "nesting depth" in str(getattr(e, "problem", "")) and mark is not None:
            # (libyaml's own limit, 1000 levels in PyYAML 6.0.4's wheels, may come first: the same error)
            deep = mark.line + 1
        else:
            raise ConfigError([_yaml_problem(e, text)], source) from None
    if deep is not None:
        raise ConfigError([f"line {deep}: the document nests too deeply (more than {MAX_DEPTH} levels)"], source)
    lines = _Lines()
    problems: list[str] = []
    try:
        data = _construct(node, (), lines, problems, env) if node is not None else None
    except _TooBig:
        raise ConfigError([f"line 1: the document expands to more than {MAX_VALUES} values (YAML aliases?)"],
                          source) from None
    except RecursionError:
        raise ConfigError(["line 1: the document nests too deeply, or a YAML alias contains itself "
                           "(e.g. `x: &a [*a]`)"], source) from None
    if data is None:  # nothing, blanks and comments, or a lone `---`: not "upstream: Field required"
        raise ConfigError(["the file is empty: it holds no settings"], source)
    if not isinstance(data, dict):
        raise ConfigError(["line 1: the top level must be a mapping"], source)
    data = {k: v for k, v in data.items() if not (isinstance(k, str) and k.startswith("x-"))}
    return data, lines, problems


#: An IPv6 address starting with ':' written bare (`host: ::`, `[::1/128]`): YAML reads the ':' as
#: its own syntax.
_IPV6_UNQUOTED = re.compile(r"(?:^|[\s\[,{])::")
_IPV6_HINT = ' (an IPv6 address starting with ":" must be quoted: "::", ["::1/128"])'
#: Quoted spans of a YAML line (what is inside them is text, not syntax).
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\']|\'\')*\'')


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
    hint = ""
    if context and context.startswith("while parsing a flow") and mark is not None:
        end = getattr(e, "problem_mark", None) or mark
        if "${" in "\n".join(text.splitlines()[mark.line:end.line + 1]):
            # `{key: ${VAR}}`: the `{` of `${` opens a mapping inside the flow collection
            hint = ' (inside [...] or {...}, quote a ${VAR}: "${VAR}")'
    at = getattr(e, "problem_mark", None)
    if at is not None and not hint:
        row = (text.splitlines()[at.line:at.line + 1] or [""])[0]
        if row[at.column:at.column + 1] == "\t" or "\t" in row[:len(row) - len(row.lstrip())]:
            hint = " (a tab: YAML indents with spaces only)"
        elif _IPV6_UNQUOTED.search(_QUOTED.sub("", row).split(" #", 1)[0]):
            hint = _IPV6_HINT
        elif (context or "").startswith("while scanning an alias") and re.search(r":\s*\*\s*$", row):
            hint = ' (a bare * is YAML\'s alias sign: quote it, "*")'
    return f"{where}: invalid YAML: {(context + ': ') if context else ''}{problem}{hint}"


#: Pydantic names a union member in an error's location ("list[...]", "literal[...]"); the key path
#: an operator reads has none of that.
_UNION_PART = re.compile(r"^(?:list|literal|function-\w+|union|tagged-union|str|int|float|bool|dict)\[.*\]$|^(?:str|int|float|bool|list|dict|none)$")


def validation_problems(err: ValidationError, lines: _Lines, prefix: Path_ = ()) -> list[str]:
    return [p for _, p in _located_problems(err, lines, prefix)]


def _located_problems(err: ValidationError, lines: _Lines, prefix: Path_ = ()) -> list[tuple[Path_, str]]:
    """(key path, message) of each problem; none under a path already reported (``lines.bad``)."""
    out: list[tuple[Path_, str]] = []
    located = []
    for e in err.errors(include_url=False):
        loc = prefix
        for p in e["loc"]:
            # a union member's name is dropped, unless the YAML has a key by that name there
            if isinstance(p, str) and _UNION_PART.match(p) and loc + (p,) not in lines.lines:
                continue
            loc = loc + (p,)
        located.append((e, loc))
    for e, loc in located:
        if e["type"] == "literal_error" and any(len(d) > len(loc) and d[:len(loc)] == loc for _, d in located):
            # a union's other branch went further in (key_by: [user] is a list with a wrong part,
            # not a wrong "global"): that one says what is wrong
            continue
        if any(loc[:n] in lines.bad for n in range(len(loc) + 1)):
            continue
        if loc and e["type"] == "value_error" and any(b[:len(loc)] == loc for b in lines.bad):
            continue  # a section's own check that saw the null an unset variable left ("admin: needs a token")
        line = lines.find(loc)
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "value_error" and msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]  # (pydantic's prefix to a validator's own message)
        item = f"{fmt_path(loc)} -> line {line if line else '?'}: {msg}"
        link = lines.service_links.get(loc)
        if link is not None:
            item += (f" ({link[0]} is {link[1]!r}: the variable Kubernetes sets in a pod for a Service by that name; "
                     "set enableServiceLinks: false in the pod spec, or name the variable otherwise)")
        if all(item != o for _, o in out):
            out.append((loc, item))
    return out


def load_config_text(text: str, source: str = "gateway.yaml", env: dict[str, str] | None = None) -> GatewayConfig:
    """Parse and validate. The problems of every stage that can be checked on its own come
    together (unset variables, a plugin listed twice, the core settings, each plugin's config and
    each route's), so a file with several mistakes needs one run of ``gateway check``, not one each."""
    data, lines, problems = _parse_yaml(text, source, env)
    dup = _duplicate_plugins(data, lines)
    problems += dup
    cfg: GatewayConfig | None = None
    core: list[Path_] = []  # where the core model found problems: the plugin checks skip those entries
    try:
        cfg = GatewayConfig.model_validate(data)
    except ValidationError as e:
        for loc, p in _located_problems(e, lines):
            if dup and not loc and "is listed twice" in p:  # already said, with its line
                continue
            core.append(loc)
            problems.append(p + _under_config_hint(data, loc, p))
    # Plugin configs are validated against each plugin's own model.
    from gateway.plugin import registry  # late import: the core depends on config, not the reverse

    if cfg is not None:
        for name, value in cfg.upstream.headers.items():
            bad = header_problem(name, value)
            if bad:  # the value is a credential: the message never repeats it
                line = lines.find(("upstream", "headers", name)) or "?"
                problems.append(f"upstream.headers.{shown_key(name)} -> line {line}: {bad}")
        if not database_url_ok(cfg.database.url):
            problems.append(f"database.url -> line {lines.find(('database', 'url')) or '?'}: not a valid database URL "
                            "(driver://user:password@host:port/name; percent-encode special characters)")

    def flagged(path: Path_) -> bool:
        """the core (or the parse) already reported something at, above or under ``path``"""
        return any(loc and (loc[:len(path)] == path or path[:len(loc)] == loc) for loc in core) or \
            any(path[:n] in lines.bad for n in range(1, len(path) + 1))

    # Read from the data as written (not ``cfg``, which exists only if the core settings are valid).
    specs = data.get("plugins") if isinstance(data.get("plugins"), list) else []
    names = [p.get("name") if isinstance(p, dict) else None for p in specs]
    validated: dict[int, Any] = {}
    for i, spec in enumerate(specs):
        config = spec.get("config") if isinstance(spec, dict) else None
        config = {} if config is None else config
        if flagged(("plugins", i)) or not isinstance(names[i], str) or not isinstance(config, dict):
            continue
        cls = registry.get(names[i])
        if cls is None:
            broken = registry.error(names[i])
            problems.append(f"plugins[{i}].name -> line {lines.find(('plugins', i, 'name'))}: " + (
                f"plugin {names[i]!r} is installed but failed to load: {broken}" if broken else
                f"unknown plugin {names[i]!r} (known: {', '.join(sorted(registry.names()))})"))
            continue
        try:
            validated[i] = cls.Config.model_validate(config)
        except ValidationError as e:
            problems += validation_problems(e, lines, ("plugins", i, "config"))
    names_known = not any(loc[:1] == ("plugins",) and (len(loc) <= 2 or loc[2] == "name") for loc in core)
    routes = data.get("routes") if isinstance(data.get("routes"), list) else []
    route_validated: dict[tuple[int, str], Any] = {}
    for j, route in enumerate(routes):
        overrides = route.get("plugins") if isinstance(route, dict) else None
        if flagged(("routes", j)) or not isinstance(overrides, dict):
            continue
        for pname, ov in overrides.items():
            if pname not in names:
                if names_known:  # (else the core's problem with the list says why)
                    line = lines.find(("routes", j, "plugins", pname))
                    problems.append(f"routes[{j}].plugins.{pname} -> line {line}: plugin {pname!r} is not in the "
                                    "plugins list")
                continue
            k = names.index(pname)
            ov_config = ov.get("config") if isinstance(ov, dict) else None
            if ov_config and isinstance(ov_config, dict) and k in validated:
                cls = registry.get(pname)
                fixed = [f for f in getattr(cls, "route_fixed", ()) if _has_path(ov_config, f.split("."))]
                if fixed:
                    for f in fixed:
                        line = lines.find(("routes", j, "plugins", pname, "config", *f.split(".")))
                        problems.append(f"routes[{j}].plugins.{pname}.config.{f} -> line {line}: {f} applies to the "
                                        f"whole gateway and cannot be set per route (set it under plugins)")
                    continue
                merged = deep_merge(specs[k].get("config") or {}, ov_config)
                try:
                    route_validated[(j, pname)] = cls.Config.model_validate(merged)
                except ValidationError as e:
                    problems += validation_problems(e, lines, ("routes", j, "plugins", pname, "config"))
    if cfg is not None:
        own = {k.lower() for k in cfg.upstream.headers}
        checked = [(("plugins", i, "config"), v) for i, v in validated.items()] + \
            [(("routes", j, "plugins", p, "config"), v) for (j, p), v in route_validated.items()]
        for at, v in checked:
            for h in getattr(v, "forward_identity_headers", None) or {}:  # (key_auth's)
                if h.lower() in own:
                    line = lines.find((*at, "forward_identity_headers", h)) or "?"
                    problems.append(f"{fmt_path(at)}.forward_identity_headers.{h} -> line {line}: upstream.headers "
                                    f"sets {h} too (a credential for the upstream): the caller's identity would "
                                    "replace it; send the identity under another name")
    if problems or cfg is None:
        raise ConfigError(list(dict.fromkeys(problems)), source)
    for i, v in validated.items():
        cfg.plugins[i]._validated = v
    for (j, pname), v in route_validated.items():
        cfg.routes[j].plugins[pname]._validated = v
    cfg._source = source
    return cfg


def _under_config_hint(data: Any, loc: Path_, problem: str) -> str:
    """A plugin's setting written beside ``name:`` instead of under ``config:`` (an unknown key of
    the list entry that is one of the plugin's settings): say where it goes."""
    if len(loc) != 3 or loc[0] != "plugins" or not isinstance(loc[2], str) or not problem.endswith("unknown key"):
        return ""
    specs = data.get("plugins") if isinstance(data, dict) else None
    spec = specs[loc[1]] if isinstance(specs, list) and isinstance(loc[1], int) and loc[1] < len(specs) else None
    name = spec.get("name") if isinstance(spec, dict) else None
    from gateway.plugin import registry

    cls = registry.get(name) if isinstance(name, str) else None
    if cls is None or loc[2] not in cls.Config.model_fields:
        return ""
    return f" (a setting of {name}: put it under config:)"


def _has_path(d: Any, keys: list[str]) -> bool:
    """Does the mapping ``d`` set ``keys`` (a dotted field such as ``quotas.cache_ttl``)?"""
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return False
        d = d[k]
    return True


def _duplicate_plugins(data: Any, lines: _Lines) -> list[str]:
    """Each plugin named again in the list, reported at its later entries (the model would only
    know the list as a whole, and only the first)."""
    plugins = data.get("plugins") if isinstance(data, dict) else None
    if not isinstance(plugins, list):
        return []
    first: dict[str, int] = {}
    out = []
    for i, p in enumerate(plugins):
        name = p.get("name") if isinstance(p, dict) else None
        if not isinstance(name, str):
            continue
        if name in first:
            out.append(f"plugins[{i}].name -> line {lines.find(('plugins', i, 'name')) or '?'}: plugin {name!r} is "
                       f"listed twice (first as plugins[{first[name]}]); use routes to give it other settings per "
                       "path")
        else:
            first[name] = i
    return out


_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


#: Headers that frame a message or change its protocol: each message gets them from the gateway
#: (or its HTTP library); one set in the config would cut or corrupt what is sent.
_FRAMING = frozenset({"content-length", "transfer-encoding", "upgrade", "te", "trailer", "expect"})


def header_problem(name: str, value: str) -> str | None:
    """Why ``name: value`` cannot be sent as an HTTP header (None if it can); never quotes the value."""
    if not _TOKEN.match(name):
        return "not a valid header name"
    if name.lower() in _FRAMING:
        return (f"{name} frames the message or changes the protocol: each message gets its own from the gateway, "
                "it cannot be configured")
    if any(c in value for c in "\r\n\x00"):
        return "header value must not contain CR, LF or NUL"
    if any((ord(c) < 32 and c != "\t") or ord(c) == 127 for c in value):
        return "header value must not contain control characters"
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
    state = (st.st_ino, st.st_size, st.st_mtime_ns)
    try:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise ConfigError([f"line {line}: not UTF-8 text (byte {e.start})"], str(p)) from None
        cfg = load_config_text(text, str(p), env)
    except ConfigError as e:
        e.read_state = state
        raise
    # The path as given (made absolute), not its target: a reload re-reads a symlink (a release
    # "current" link, a Kubernetes ConfigMap's ..data link) and so follows it to its new target.
    # A stream (``-c /dev/stdin``) is read once: there is nothing to reload from.
    cfg._path = None if _readable_stream(p) else os.path.abspath(p)
    cfg._read_state = state
    return cfg


def file_state(path: str) -> tuple[int, int, int] | None:
    """(inode, size, mtime) of the file at ``path`` (a symlink followed), None if it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _readable_stream(p: Path) -> bool:
    """/dev/stdin and the like (``-c /dev/stdin``, process substitution): read once at start."""
    return str(p).startswith(("/dev/fd/", "/proc/self/fd/")) or str(p) == "/dev/stdin"


def plugin_config_problems(model: type[BaseModel], data: dict[str, Any]) -> list[str]:
    try:
        model.model_validate(data)
    except ValidationError as e:
        return validation_problems(e, _Lines())
    return []
