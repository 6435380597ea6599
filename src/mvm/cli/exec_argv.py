"""`mvmctl exec`'s words read without click: ``exec [opts] NAME [opts] -- ARGV...``.

Importing click takes longer than a whole exec round trip, so cli/main.py tries this first.
It reads words the way click reads them for the `exec` command in cli/guest.py, and gives up
(None) on anything else: no ``--``, help, an unknown option, a missing value, a number that is
not one... Click then parses those words and prints its own help or error.
tests/unit/test_exec_argv.py holds the two parsers to the same answers.
"""

from __future__ import annotations

# option -> the click command's parameter it sets
VALUE_OPTIONS = {"--env": "env_pairs", "--cwd": "cwd", "--timeout": "timeout"}
LONG_FLAGS = {"--interactive": "stdin", "--tty": "tty", "--receipt": "receipt"}
SHORT_FLAGS = {"i": "stdin", "t": "tty"}  # -i, -t, and combined: -it, -ti


def parse_exec_args(args: list[str]) -> dict[str, object] | None:
    """The `exec` command's parameters (as click's ``ctx.params``) for the words after `exec`,
    or None when only click can say what they mean."""
    positional: list[str] = []
    env_pairs: list[str] = []
    params: dict[str, object] = {"cwd": None, "timeout": None, "stdin": False, "tty": False, "receipt": False}
    rest = list(args)
    while rest:
        word = rest.pop(0)
        if word == "--":
            if len(positional) != 1 or not rest:
                return None
            return {"name": positional[0], "argv": tuple(rest), "env_pairs": tuple(env_pairs), **params}
        if not word.startswith("-") or word == "-":
            positional.append(word)
            continue
        option, equals, value = word.partition("=")
        if option in VALUE_OPTIONS:
            if not equals:
                if not rest:
                    return None
                value = rest.pop(0)  # whatever it is, as click takes it: `--cwd --` means cwd "--"
            if option == "--env":
                env_pairs.append(value)
            elif option == "--timeout":
                try:
                    params["timeout"] = float(value)
                except ValueError:
                    return None
            else:
                params["cwd"] = value
        elif word in LONG_FLAGS:
            params[LONG_FLAGS[word]] = True
        elif word[1] != "-" and set(word[1:]) <= SHORT_FLAGS.keys():
            for letter in word[1:]:
                params[SHORT_FLAGS[letter]] = True
        else:
            return None
    return None
