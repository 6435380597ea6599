"""mvm.toml -> Workload: every accepted form, and one clear error for every mistake."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mvm.cli.validate import COMMANDS, validate
from mvm.core.errors import ManifestError, UsageError
from mvm.core.manifest import ManifestOverrides, load_manifest, parse_manifest
from mvm.core.manifest_wording import field_name
from mvm.core.workload import EntrypointKind, NetworkMode, RestartPolicy, Workload

SHELL = '[entrypoint]\nshell = "/bin/sh"\n'
COMMAND = '[entrypoint]\ncommand = ["/usr/bin/python3", "-m", "http.server", "8080"]\n'
REPO = Path(__file__).resolve().parents[2]


def parse(text: str, **kwargs: object) -> Workload:
    """Parse with a fixed directory so relative paths and default names are predictable."""
    kwargs.setdefault("base_dir", Path("/srv/proj"))
    return parse_manifest(text, **kwargs)  # type: ignore[arg-type]


def failure(text: str, field: str | None, *words: str, **kwargs: object) -> ManifestError:
    """Assert ``text`` fails with one ManifestError on ``field`` that mentions ``words``."""
    with pytest.raises(ManifestError) as info:
        parse(text, **kwargs)
    err = info.value
    assert err.field == field, str(err)
    assert err.path == kwargs.get("path", "mvm.toml")
    assert err.fix, f"no fix in: {err}"
    line = str(err)
    assert "\n" not in line
    assert line.startswith(f"{err.path}: {field}: " if field else f"{err.path}: ")
    for word in words:
        assert word in line, f"{word!r} not in {line!r}"
    return err


# -- good forms ------------------------------------------------------------------------------


def test_the_design_example_parses() -> None:
    w = parse(
        """
name = "web"
vcpus = 1
memory_mib = 256
packages = ["python3"]
[entrypoint]
command = ["/usr/bin/python3", "-m", "http.server", "8080"]
[uids]
entrypoint = 1000
[extra_files."/etc/motd"]
content = "hello"
mode = "0644"
[network]
mode = "allow-list"
allow = ["api.example.com:443", "10.20.0.0/16:5432"]
forward = ["127.0.0.1:8080:8080"]
"""
    )
    assert w.name == "web"
    assert w.entrypoint.kind is EntrypointKind.COMMAND
    assert w.entrypoint.command == ("/usr/bin/python3", "-m", "http.server", "8080")
    assert w.packages == ("python3",)
    assert (w.uids.agent, w.uids.entrypoint) == (990, 1000)
    assert w.extra_files[0].path == "/etc/motd" and w.extra_files[0].mode == 0o644
    assert w.network.mode is NetworkMode.ALLOW_LIST
    assert w.network.allow == ("api.example.com:443", "10.20.0.0/16:5432")
    assert (w.network.forward[0].host_port, w.network.forward[0].guest_port) == (8080, 8080)


def test_defaults() -> None:
    w = parse('name = "t"\n' + SHELL)
    assert (w.vcpus, w.memory_mib, w.data_disk_bytes, w.hypervisor) == (1, 256, None, "auto")
    assert w.network.mode is NetworkMode.DENY and w.network.forward == ()
    assert w.packages == () and w.extra_files == () and w.volumes == ()


@pytest.mark.parametrize(
    ("line", "mib"),
    [("memory_mib = 512", 512), ('mem = "1024M"', 1024), ('mem = "2G"', 2048),
     ('mem = "64MiB"', 64), ('mem = "1.5G"', 1536)],
)  # fmt: skip
def test_both_memory_spellings(line: str, mib: int) -> None:
    assert parse(f'name = "t"\n{line}\n' + SHELL).memory_mib == mib


def test_vcpus_and_data_disk() -> None:
    w = parse('name = "t"\nvcpus = 4\ndata_disk = "8G"\n' + SHELL)
    assert w.vcpus == 4
    assert w.data_disk_bytes == 8 * 1024**3


def test_shell_entrypoint_is_accessible_with_root_entrypoint() -> None:
    w = parse('name = "t"\n' + SHELL)
    assert w.entrypoint.kind is EntrypointKind.SHELL and w.entrypoint.shell == "/bin/sh"
    assert w.dev and w.accessible
    assert (w.uids.agent, w.uids.entrypoint) == (990, 0)


def test_command_entrypoint_is_sealed_with_uid_1000() -> None:
    w = parse('name = "t"\n' + COMMAND)
    assert w.sealed and not w.dev
    assert (w.uids.agent, w.uids.entrypoint) == (990, 1000)


def test_bare_program_name_is_allowed() -> None:
    w = parse('name = "t"\n[entrypoint]\ncommand = ["python3", "-V"]\n')
    assert w.entrypoint.command == ("python3", "-V")


def test_services_with_restart_policies() -> None:
    w = parse(
        """name = "t"
[entrypoint.services.web]
command = ["/usr/bin/python3", "-m", "http.server"]
restart = "always"
[entrypoint.services.worker]
command = ["/srv/worker"]
"""
    )
    assert w.entrypoint.kind is EntrypointKind.SERVICES
    assert w.sealed
    web, worker = w.entrypoint.services
    assert (web.name, web.restart) == ("web", RestartPolicy.ALWAYS)
    assert (worker.name, worker.command, worker.restart) == (
        "worker",
        ("/srv/worker",),
        RestartPolicy.ON_FAILURE,
    )


def test_explicit_dev_overrides_the_default_and_the_uid_default_follows() -> None:
    dev_command = parse('name = "t"\ndev = true\n' + COMMAND)
    assert dev_command.dev and dev_command.uids.entrypoint == 0
    sealed_shell = parse('name = "t"\ndev = false\n' + SHELL)
    assert sealed_shell.sealed and sealed_shell.uids.entrypoint == 1000


def test_explicit_uids_win() -> None:
    w = parse('name = "t"\n' + COMMAND + "[uids]\nagent = 991\nentrypoint = 0\n")
    assert (w.uids.agent, w.uids.entrypoint) == (991, 0)


@pytest.mark.parametrize(
    ("spelling", "mode"),
    [('"0644"', 0o644), ('"755"', 0o755), ('"0600"', 0o600), ("0o640", 0o640), ('"4755"', 0o4755)],
)
def test_extra_file_modes(spelling: str, mode: int) -> None:
    w = parse(
        'name = "t"\n'
        + SHELL
        + f'[extra_files."/etc/app.conf"]\ncontent = "x=1\\n"\nmode = {spelling}\n'
    )
    (f,) = w.extra_files
    assert (f.path, f.content, f.mode) == ("/etc/app.conf", "x=1\n", mode)


def test_extra_file_mode_defaults_to_0644() -> None:
    w = parse('name = "t"\n' + SHELL + '[extra_files."/etc/motd"]\ncontent = "hi"\n')
    assert w.extra_files[0].mode == 0o644


@pytest.mark.parametrize("hypervisor", ["auto", "qemu", "docker", "firecracker"])
def test_hypervisor(hypervisor: str) -> None:
    assert parse(f'name = "t"\nhypervisor = "{hypervisor}"\n' + SHELL).hypervisor == hypervisor


@pytest.mark.parametrize(
    ("spec", "addr", "host", "guest"),
    [
        ("8080:80", "127.0.0.1", 8080, 80),
        ("127.0.0.1:8080:8080", "127.0.0.1", 8080, 8080),
        ("0.0.0.0:9000:90", "0.0.0.0", 9000, 90),
        ("[::1]:7000:70", "::1", 7000, 70),
    ],
)
def test_forward_parsing(spec: str, addr: str, host: int, guest: int) -> None:
    w = parse(f'name = "t"\n{SHELL}[network]\nforward = ["{spec}"]\n')
    (fwd,) = w.network.forward
    assert (fwd.host_addr, fwd.host_port, fwd.guest_port) == (addr, host, guest)


@pytest.mark.parametrize("mode", ["deny", "allow-list", "open"])
def test_network_modes(mode: str) -> None:
    assert parse(f'name = "t"\n{SHELL}[network]\nmode = "{mode}"\n').network.mode.value == mode


def test_volumes_as_array_of_tables_and_inline() -> None:
    w = parse(
        'name = "t"\n' + SHELL + '[[volumes]]\nhost = "data"\nguest = "/data"\nreadonly = false\n'
        '[[volumes]]\nhost = "/abs/cache"\nguest = "/cache"\n'
    )
    assert [(v.host, v.guest, v.readonly) for v in w.volumes] == [
        ("/srv/proj/data", "/data", False),
        ("/abs/cache", "/cache", True),
    ]
    inline = parse('name = "t"\nvolumes = [{host = "../shared", guest = "/shared"}]\n' + SHELL)
    assert inline.volumes[0].host == "/srv/shared"


def test_packages_keep_order_and_drop_duplicates() -> None:
    w = parse(
        'name = "t"\npackages = ["python3", "libc6", "python3", "g++", "libstdc++6"]\n' + SHELL
    )
    assert w.packages == ("python3", "libc6", "g++", "libstdc++6")


def test_overrides_win_over_the_file() -> None:
    text = 'name = "t"\nvcpus = 1\nmemory_mib = 256\ndata_disk = "1G"\n' + SHELL
    w = parse(text, overrides=ManifestOverrides(vcpus=4, memory="1024M", data_disk="8G"))
    assert (w.vcpus, w.memory_mib, w.data_disk_bytes) == (4, 1024, 8 * 1024**3)
    partial = parse(text, overrides=ManifestOverrides(memory="2G"))
    assert (partial.vcpus, partial.memory_mib, partial.data_disk_bytes) == (1, 2048, 1024**3)


def test_load_from_directory_and_from_file_with_default_name(tmp_path: Path) -> None:
    project = tmp_path / "My-Web"
    project.mkdir()
    (project / "mvm.toml").write_text(SHELL + '[[volumes]]\nhost = "data"\nguest = "/data"\n')
    by_dir = load_manifest(project)
    by_file = load_manifest(str(project / "mvm.toml"))
    assert by_dir == by_file
    assert by_dir.name == "my-web"
    assert by_dir.volumes[0].host == str(project / "data")


def test_load_manifest_passes_overrides(tmp_path: Path) -> None:
    (tmp_path / "mvm.toml").write_text('name = "t"\n' + SHELL)
    assert load_manifest(tmp_path, overrides=ManifestOverrides(vcpus=3)).vcpus == 3


def test_field_names_quote_what_toml_would_quote() -> None:
    assert field_name("entrypoint", "command") == "entrypoint.command"
    assert field_name("extra_files", "/etc/motd", "mode") == 'extra_files."/etc/motd".mode'
    assert field_name("volumes", 0, "host") == "volumes[0].host"
    assert field_name("extra_files", "/a\nb") == 'extra_files."/a\\nb"'


# -- mistakes --------------------------------------------------------------------------------


def test_toml_syntax_error_names_line_and_column() -> None:
    failure('name = "t"\nvcpus = \n' + SHELL, None, "not valid TOML", "line 2", "column")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as info:
        load_manifest(tmp_path)
    assert info.value.path == str(tmp_path / "mvm.toml")
    assert "no such file" in str(info.value)
    assert "create mvm.toml or point at the directory that has it" in str(info.value)
    with pytest.raises(ManifestError, match="no such file or directory"):
        load_manifest(tmp_path / "nowhere")


def test_unreadable_encoding(tmp_path: Path) -> None:
    (tmp_path / "mvm.toml").write_bytes(b'name = "\xff"\n')
    with pytest.raises(ManifestError, match="not UTF-8"):
        load_manifest(tmp_path)


@pytest.mark.parametrize(
    ("text", "field", "suggestion"),
    [
        ('name = "t"\nmemroy_mib = 256\n' + SHELL, "memroy_mib", "memory_mib"),
        ('name = "t"\ncpus = 2\n' + SHELL, "cpus", "vcpus"),
        ('name = "t"\n[entrypoint]\nshel = "/bin/sh"\n', "entrypoint.shel", "shell"),
        ('name = "t"\n' + SHELL + "[uids]\nagnet = 991\n", "uids.agnet", "agent"),
        ('name = "t"\n' + SHELL + "[network]\nmdoe = 'open'\n", "network.mdoe", "mode"),
        (
            'name = "t"\n' + SHELL + '[extra_files."/etc/motd"]\ncontent = "x"\nmod = "0644"\n',
            'extra_files."/etc/motd".mod',
            "mode",
        ),
        (
            'name = "t"\n[entrypoint.services.web]\ncommand = ["/a"]\nrestrat = "always"\n',
            "entrypoint.services.web.restrat",
            "restart",
        ),
        (
            'name = "t"\n' + SHELL + '[[volumes]]\nhost = "a"\nguest = "/a"\nread_only = true\n',
            "volumes[0].read_only",
            "readonly",
        ),
    ],
)
def test_unknown_keys_suggest_the_closest(text: str, field: str, suggestion: str) -> None:
    err = failure(text, field, "unknown key")
    assert suggestion in (err.fix or "")


def test_unknown_key_without_a_close_match_lists_the_known_ones() -> None:
    err = failure('name = "t"\nzzz = 1\n' + SHELL, "zzz", "unknown key")
    assert "entrypoint" in (err.fix or "")


@pytest.mark.parametrize(
    ("text", "field", "word"),
    [
        ('name = 5\n' + SHELL, "name", "string"),
        ('name = "t"\nvcpus = "2"\n' + SHELL, "vcpus", "integer"),
        ('name = "t"\nvcpus = 1.5\n' + SHELL, "vcpus", "float"),
        ('name = "t"\nvcpus = true\n' + SHELL, "vcpus", "boolean"),
        ('name = "t"\nmemory_mib = "256M"\n' + SHELL, "memory_mib", "integer"),
        ('name = "t"\nmem = 1024\n' + SHELL, "mem", "string"),
        ('name = "t"\ndev = "yes"\n' + SHELL, "dev", "true or false"),
        ('name = "t"\npackages = "python3"\n' + SHELL, "packages", "array"),
        ('name = "t"\npackages = [3]\n' + SHELL, "packages[0]", "string"),
        ('name = "t"\nentrypoint = "/bin/sh"\n', "entrypoint", "table"),
        ('name = "t"\n[entrypoint]\nshell = ["/bin/sh"]\n', "entrypoint.shell", "string"),
        ('name = "t"\n[entrypoint]\ncommand = "/bin/app --serve"\n', "entrypoint.command", "array"),
        ('name = "t"\n[entrypoint]\ncommand = ["/a", 1]\n', "entrypoint.command[1]", "string"),
        ('name = "t"\nuids = 5\n' + SHELL, "uids", "table"),
        ('name = "t"\n' + SHELL + '[uids]\nagent = "990"\n', "uids.agent", "integer"),
        ('name = "t"\nextra_files = ["/etc/motd"]\n' + SHELL, "extra_files", "table"),
        ('name = "t"\n' + SHELL + '[extra_files."/etc/motd"]\ncontent = 5\n',
         'extra_files."/etc/motd".content', "string"),
        ('name = "t"\n' + SHELL + '[extra_files]\n"/etc/motd" = "hi"\n',
         'extra_files."/etc/motd"', "table"),
        ('name = "t"\nhypervisor = 1\n' + SHELL, "hypervisor", "one of"),
        ('name = "t"\nvolumes = {host = "a", guest = "/a"}\n' + SHELL, "volumes", "array"),
        ('name = "t"\nvolumes = ["a:/a"]\n' + SHELL, "volumes[0]", "table"),
        ('name = "t"\n' + SHELL + '[[volumes]]\nhost = "a"\nguest = "/a"\nreadonly = "no"\n',
         "volumes[0].readonly", "true or false"),
        ('name = "t"\nnetwork = "open"\n' + SHELL, "network", "table"),
        ('name = "t"\n' + SHELL + "[network]\nforward = 8080\n", "network.forward", "array"),
    ],
)  # fmt: skip
def test_wrong_types(text: str, field: str, word: str) -> None:
    failure(text, field, word)


def test_two_entrypoint_forms() -> None:
    failure('name = "t"\n[entrypoint]\nshell = "/bin/sh"\ncommand = ["/bin/true"]\n',
            "entrypoint", "shell and command", "exactly one")  # fmt: skip


def test_command_and_services_together() -> None:
    text = 'name = "t"\n[entrypoint]\ncommand = ["/a"]\n[entrypoint.services.w]\ncommand = ["/b"]\n'
    failure(text, "entrypoint", "command and services")


@pytest.mark.parametrize("text", ['name = "t"\n', 'name = "t"\n[entrypoint]\n'])
def test_no_entrypoint(text: str) -> None:
    err = failure(text, "entrypoint")
    assert "shell" in (err.fix or "") and "command" in (err.fix or "")


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        ('mem = "12Q"', "mem", ["'12Q' is not a size"]),
        ('mem = "1.5M"', "mem", ["whole number of MiB"]),
        ('data_disk = "12Q"', "data_disk", ["'12Q' is not a size"]),
        ('data_disk = "512K"', "data_disk", ["smaller than 1M"]),
        ('memory_mib = 256\nmem = "256M"', "mem", ["memory_mib and mem are both given"]),
        ("vcpus = 0", "vcpus", ["out of range"]),
        ("vcpus = -2", "vcpus", ["-2", "out of range"]),
        ("vcpus = 65", "vcpus", ["out of range"]),
        ("memory_mib = 32", "memory_mib", ["32 MiB is too small", "64"]),
        ("memory_mib = 0", "memory_mib", ["too small"]),
        ("memory_mib = -256", "memory_mib", ["too small"]),
        ('mem = "16M"', "mem", ["too small"]),
        ('hypervisor = "qemm"', "hypervisor", ['"qemm" is not one of']),
    ],
)
def test_bad_sizes_and_resources(text: str, field: str, words: list[str]) -> None:
    failure(f'name = "t"\n{text}\n' + SHELL, field, *words)


def test_bad_hypervisor_suggests() -> None:
    err = failure('name = "t"\nhypervisor = "qemm"\n' + SHELL, "hypervisor")
    assert "qemu" in (err.fix or "")


@pytest.mark.parametrize(
    ("path", "word"),
    [("etc/motd", "absolute"), ("/etc/../root/.ssh/keys", "'..'"), ("/", "not / itself"),
     ("/etc/", "directory"), ("/init", "written by mvm"), ("/etc/mvm/name", "written by mvm"),
     ("/usr/lib/mvm/agent/session.py", "written by mvm"), ("//init", "written by mvm"),
     ("//etc/mvm/uids", "written by mvm"), ("///usr//lib/mvm/x", "written by mvm")],
)  # fmt: skip
def test_bad_extra_file_paths(path: str, word: str) -> None:
    text = 'name = "t"\n' + SHELL + f'[extra_files."{path}"]\ncontent = "x"\n'
    failure(text, f'extra_files."{path}"', word)


def test_extra_file_paths_that_differ_only_in_slashes_are_the_same_file() -> None:
    text = ('name = "t"\n' + SHELL + '[extra_files."/a"]\ncontent = "x"\n[extra_files."//a"]\ncontent = "y"\n')
    failure(text, 'extra_files."//a"', "same file")


def test_extra_file_needs_content() -> None:
    text = 'name = "t"\n' + SHELL + '[extra_files."/etc/motd"]\nmode = "0644"\n'
    failure(text, 'extra_files."/etc/motd".content', "missing")


def test_duplicate_extra_files_after_normalising() -> None:
    text = (
        'name = "t"\n'
        + SHELL
        + ('[extra_files."/etc/motd"]\ncontent = "a"\n[extra_files."/etc/./motd"]\ncontent = "b"\n')
    )
    failure(text, 'extra_files."/etc/./motd"', "same file")


@pytest.mark.parametrize(
    ("mode", "word"),
    [('"0999"', "not an octal mode"), ('"rwx"', "not an octal mode"), ('""', "octal"),
     ('"77777"', "larger than 0o7777"), ("0o17777", "larger than 0o7777"), ("-1", "negative"),
     ("644", "decimal"), ("1.5", "float"), ("true", "boolean")],
)  # fmt: skip
def test_bad_modes(mode: str, word: str) -> None:
    text = 'name = "t"\n' + SHELL + f'[extra_files."/etc/motd"]\ncontent = "x"\nmode = {mode}\n'
    failure(text, 'extra_files."/etc/motd".mode', word)


def test_decimal_mode_hint_names_the_octal_spelling() -> None:
    text = 'name = "t"\n' + SHELL + '[extra_files."/etc/motd"]\ncontent = "x"\nmode = 755\n'
    err = failure(text, 'extra_files."/etc/motd".mode')
    assert '"0755"' in (err.fix or "") and "0o755" in (err.fix or "")


@pytest.mark.parametrize("policy", ["sometimes", "Always", "on_failure"])
def test_bad_restart_policy(policy: str) -> None:
    text = f'name = "t"\n[entrypoint.services.web]\ncommand = ["/a"]\nrestart = "{policy}"\n'
    err = failure(
        text, "entrypoint.services.web.restart", f'"{policy}" is not one of', "on-failure"
    )
    assert err.fix


def test_service_problems() -> None:
    failure('name = "t"\n[entrypoint.services.web]\nrestart = "always"\n',
            "entrypoint.services.web.command", "missing")  # fmt: skip
    failure('name = "t"\n[entrypoint]\nservices = {}\n', "entrypoint.services", "no services")
    failure('name = "t"\n[entrypoint.services."Web Server"]\ncommand = ["/a"]\n',
            'entrypoint.services."Web Server"', "not a valid name")  # fmt: skip
    failure('name = "t"\n[entrypoint.services.web]\ncommand = []\n',
            "entrypoint.services.web.command", "empty")  # fmt: skip


@pytest.mark.parametrize(
    ("command", "word"),
    [("[]", "empty"), ('["bin/app"]', "absolute path or a bare name"), ('[""]', "absolute path")],
)
def test_bad_commands(command: str, word: str) -> None:
    failure(f'name = "t"\n[entrypoint]\ncommand = {command}\n', "entrypoint.command", word)


def test_nul_in_an_argument() -> None:
    text = 'name = "t"\n[entrypoint]\ncommand = ["/bin/app", "a\\u0000b"]\n'
    failure(text, "entrypoint.command[1]", "NUL")


def test_relative_shell() -> None:
    failure('name = "t"\n[entrypoint]\nshell = "sh"\n', "entrypoint.shell", "absolute")


@pytest.mark.parametrize(
    "package", ["Python3", "python 3", "a", "-foo", "python3:amd64", "foo_bar"]
)
def test_bad_package_names(package: str) -> None:
    packages = json.dumps(["busybox", package])
    failure(f'name = "t"\npackages = {packages}\n' + SHELL, "packages[1]", "Debian package name")


@pytest.mark.parametrize("uid", [-1, 65535, 100000])
def test_uid_out_of_range(uid: int) -> None:
    failure('name = "t"\n' + SHELL + f"[uids]\nentrypoint = {uid}\n", "uids.entrypoint", str(uid))


def test_agent_never_runs_as_root() -> None:
    failure('name = "t"\n' + SHELL + "[uids]\nagent = 0\n", "uids.agent", "never runs as root")


@pytest.mark.parametrize("uids", ["entrypoint = 990", "agent = 1000", "agent = 5\nentrypoint = 5"])
def test_entrypoint_never_shares_the_agent_uid(uids: str) -> None:
    failure('name = "t"\n' + COMMAND + f"[uids]\n{uids}\n", "uids.entrypoint", "agent's uid")


@pytest.mark.parametrize(
    "spec",
    ["8080", "a:b", "1:2:3:4", "localhost:8080:80", "0:80", "8080:70000", "::1:80:80",
     "[::1:80:80", ":8080:80", "8080:80 "],
)  # fmt: skip
def test_bad_forward_specs(spec: str) -> None:
    text = f'name = "t"\n{SHELL}[network]\nforward = ["8000:80", "{spec}"]\n'
    err = failure(text, "network.forward[1]")
    assert "[ADDR:]HOSTPORT:GUESTPORT" in (err.fix or "")


def test_duplicate_forward_host_port() -> None:
    text = f'name = "t"\n{SHELL}[network]\nforward = ["8080:80", "127.0.0.1:8080:81"]\n'
    failure(text, "network.forward[1]", "already forwarded")


@pytest.mark.parametrize("entry", ["api.example.com", ":443", "api.example.com:https", "a b:1"])
def test_bad_allow_entries(entry: str) -> None:
    text = f'name = "t"\n{SHELL}[network]\nmode = "allow-list"\nallow = ["{entry}"]\n'
    failure(text, "network.allow[0]", "host:port")


def test_allow_without_allow_list_mode() -> None:
    text = f'name = "t"\n{SHELL}[network]\nallow = ["api.example.com:443"]\n'
    err = failure(text, "network.allow", '"deny"')
    assert "allow-list" in (err.fix or "")


def test_bad_network_mode() -> None:
    err = failure(f'name = "t"\n{SHELL}[network]\nmode = "allowlist"\n', "network.mode")
    assert "allow-list" in (err.fix or "")


@pytest.mark.parametrize(
    ("volume", "field", "word"),
    [('host = "a"', "volumes[0].guest", "missing"), ('guest = "/a"', "volumes[0].host", "missing"),
     ('host = "a"\nguest = "a"', "volumes[0].guest", "absolute"),
     ('host = ""\nguest = "/a"', "volumes[0].host", "empty")],
)  # fmt: skip
def test_bad_volumes(volume: str, field: str, word: str) -> None:
    failure(f'name = "t"\n{SHELL}[[volumes]]\n{volume}\n', field, word)


def test_duplicate_volume_guest_path() -> None:
    volumes = '[[volumes]]\nhost = "a"\nguest = "/d"\n[[volumes]]\nhost = "b"\nguest = "/d/"\n'
    text = f'name = "t"\n{SHELL}{volumes}'
    failure(text, "volumes[1].guest", "already a volume")


@pytest.mark.parametrize("name", ["Web", "my app", "-x", ""])
def test_bad_name(name: str) -> None:
    failure(f'name = "{name}"\n' + SHELL, "name", "not a valid name")


def test_underivable_name_suggests_one() -> None:
    err = failure(SHELL, "name", '"My Project!"', base_dir=Path("/tmp/My Project!"))
    assert 'name = "my-project"' in (err.fix or "")


def test_path_is_named_in_errors() -> None:
    failure("vcpus = 0\n" + SHELL, "vcpus", path="examples/web/mvm.toml")


# -- the Nix builder -------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["flake", "profile"])
def test_flake_without_nix(monkeypatch: pytest.MonkeyPatch, key: str) -> None:
    monkeypatch.setattr("shutil.which", lambda name, *a, **k: None)
    err = failure(f'name = "t"\n{key} = "."\n' + SHELL, key, "needs `nix`", "not installed here")
    assert err.fix == "remove flake/profile to use mvm's built-in Debian builder"


def test_flake_with_nix_is_not_supported_yet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.which", lambda name, *a, **k: f"/usr/bin/{name}")
    err = failure('name = "t"\nflake = "."\nprofile = "web"\n', "flake", "not supported")
    assert "built-in Debian builder" in (err.fix or "")


def test_flake_must_be_a_string() -> None:
    failure('name = "t"\nflake = true\n' + SHELL, "flake", "string")


# -- overrides -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "flag", "word"),
    [
        (ManifestOverrides(memory="12Q"), "--mem", "'12Q' is not a size"),
        (ManifestOverrides(memory="1024"), "--mem", "whole number of MiB"),
        (ManifestOverrides(memory="32M"), "--mem", "too small"),
        (ManifestOverrides(vcpus=0), "--vcpus", "0"),
        (ManifestOverrides(vcpus=-1), "--vcpus", "-1"),
        (ManifestOverrides(vcpus=65), "--vcpus", "65"),
        (ManifestOverrides(data_disk="lots"), "--data-disk", "'lots' is not a size"),
        (ManifestOverrides(data_disk="100K"), "--data-disk", "smaller than 1M"),
    ],
)
def test_bad_overrides_name_the_flag(overrides: ManifestOverrides, flag: str, word: str) -> None:
    with pytest.raises(UsageError) as info:
        parse('name = "t"\n' + SHELL, overrides=overrides)
    assert str(info.value).startswith(f"{flag}: ")
    assert word in str(info.value)
    assert info.value.fix


def test_override_does_not_hide_a_broken_file() -> None:
    with pytest.raises(ManifestError, match="both given"):
        parse(
            'name = "t"\nmem = "1G"\nmemory_mib = 1\n' + SHELL,
            overrides=ManifestOverrides(memory="2G"),
        )


# -- mvmctl validate -------------------------------------------------------------------------


def test_validate_is_exported() -> None:
    assert COMMANDS == [validate]


def test_validate_prints_a_summary(tmp_path: Path) -> None:
    (tmp_path / "mvm.toml").write_text(
        'name = "web"\nvcpus = 2\nmem = "512M"\npackages = ["python3"]\n' + COMMAND
    )
    result = CliRunner().invoke(validate, [str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = dict(line.split(None, 1) for line in result.output.splitlines())
    assert lines["name"] == "web"
    assert lines["entrypoint"].startswith("command /usr/bin/python3")
    assert lines["image"] == "sealed"
    assert lines["uids"] == "agent 990, entrypoint 1000"
    assert (lines["vcpus"], lines["memory"], lines["packages"]) == ("2", "512M", "python3")


def test_validate_json_is_the_workload(tmp_path: Path) -> None:
    (tmp_path / "mvm.toml").write_text('name = "web"\n' + SHELL)
    result = CliRunner().invoke(validate, ["--json", str(tmp_path / "mvm.toml")])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data == load_manifest(tmp_path).model_dump(mode="json")
    assert Workload.model_validate(data).accessible


def test_validate_defaults_to_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "mvm.toml").write_text('name = "here"\n' + SHELL)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(validate, [])
    assert result.exit_code == 0 and "here" in result.output


def test_validate_raises_manifest_errors(tmp_path: Path) -> None:
    (tmp_path / "mvm.toml").write_text('name = "t"\n')
    result = CliRunner().invoke(validate, [str(tmp_path)])
    assert isinstance(result.exception, ManifestError)
    assert result.exception.field == "entrypoint"


def test_mvmctl_validate_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    """The real CLI: once main.py registers validate, a bad manifest is one line, no traceback."""
    (tmp_path / "mvm.toml").write_text('name = "t"\nvcpus = 0\n' + SHELL)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(
        [sys.executable, "-m", "mvm.cli.main", "validate", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "vcpus" in proc.stderr and "fix:" in proc.stderr
    assert proc.stdout == ""
