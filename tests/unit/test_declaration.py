"""The declaration SDK: ``@mvm.app`` in a .py file is read with ast, never run, and compiles
to the same Workload IR (and store key) as the equivalent mvm.toml."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mvm.build import stamps
from mvm.build.builder import store_key
from mvm.build.packages import PackageLock
from mvm.core.artifact import LockedPackage
from mvm.core.declaration import APP_PARAMS, HELPER_PARAMS, extract
from mvm.core.errors import BuildError, ManifestError
from mvm.core.manifest import load_declaration, load_manifest
from mvm.core.workdir import declaration, lock_file, manifest_dir, manifest_file
from mvm.core.workload import EntrypointKind, NetworkMode, RestartPolicy

SRC = Path(__file__).resolve().parents[2] / "src"

FULL = '''
import mvm

@mvm.app(
    name="web",
    source=mvm.local_path("."),
    image=mvm.packages(["python3", "curl"]),
    network=mvm.network(mode="allow-list", allow=["example.com:443"], forward=["8080:80"]),
    resources=mvm.resources(cpus=2, memory="512M", data_disk="1G"),
    entrypoint=mvm.command(["/usr/bin/python3", "-m", "http.server", "80"]),
    uids={"agent": 991, "entrypoint": 1001},
    dev=False,
    volumes=[{"host": "./data", "guest": "/data", "readonly": False}],
    extra_files={"/etc/motd": {"content": "hi\\n", "mode": "0600"}},
    hypervisor="qemu",
    kernel="mvm",
    arch="x86_64",
)
def web():
    return "never called by mvmctl"
'''

FULL_TOML = '''
name = "web"
packages = ["python3", "curl"]
vcpus = 2
mem = "512M"
data_disk = "1G"
dev = false
hypervisor = "qemu"
kernel = "mvm"
arch = "x86_64"

[entrypoint]
command = ["/usr/bin/python3", "-m", "http.server", "80"]

[uids]
agent = 991
entrypoint = 1001

[network]
mode = "allow-list"
allow = ["example.com:443"]
forward = ["8080:80"]

[[volumes]]
host = "./data"
guest = "/data"
readonly = false

[extra_files."/etc/motd"]
content = "hi\\n"
mode = "0600"
'''

BY_NAME = '''
from mvm import app, command as cmd, packages, resources

@app(name="web", image=packages(["python3"]), entrypoint=cmd(["/bin/true"]), resources=resources(memory=512))
def web(): ...
'''


def write(directory: Path, text: str, name: str = "app.py") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


def refused(text: str, line: int, *words: str, app: str | None = None) -> ManifestError:
    """``text`` is refused with one ManifestError at ``app.py:line`` mentioning ``words``."""
    with pytest.raises(ManifestError) as info:
        extract(textwrap.dedent(text), "app.py", app)
    err = info.value
    assert err.path == f"app.py:{line}", str(err)
    assert err.fix and "\n" not in str(err), str(err)
    for word in words:
        assert word in str(err), str(err)
    return err


def decl(body: str, imports: str = "import mvm") -> str:
    return f"{imports}\n\n@mvm.app({body})\ndef f(): ...\n"


# -- the same IR and key as mvm.toml ------------------------------------------------------------


def test_full_declaration_is_the_same_workload_and_key_as_mvm_toml(tmp_path: Path) -> None:
    toml_dir = tmp_path / "toml"
    toml_dir.mkdir()
    (toml_dir / "mvm.toml").write_text(FULL_TOML)
    app = write(tmp_path / "py", FULL)
    from_toml = load_manifest(toml_dir)
    from_py = load_manifest(app)
    # volumes' host paths resolve against each file's directory, so compare them relative
    assert from_py.volumes[0].host == str(app.parent / "data")
    assert from_toml.volumes[0].host == str(toml_dir / "data")
    (tmp_path / "py" / "data").mkdir()
    same_dir = tmp_path / "py" / "mvm.toml"
    same_dir.write_text(FULL_TOML)
    from_toml = load_manifest(same_dir)
    assert from_py == from_toml
    assert from_py.canonical_json() == from_toml.canonical_json()
    assert from_py.entrypoint.kind is EntrypointKind.COMMAND and from_py.network.mode is NetworkMode.ALLOW_LIST
    assert (from_py.vcpus, from_py.memory_mib, from_py.uids.entrypoint) == (2, 512, 1001)

    # The store key: the same workload and the same lock (each read from where the builder
    # reads it: mvm.lock beside mvm.toml, app.mvm.lock beside app.py) give the same key.
    lock = PackageLock(requested=["busybox", "curl", "python3"], packages=[], setpriv=[], kernel=LockedPackage(
        name="linux-image-cloud-amd64", version="6.1.0-1", arch="amd64", filename="linux-image.deb",
        sha256="0" * 64, size=1))
    for place in (lock_file(same_dir), lock_file(app)):
        place.write_text(lock.dump())
    assert lock_file(app) == app.parent / "app.mvm.lock" and lock_file(same_dir) == app.parent / "mvm.lock"
    keys = {store_key(w, PackageLock.load(lock_file(p))) for w, p in ((from_toml, same_dir), (from_py, app))}
    assert len(keys) == 1


def test_helpers_imported_by_name_and_defaults(tmp_path: Path) -> None:
    workload = load_manifest(write(tmp_path, BY_NAME))
    toml = tmp_path / "mvm.toml"
    toml.write_text('name = "web"\npackages = ["python3"]\nmemory_mib = 512\n[entrypoint]\ncommand = ["/bin/true"]\n')
    assert workload == load_manifest(toml)
    assert workload.sealed and workload.uids.entrypoint == 1000 and workload.network.mode is NetworkMode.DENY


def test_shell_services_uids_shorthand_and_the_function_name(tmp_path: Path) -> None:
    shell = load_manifest(write(tmp_path / "a", decl("entrypoint=mvm.shell()")))
    assert shell.entrypoint.shell == "/bin/sh" and shell.dev and shell.name == "f"  # named after the function
    services = load_manifest(write(tmp_path / "b", decl(
        'name="svc", uids=1234, entrypoint=mvm.services({"web": ["/bin/httpd", "-f"], "job": mvm.command(["/bin/job"]),'
        ' "db": {"command": ["/bin/db"], "restart": "always"}})')))
    assert [(s.name, s.command, s.restart) for s in services.entrypoint.services] == [
        ("web", ("/bin/httpd", "-f"), RestartPolicy.ON_FAILURE), ("job", ("/bin/job",), RestartPolicy.ON_FAILURE),
        ("db", ("/bin/db",), RestartPolicy.ALWAYS)]
    assert services.uids.entrypoint == 1234
    aliased = load_manifest(write(tmp_path / "c", "import mvm as m\n@m.app(entrypoint=m.shell('/bin/ash'), resources=None)\n"
                                                  "async def g(): ...\n"))
    assert aliased.entrypoint.shell == "/bin/ash" and aliased.name == "g"
    here = load_declaration(write(tmp_path / "d", decl("source=mvm.local_path(), entrypoint=mvm.shell()")))
    assert here.declaration.source == "."


# -- never run ------------------------------------------------------------------------------------

HOSTILE = '''
import mvm, os, sys
open({marker!r}, "w").write("the module ran")
os.system("touch " + {marker!r})
{body}

@mvm.app(name="hostile", entrypoint=mvm.command(["/bin/true"]))
def hostile(): ...
'''


@pytest.mark.parametrize("body", [
    'raise RuntimeError("importing this module fails")',
    "while True:\n    pass",
    "sys.exit(3)",
], ids=["raises", "loops-forever", "exits"])
def test_hostile_modules_are_extracted_and_nothing_runs(tmp_path: Path, body: str) -> None:
    marker = tmp_path / "ran"
    app = write(tmp_path, HOSTILE.format(marker=str(marker), body=body))
    env = {**os.environ, "PYTHONPATH": str(SRC), "MVM_HOME": str(tmp_path / "home")}
    proc = subprocess.run([sys.executable, "-m", "mvm.cli.main", "validate", "--json", str(app)], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["name"] == "hostile"
    assert not marker.exists()
    # in-process too: the file never becomes a module
    load_manifest(app)
    assert not marker.exists() and "app" not in sys.modules


def test_code_in_the_arguments_is_refused_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    app = write(tmp_path, decl(f'name=__import__("os").system("touch {marker}"), entrypoint=mvm.shell()'))
    with pytest.raises(ManifestError) as info:
        load_manifest(app)
    assert str(info.value).startswith(f"{app}:3: name: calls `__import__('os').system()`") and not marker.exists()


# -- refusals: file:line and why --------------------------------------------------------------------


def test_non_literals_are_refused_with_file_line_and_why() -> None:
    refused(decl("name=NAME"), 3, "name", "the variable `NAME`", "read, not run")
    refused(decl('name=f"app-{1}"'), 3, "f-string")
    refused(decl("resources=mvm.resources(cpus=1 + 1)"), 3, "resources.cpus", "expression (`1 + 1`)")
    refused(decl('image=mvm.packages(sorted(["b", "a"]))'), 3, "image", "calls `sorted()`", "not an mvm declaration")
    refused(decl('image=mvm.packages(["a", *more])'), 3, "unpacks")
    refused(decl('entrypoint=mvm.command(["/bin/x", os.sep])'), 3, "entrypoint.command[1]", "`os.sep`")
    refused(decl("image=mvm.shell()"), 3, "image", "takes mvm.packages(...) or mvm.nix_packages(...)")
    refused(decl('extra_files={"/etc/a": {"content": None}}'), 3, "None")
    refused(decl('"web"'), 3, "positional")
    refused(decl("**opts"), 3, "unpacks a dict")
    refused(decl("entrypint=mvm.shell()"), 3, "not a keyword", "entrypoint")
    refused(decl("resources=mvm.resources(cpu=2)"), 3, "has no cpu=", "cpus")
    refused(decl('volumes=[{"host": b"x"}]'), 3, "bytes literal")
    multi = decl('name="x",\n    image=mvm.packages([\n        "python3",\n        PKG,\n    ])')
    refused(multi, 6, "image[1]", "variable `PKG`")


def test_mvm_toml_rules_are_reported_at_the_declarations_line(tmp_path: Path) -> None:
    text = decl('name="ok",\n    resources=mvm.resources(cpus=99),\n    entrypoint=mvm.shell()')
    app = write(tmp_path / "a", text)
    with pytest.raises(ManifestError) as info:
        load_manifest(app)
    assert str(info.value).startswith(f"{app}:4: resources.cpus: 99 is out of range")
    app = write(tmp_path / "b", decl('image=mvm.packages(["ok",\n    "Not_A_Package"]), entrypoint=mvm.shell()'))
    with pytest.raises(ManifestError) as info:
        load_manifest(app)
    assert str(info.value).startswith(f"{app}:4: image[1]: \"Not_A_Package\" is not a Debian package name")
    app = write(tmp_path / "c", decl('name="x"'))
    with pytest.raises(ManifestError, match=r":3: entrypoint: is missing"):
        load_manifest(app)
    app = write(tmp_path / "d", decl('source=mvm.local_path("nowhere"), entrypoint=mvm.shell()'))
    with pytest.raises(ManifestError, match=r":3: source: \"nowhere\" is not a directory"):
        load_manifest(app)


def test_which_app(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="declares no workload: no function has an @mvm.app") as info:
        extract("import mvm\ndef f(): ...\n", "app.py")
    assert info.value.path == "app.py"
    two = decl('entrypoint=mvm.shell()') + '\n@mvm.app(name="other", entrypoint=mvm.shell())\ndef g(): ...\n'
    with pytest.raises(ManifestError, match=r"declares 2 workloads \(f, g\).*app.py:f"):
        extract(two, "app.py")
    assert extract(two, "app.py", "g").data["name"] == "other"
    with pytest.raises(ManifestError, match="has no @mvm.app function named h.*app.py:f, app.py:g"):
        extract(two, "app.py", "h")
    app = write(tmp_path, two)
    assert load_manifest(f"{app}:g").name == "other" and load_manifest(f"{app}:f").name == "f"


def test_what_is_not_a_small_regular_file_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.py"
    os.mkfifo(fifo)  # nobody ever writes to it: a blocking read would hang here
    with pytest.raises(ManifestError, match="fifo.py: is not a regular file"):
        load_manifest(fifo)
    with pytest.raises(ManifestError, match="missing.py: cannot be read: No such file"):
        load_manifest(tmp_path / "missing.py")
    big = tmp_path / "big.py"
    big.write_text("#" * (5 * 1024 * 1024))
    with pytest.raises(ManifestError, match="big.py: is larger than 4 MiB"):
        load_manifest(big)


def test_unreadable_python_is_one_line() -> None:
    refused("import mvm\n\n@mvm.app(name=\n", 3, "not valid Python")
    with pytest.raises(ManifestError, match="app.py:1: is not valid Python .*null bytes"):
        extract(b"x = 1\0\n", "app.py")
    for value in ("[" * 1000 + "]" * 1000, "1+" * 100000 + "1"):  # beyond the parser's or the stack's depth
        with pytest.raises(ManifestError) as info:
            extract(f"import mvm\n@mvm.app(name={value})\ndef f(): ...\n", "app.py")
        assert "\n" not in str(info.value) and len(str(info.value)) < 300


# -- nix packages: validate yes, build no -----------------------------------------------------------


def test_nix_packages_validate_but_do_not_build(tmp_path: Path) -> None:
    app = write(tmp_path, decl('image=mvm.nix_packages(["python3", "ripgrep"]),\n    entrypoint=mvm.shell()'))
    declared = load_declaration(app)
    assert declared.nix_packages == ("python3", "ripgrep") and declared.workload.packages == ()
    with pytest.raises(BuildError, match=r"build failed at resolve: .*app.py:3: image is mvm.nix_packages"):
        load_manifest(app)
    env = {**os.environ, "PYTHONPATH": str(SRC), "MVM_HOME": str(tmp_path / "home")}
    cli = [sys.executable, "-m", "mvm.cli.main"]
    shown = subprocess.run([*cli, "validate", str(app)], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert shown.returncode == 0 and "nix: python3, ripgrep" in shown.stdout, shown.stderr
    built = subprocess.run([*cli, "build", str(app)], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert built.returncode == 1 and "no Nix builder" in built.stderr and built.stderr.count("\n") == 1
    assert not lock_file(app).exists()


# -- where things live ------------------------------------------------------------------------------


def test_paths_of_a_declaration(tmp_path: Path) -> None:
    app = write(tmp_path, decl("entrypoint=mvm.shell()"))
    assert declaration(app) == (app, None) and declaration(f"{app}:web") == (app, "web")
    assert declaration(tmp_path) is None and declaration(tmp_path / "mvm.toml") is None
    assert manifest_file(f"{app}:web") == app and manifest_dir(app) == tmp_path
    assert lock_file(f"{app}:web") == tmp_path / "app.web.mvm.lock"
    assert stamps.input_digest(app) is None  # not built yet: no lock, no stamp
    for lock in ("app.mvm.lock", "app.web.mvm.lock", "app.db.mvm.lock"):
        (tmp_path / lock).write_text("# the same lock\n")
    # each app of a file has its own stamp (same file, same lock bytes)
    digests = {stamps.input_digest(p) for p in (app, f"{app}:web", f"{app}:db")}
    assert None not in digests and len(digests) == 3


# -- the decorator at run time ----------------------------------------------------------------------


def test_the_decorator_only_records(tmp_path: Path) -> None:
    import mvm

    @mvm.app(name="rec", image=mvm.packages(["python3"]), entrypoint=mvm.command(["/bin/true"]),
             resources=mvm.resources(cpus=2))
    def rec() -> int:
        return 42

    assert rec() == 42
    assert rec.__mvm_app__.name == "rec" and rec.__mvm_app__.image == mvm.packages(("python3",))
    assert rec.__mvm_app__.resources.cpus == 2 and rec.__mvm_app__.function is rec
    with pytest.raises(AttributeError):
        rec.__mvm_app__.image.names = ()  # frozen


def test_the_decorator_and_the_reader_take_the_same_arguments() -> None:
    import mvm.declare

    assert tuple(inspect.signature(mvm.declare.app).parameters) == APP_PARAMS
    for helper, params in HELPER_PARAMS.items():
        assert tuple(inspect.signature(getattr(mvm.declare, helper)).parameters) == params, helper


def test_import_mvm_stays_light() -> None:
    code = ("import sys, mvm; assert 'mvm.declare' not in sys.modules; mvm.packages(['x']); "
            "assert 'mvm.declare' in sys.modules and 'mvm.sdk' not in sys.modules and 'mvm.core' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(SRC)}, check=True, timeout=60)
