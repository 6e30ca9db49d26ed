"""Command-line plumbing shared by the scripts (train_gpt, fineweb, evaluate, convert_hf, plot, tools/):
one voice for their errors, and --help generated from a settings dataclass.

A user's mistake (a setting, a path, missing data, no network) ends a script with one line that
names the problem and the fix; anything else is a bug and keeps its traceback. The mistakes are
the exceptions of the classes in each script's USER_ERRORS: UserError below (and its subclasses), and the ValueError
subclasses that model.py (ConfigError) and dataloader.py (DataError, DataNotFound) define for
themselves, since those two files import nothing of the project's.
"""

import argparse
import dataclasses
import inspect
import io
import os
import re
import sys
import tokenize


class UserError(Exception):
    """A mistake the user can fix; its message names the problem and the fix."""


# The same, as the standard exception a caller may already catch for it:
class BadInput(UserError, ValueError):
    """A value, file content or combination of options that cannot work."""


class NotFound(UserError, FileNotFoundError):
    """A file or folder the user named (or a default one) is missing."""


class Unreachable(UserError, ConnectionError):
    """The network or a hub is needed and cannot be reached; the message says the offline way."""


class MissingPackage(UserError, ImportError):
    """An optional package is needed: the message names the pip install."""


class SettingsError(UserError, ValueError):
    """Settings that cannot work together, or a value a setting does not take."""


class RunError(UserError, RuntimeError):
    """A problem with the run's environment or its training that the user has to fix."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad argument answered in one line (argparse prints the whole usage first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def print_help(text):
    """Print --help; a reader that stops early (`--help | head`) ends it quietly, not with a
    BrokenPipeError traceback (Python's advice: point stdout at devnull so the exit's flush is quiet)."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def summary(doc):
    """The first sentence of a docstring."""
    return " ".join(doc.strip().split("\n\n")[0].split()).split(". ")[0].rstrip(".") + "."


def dataclass_groups(cls):
    """A settings dataclass as documented in its source: [(group title, [(field, comment)])].

    A run of comment-only lines starts a group (its title: the lines joined); each field's meaning
    is its trailing `# comment`. Fields before any such line form a group titled "". Fields a
    dataclass inherits (train_gpt.Settings inherits model.ModelOptions) come first, as dataclasses
    orders them, each documented in the source of the class that defines it."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    groups = []
    for klass in reversed(cls.__mro__):
        own = inspect.get_annotations(klass)
        if dataclasses.is_dataclass(klass) and own:
            groups += source_groups(klass, {name: f for name, f in fields.items() if name in own})
    return [(title, entries) for title, entries in groups if entries]


def source_groups(cls, fields):
    """dataclass_groups of the fields (by name) that cls's own source defines."""
    source = inspect.getsource(cls)
    comments = {}  # line number -> comment text
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    groups, title_lines, previous_was_title = [("", [])], [], False
    for number, line in enumerate(source.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("#"):
            if not previous_was_title:
                title_lines = []
                groups.append(("", []))
            title_lines.append(comments[number])
            groups[-1] = (" ".join(title_lines), groups[-1][1])
            previous_was_title = True
            continue
        previous_was_title = False
        match = re.match(r"(\w+)\s*:", stripped)
        if match and match.group(1) in fields:
            groups[-1][1].append((fields[match.group(1)], comments.get(number, "")))
    return groups


def default_text(field):
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "(required)"
    return str(value)


def settings_help(cls):
    """Every field of a settings dataclass as `--name=default  meaning`, grouped as in its source."""
    lines = []
    for title, entries in dataclass_groups(cls):
        if title:
            lines += ["", f"{title}:"]
        width = max(len(f"--{f.name}={default_text(f)}") for f, _ in entries)
        for f, comment in entries:
            lines.append(f"  {f'--{f.name}={default_text(f)}':<{width}}  {comment}".rstrip())
    return "\n".join(lines).lstrip("\n")
