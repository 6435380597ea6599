"""`mvmctl network NAME [--allow ENTRY]... [--deny ENTRY]... [--json]`: show or change a
running allow-list VM's destinations."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

from mvm.core.state import MvmHome
from mvm.runtime import allow_list


def network_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """`up` and `run`: --network MODE and --allow ENTRY, over what mvm.toml says."""
    command = click.option("--allow", "allow_entries", multiple=True, metavar="ENTRY",
                           help="With allow-list: a destination (host:port, *.domain:port, CIDR:port; "
                                "repeatable), added to mvm.toml's.")(command)
    return click.option("--network", "network_mode", type=click.Choice(["deny", "allow-list", "open"]),
                        help="The network mode, instead of mvm.toml's [network] mode.")(command)


@click.command()
@click.argument("name")
@click.option("--allow", multiple=True, metavar="ENTRY",
              help="Add a destination: host:port, *.domain:port or CIDR:port (repeatable).")
@click.option("--deny", multiple=True, metavar="ENTRY", help="Remove a destination, as listed (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the mode and the list as JSON.")
def network(name: str, allow: tuple[str, ...], deny: tuple[str, ...], as_json: bool) -> None:
    """Show VM NAME's network mode and allow-list, or change the list while it runs.

    \b
      mvmctl network web                                   show
      mvmctl network web --allow api.example.com:443       add
      mvmctl network web --deny 127.0.0.1:5432             remove

    The host checks every connection the guest asks for against the list; new connections
    use the changed list, open ones run on. Only a VM started with [network] mode =
    "allow-list" has a list.
    """
    home = MvmHome.default()
    if allow or deny:
        entries = allow_list.change(home, name, allow, deny)
        mode = "allow-list"
    else:
        mode, entries = allow_list.current(home, name)
    if as_json:
        click.echo(json.dumps({"name": name, "network": mode, "allow": entries}, indent=2))
    elif mode != "allow-list":
        click.echo(f"VM {name}: network {mode} (no allow-list)")
    elif not entries:
        click.echo(f"VM {name}: network allow-list, empty (nothing reachable; add with --allow)")
    else:
        click.echo(f"VM {name}: network allow-list")
        for entry in entries:
            click.echo(f"  allow {entry}")


COMMANDS = [network]
