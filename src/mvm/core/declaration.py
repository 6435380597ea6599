"""``@mvm.app(...)`` in a Python file -> the same document an mvm.toml parses into.

A declaration is read, never run: the file is parsed with :mod:`ast` and only the literal
arguments of its ``@mvm.app`` decorator are taken (strings, numbers, lists, dicts,
True/False/None, and calls to the declaration helpers ``mvm.packages``, ``mvm.shell``, ...,
spelled ``mvm.X`` or imported by name). So a reviewer can check what a file asks for without
trusting it: a module that would raise, write files or loop forever when imported is read
all the same, and nothing of it runs. Anything else (a variable, an f-string, arithmetic, a
call to another function) is refused as one :class:`~mvm.core.errors.ManifestError` naming
``file:line`` and why.

The result is a TOML-shaped dict (``vcpus``, ``packages``, ``[entrypoint]``, ...) plus the
line each part came from, so core.manifest validates it with exactly the rules of mvm.toml
and its mistakes are reported at the declaration's lines. Pure: no file system, no imports
of the SDK (the decorator itself lives in mvm.sdk.declare and only records its arguments).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Any

from mvm.core.errors import ManifestError
from mvm.core.manifest_wording import closest, field_name

# The decorator's keywords and each helper's parameters; mvm.sdk.declare has the same names
# (tests/unit/test_declaration.py keeps the two in step).
APP_PARAMS = ("name", "source", "image", "entrypoint", "network", "resources", "uids", "dev",
              "volumes", "extra_files", "hypervisor", "kernel", "arch")
HELPER_PARAMS: dict[str, tuple[str, ...]] = {
    "local_path": ("path",),
    "packages": ("names",),
    "nix_packages": ("names",),
    "network": ("mode", "allow", "forward"),
    "resources": ("cpus", "memory", "data_disk"),
    "command": ("argv",),
    "shell": ("path",),
    "services": ("services",),
}
_SLOTS = {  # which helpers each keyword takes
    "source": ("local_path",),
    "image": ("packages", "nix_packages"),
    "entrypoint": ("command", "shell", "services"),
    "network": ("network",),
    "resources": ("resources",),
}
# How mvm.toml's fields are spelled in a declaration, for messages.
_SPELLING = {"vcpus": ("resources", "cpus"), "memory_mib": ("resources", "memory"),
             "mem": ("resources", "memory"), "data_disk": ("resources", "data_disk"), "packages": ("image",)}
_LITERALS = "strings, numbers, lists, dicts, True/False/None and the mvm helpers"
_WHY = "the file is read, not run"


@dataclass
class Declaration:
    """One ``@mvm.app``: the mvm.toml-shaped document, and where each part of it was written."""

    file: str
    function: str
    line: int
    data: dict[str, Any] = field(default_factory=dict)
    lines: dict[tuple[str | int, ...], int] = field(default_factory=dict)
    source: str | None = None  # mvm.local_path's argument: where relative paths start
    nix_packages: tuple[str, ...] | None = None

    def line_of(self, at: tuple[str | int, ...]) -> int:
        """The line of the innermost part of ``at`` that was written down (else the decorator's)."""
        for end in range(len(at), 0, -1):
            if at[:end] in self.lines:
                return self.lines[at[:end]]
        return self.line

    def locate(self, at: tuple[str | int, ...]) -> tuple[str, str | None]:
        """``(file:line, field)`` of an mvm.toml field, for core.manifest's error messages."""
        parts = list(at)
        if parts and isinstance(parts[0], str) and parts[0] in _SPELLING:
            parts[:1] = _SPELLING[parts[0]]
        return f"{self.file}:{self.line_of(at)}", field_name(*parts) or None


def extract(source: bytes | str, file: str, app: str | None = None) -> Declaration:
    """The declaration in ``source`` (the text of ``file``): its only ``@mvm.app``, or the one
    on the function named ``app``."""
    try:
        tree = ast.parse(source, filename=file)
    except SyntaxError as err:
        raise ManifestError(f"{file}:{err.lineno or 1}", None, f"is not valid Python ({err.msg})",
                            "fix the syntax there") from None
    except (ValueError, RecursionError, MemoryError) as err:  # NUL bytes; absurd nesting
        reason = "nested too deeply" if isinstance(err, (RecursionError, MemoryError)) else str(err)
        raise ManifestError(file, None, f"cannot be read as Python ({reason})", "fix the file") from None
    reader = _Reader(file, tree)
    node, call = reader.choose(app)
    try:
        return reader.declaration(node, call)
    except RecursionError:
        raise ManifestError(f"{file}:{node.lineno}", None, "the declaration is nested too deeply",
                            "write it flatter") from None


class _Reader:
    """Finds ``@mvm.app`` and turns its arguments into mvm.toml's document."""

    def __init__(self, file: str, tree: ast.Module) -> None:
        self.file = file
        self.tree = tree
        self.modules = {"mvm"}  # names bound to the mvm module
        self.names: dict[str, str] = {}  # local name -> helper imported from mvm
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                self.modules.update(a.asname for a in node.names if a.name == "mvm" and a.asname)
            elif isinstance(node, ast.ImportFrom) and node.module == "mvm" and not node.level:
                self.names.update((a.asname or a.name, a.name) for a in node.names)

    # -- finding the declaration ---------------------------------------------------------------

    def helper(self, node: ast.expr) -> str | None:
        """The mvm helper (or ``app``) that ``node`` names: ``mvm.packages``, or ``packages``
        imported from mvm."""
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in self.modules:
            return node.attr
        if isinstance(node, ast.Name):
            return self.names.get(node.id)
        return None

    def choose(self, app: str | None) -> tuple[ast.FunctionDef | ast.AsyncFunctionDef, ast.Call | None]:
        found: list[tuple[ast.FunctionDef | ast.AsyncFunctionDef, ast.Call | None]] = []
        for node in ast.walk(self.tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for decorator in node.decorator_list:
                target = decorator.func if isinstance(decorator, ast.Call) else decorator
                if self.helper(target) == "app":
                    found.append((node, decorator if isinstance(decorator, ast.Call) else None))
        found.sort(key=lambda pair: pair[0].lineno)
        names = [node.name for node, _ in found]
        if not found:
            raise ManifestError(self.file, None, "declares no workload: no function has an @mvm.app decorator",
                                "decorate one function with @mvm.app(...), or give a directory with an mvm.toml")
        if app is not None:
            chosen = [pair for pair in found if pair[0].name == app]
            if not chosen:
                raise ManifestError(self.file, None, f"has no @mvm.app function named {app}",
                                    f"use one of: {', '.join(f'{self.file}:{n}' for n in names)}")
            found = chosen
        if len(found) > 1:
            if app is None and len(set(names)) == len(names):
                raise ManifestError(self.file, None, f"declares {len(found)} workloads ({', '.join(names)})",
                                    f"pick one, e.g. `{self.file}:{names[0]}`")
            lines = ", ".join(str(node.lineno) for node, _ in found)
            raise ManifestError(self.file, None, f"has {len(found)} @mvm.app functions named "
                                f"{found[0][0].name} (lines {lines})", "give each its own name")
        return found[0]

    def declaration(self, node: ast.FunctionDef | ast.AsyncFunctionDef, call: ast.Call | None) -> Declaration:
        decl = Declaration(self.file, node.name, (call or node).lineno)
        self.decl = decl
        keywords: dict[str, ast.expr] = {}
        for arg in call.args if call else ():
            raise self.reject(arg, "@mvm.app", "is a positional argument", "name it, e.g. name=\"my-app\"")
        for keyword in call.keywords if call else ():
            if keyword.arg is None:
                raise self.reject(keyword.value, "@mvm.app", "unpacks a dict (**)", "write each keyword out")
            if keyword.arg not in APP_PARAMS:
                near = closest(keyword.arg, APP_PARAMS)
                raise self.reject(keyword, f"@mvm.app({keyword.arg}=)", "is not a keyword @mvm.app takes",
                                  f"did you mean {near}=?" if near else f"use {', '.join(APP_PARAMS)}")
            keywords[keyword.arg] = keyword.value
        for key, value in keywords.items():
            if isinstance(value, ast.Constant) and value.value is None:
                continue  # None: not set
            getattr(self, f"_{key}", self._plain)(key, value)
        if "name" not in decl.data:
            decl.data["name"] = node.name.lower()
            decl.lines[("name",)] = node.lineno
        return decl

    # -- the keywords --------------------------------------------------------------------------

    def _plain(self, key: str, value: ast.expr) -> None:
        self.put((key,), value)

    def _uids(self, key: str, value: ast.expr) -> None:
        if isinstance(value, ast.Constant) and type(value.value) is int:
            self.put(("uids", "entrypoint"), value)  # uids=1000: the entrypoint's
        else:
            self.put(("uids",), value)

    def _source(self, key: str, value: ast.expr) -> None:
        _, args = self.call(key, value)
        path = self.literal(args["path"], ("source",)) if "path" in args else "."  # local_path()'s default
        if not isinstance(path, str) or not path:
            raise self.reject(value, "source", "mvm.local_path() takes a directory as a non-empty string",
                              'write source=mvm.local_path(".")')
        self.decl.source = path

    def _image(self, key: str, value: ast.expr) -> None:
        if isinstance(value, ast.List):
            self.put(("packages",), value)  # image=["python3"]: Debian packages
            return
        helper, args = self.call(key, value)
        names = args.get("names")
        if names is None:
            raise self.reject(value, "image", f"mvm.{helper}() needs a list of names", f"write mvm.{helper}([...])")
        if helper == "packages":
            self.put(("packages",), names)
            return
        listed = self.literal(names, ("image",))
        if not isinstance(listed, list) or not all(isinstance(n, str) and n for n in listed):
            raise self.reject(names, "image", "mvm.nix_packages takes a list of package names",
                              'write mvm.nix_packages(["python3"])')
        self.decl.nix_packages = tuple(listed)
        self.decl.lines[("image",)] = value.lineno

    def _entrypoint(self, key: str, value: ast.expr) -> None:
        helper, args = self.call(key, value)
        self.decl.lines[("entrypoint",)] = value.lineno
        self.decl.data["entrypoint"] = {}
        if helper == "shell":
            if "path" in args:
                self.put(("entrypoint", "shell"), args["path"])
            else:
                self.decl.data["entrypoint"]["shell"] = "/bin/sh"
        elif helper == "command":
            if "argv" not in args:
                raise self.reject(value, "entrypoint", "mvm.command() needs the program and its arguments",
                                  'write mvm.command(["/usr/bin/prog", "arg"])')
            self.put(("entrypoint", "command"), args["argv"])
        elif "services" not in args:
            raise self.reject(value, "entrypoint", "mvm.services() needs a dict of services",
                              'write mvm.services({"web": ["/usr/bin/prog"]})')
        elif isinstance(args["services"], ast.Dict):
            self.services(args["services"])
        else:
            self.put(("entrypoint", "services"), args["services"])

    def services(self, table: ast.Dict) -> None:
        """``{"web": ["/bin/prog"], "job": mvm.command([...]), "db": {"command": [...], "restart": "always"}}``."""
        out: dict[str, Any] = {}
        self.decl.data["entrypoint"]["services"] = out
        for key_node, spec in zip(table.keys, table.values, strict=True):
            if key_node is None:
                raise self.reject(spec, "entrypoint.services", "unpacks a dict (**)", "write each service out")
            name = self.literal(key_node, ("entrypoint", "services"))
            if not isinstance(name, str):
                raise self.reject(key_node, "entrypoint.services", "a service's name must be a string",
                                  'write {"web": [...]}')
            at = ("entrypoint", "services", name)
            self.decl.lines[at] = spec.lineno
            if isinstance(spec, ast.Call) and self.helper(spec.func) == "command":
                _, args = self.call("entrypoint.services", spec, ("command",))
                out[name] = {}
                self.put((*at, "command"), args.get("argv", ast.List(elts=[], lineno=spec.lineno)))
            elif isinstance(spec, (ast.List, ast.Tuple)):
                out[name] = {}
                self.put((*at, "command"), spec)
            else:
                self.put(at, spec)

    def _network(self, key: str, value: ast.expr) -> None:
        if isinstance(value, ast.Dict):
            self.put(("network",), value)
            return
        _, args = self.call(key, value)
        self.decl.data["network"] = {}
        self.decl.lines[("network",)] = value.lineno
        for param, node in args.items():
            self.put(("network", param), node)

    def _resources(self, key: str, value: ast.expr) -> None:
        _, args = self.call(key, value)
        for param, node in args.items():
            at = {"cpus": "vcpus", "data_disk": "data_disk"}.get(param)
            if param == "memory":
                number = isinstance(node, ast.Constant) and type(node.value) is int
                at = "memory_mib" if number else "mem"
            assert at is not None
            self.put((at,), node)

    # -- values --------------------------------------------------------------------------------

    def call(self, key: str, node: ast.expr, allowed: tuple[str, ...] | None = None) -> tuple[str, dict[str, ast.expr]]:
        """A helper call in the slot ``key``: its name and its arguments by parameter (None
        arguments left out, meaning not set)."""
        allowed = allowed or _SLOTS[key]
        spelled = " or ".join(f"mvm.{h}(...)" for h in allowed)
        helper = self.helper(node.func) if isinstance(node, ast.Call) else None
        if helper not in allowed:
            what = f"mvm.{helper}()" if helper in HELPER_PARAMS else None
            raise self.reject(node, key, f"takes {spelled}, not {what}" if what else self.describe(node),
                              f"write {spelled}")
        assert isinstance(node, ast.Call) and helper is not None
        params = HELPER_PARAMS[helper]
        bound: dict[str, ast.expr] = {}
        if len(node.args) > len(params):
            raise self.reject(node, key, f"mvm.{helper}() takes {len(params)} argument(s)", f"write {spelled}")
        for param, arg in zip(params, node.args):
            if isinstance(arg, ast.Starred):
                raise self.reject(arg, key, "unpacks arguments (*)", "write each argument out")
            bound[param] = arg
        for keyword in node.keywords:
            if keyword.arg is None or keyword.arg not in params or keyword.arg in bound:
                what = "unpacks a dict (**)" if keyword.arg is None else f"mvm.{helper}() has no {keyword.arg}= here"
                raise self.reject(keyword.value, key, what, f"its parameters: {', '.join(params)}")
            bound[keyword.arg] = keyword.value
        return helper, {p: n for p, n in bound.items() if not (isinstance(n, ast.Constant) and n.value is None)}

    def put(self, at: tuple[str | int, ...], node: ast.expr) -> None:
        """Store the literal ``node`` at the mvm.toml path ``at``."""
        parent: dict[str, Any] = self.decl.data
        for part in at[:-1]:
            parent = parent.setdefault(str(part), {})
        parent[str(at[-1])] = self.literal(node, at)

    def literal(self, node: ast.expr, at: tuple[str | int, ...]) -> Any:
        """The value ``node`` spells, if it is a literal; its line is remembered under ``at``."""
        self.decl.lines.setdefault(at, node.lineno)
        if isinstance(node, ast.Constant):
            value = node.value
            if value is None:
                raise self.reject(node, at, "is None inside a value", "leave the item out (None only stands "
                                  "for 'not set' as a whole argument)")
            if isinstance(value, (bool, int, float, str)):
                return value
        elif (isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant)
              and type(node.operand.value) in (int, float)):
            return -node.operand.value
        elif isinstance(node, (ast.List, ast.Tuple)):
            for item in node.elts:
                if isinstance(item, ast.Starred):
                    raise self.reject(item, at, "unpacks a list (*)", "write each item out")
            return [self.literal(item, (*at, i)) for i, item in enumerate(node.elts)]
        elif isinstance(node, ast.Dict):
            out: dict[str, Any] = {}
            for key_node, value_node in zip(node.keys, node.values, strict=True):
                if key_node is None:
                    raise self.reject(value_node, at, "unpacks a dict (**)", "write each key out")
                key = self.literal(key_node, at)
                if not isinstance(key, str):
                    raise self.reject(key_node, at, "has a key that is not a string", 'write {"key": value}')
                out[key] = self.literal(value_node, (*at, key))
            return out
        raise self.reject(node, at, self.describe(node), "write the value itself here")

    def describe(self, node: ast.expr) -> str:
        """Why ``node`` is not a value a declaration can hold, in a few words."""
        shown = _shown(node)
        if isinstance(node, ast.Name):
            return f"is the variable {shown}; {_WHY}, so only {_LITERALS} are taken"
        if isinstance(node, ast.JoinedStr):
            return f"is an f-string; {_WHY}, so it is never formatted"
        if isinstance(node, ast.Call):
            helper = self.helper(node.func)
            if helper in HELPER_PARAMS or helper == "app":
                return f"mvm.{helper}() does not belong here"
            return f"calls `{_shown(node.func, tick='')}()`, which is not an mvm declaration helper; {_WHY}"
        if isinstance(node, (ast.BinOp, ast.BoolOp, ast.UnaryOp, ast.Compare, ast.IfExp)):
            return f"is an expression ({shown}); {_WHY}, so it is never computed"
        if isinstance(node, ast.Constant):
            return f"is a {type(node.value).__name__} literal, which no field takes"
        return f"is {shown}, not a literal; {_WHY}, so only {_LITERALS} are taken"

    def reject(self, node: ast.AST, at: str | tuple[str | int, ...], message: str, fix: str) -> ManifestError:
        where = at if isinstance(at, str) else self.decl.locate(at)[1] if at else None
        return ManifestError(f"{self.file}:{getattr(node, 'lineno', self.decl.line)}", where, message, fix)


def _shown(node: ast.AST, limit: int = 48, tick: str = "`") -> str:
    """Source text of ``node`` on one short line, for a message."""
    try:
        text = ast.unparse(node)
    except (ValueError, RecursionError):  # pragma: no cover - unparse of a parsed tree
        text = type(node).__name__
    text = " ".join(text.split())
    return f"{tick}{text}{tick}" if len(text) <= limit else f"{tick}{text[: limit - 3]}...{tick}"
