"""
Command-line configuration shared by every script, in nanoGPT's style. A script keeps its settings as
module-level variables with a comment each, then calls

    config = configure(globals())

which applies, in order, any config files and --key=value arguments from the command line:

    python train.py config/shakespeare_char.py --batch_size=32 --compile=False

A config file is a Python file whose top-level assignments override the defaults. --key=value values
are parsed as Python literals (--dropout=0.1, --compile=False) and otherwise kept as strings
(--device=cuda); a bare --flag turns a boolean setting on (--plan is --plan=True). A value must have its
default's type (an int may stand for a float, anything may replace a None default). Mistakes end the program with a one-line error and exit code 2; --help lists every
key with its default and comment.
"""
import ast
import difflib
import io
import os
import sys
import tokenize
import types

CONFIG_TYPES = (int, float, bool, str, type(None))


class ConfigError(Exception):
    """A mistake on the command line or in a config file."""


class Config(dict):
    """The settings, by key; .explicit names those the command line or a config file set, .defaults holds the
    script's own values, .before_auto the value each setting set to 'auto' had before."""
    explicit = frozenset()
    defaults = {}
    before_auto = {}


def fail(message):
    """End a script on bad input: one line on stderr, exit code 2, no traceback."""
    print(f'error: {message}', file=sys.stderr)
    sys.exit(2)


def config_keys(namespace):
    """The settings of a script: its public module-level variables of simple types. Names in capitals are constants
    (a file name, a threshold), the script's own or imported, not settings."""
    return [k for k, v in namespace.items() if not k.startswith('_') and not k.isupper() and isinstance(v, CONFIG_TYPES)]


def _check_type(key, value, default):
    if default is None:
        return value
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(value, bool) and isinstance(default, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
        value = float(value) if ok else value
    else:
        ok = type(value) is type(default)
    if not ok:
        raise ConfigError(f'{key} must be {type(default).__name__} like its default {default!r}, got {value!r}')
    return value


def _unknown_key(key, known):
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else '; --help lists them'
    return ConfigError(f'unknown config key {key!r}{hint}')


LITERAL_LIMIT = 100  # characters: no number, bool or None is longer, and Python's parser runs out of memory on long text


def _literal(raw, limit=LITERAL_LIMIT):
    """raw as a Python literal, or raw itself where it is none (or longer than limit)."""
    if len(raw) > limit:
        return raw
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return raw


def _parse_value(raw, default):
    if isinstance(default, str):
        # a string setting keeps its text as typed (so --start=123 is the prompt "123"), unless quoted; it never goes
        # through the parser otherwise (a prompt of a few thousand words made it raise MemoryError)
        if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in '\'"':
            value = _literal(raw, len(raw) if raw[0] not in raw[1:-1] else LITERAL_LIMIT)  # one quoted token: cheap
            return value if isinstance(value, str) else raw
        return raw
    return _literal(raw)


def _comments(path):
    """The trailing comment of each top-level assignment in a script, for --help."""
    comments = {}
    try:
        with open(path, encoding='utf-8') as f:
            tokens = list(tokenize.generate_tokens(io.StringIO(f.read()).readline))
    except (OSError, SyntaxError, tokenize.TokenError):
        return comments
    line_start = {}
    for tok in tokens:
        if tok.type == tokenize.NAME and tok.start[1] == 0:
            line_start[tok.start[0]] = tok.string
        elif tok.type == tokenize.COMMENT and tok.start[0] in line_start:
            comments.setdefault(line_start[tok.start[0]], tok.string.lstrip('# '))
    return comments


def help_text(namespace, defaults):
    script = namespace.get('__file__', sys.argv[0])
    comments = _comments(script)
    lines = [f'usage: python {os.path.relpath(script)} [config/file.py ...] [--key=value ...]', '', 'keys:']
    width = max(len(k) for k in defaults)
    for key, value in defaults.items():
        comment = f'  # {comments[key]}' if key in comments else ''
        lines.append(f'  --{key.ljust(width)} = {value!r}{comment}')
    return '\n'.join(lines)


def _assigned_names(source):
    """The names a config file assigns at its top level (even to their default value)."""
    names = set()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets = [node.target]
        else:
            continue
        for target in targets:
            names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    return names


def apply_config(defaults, argv, positional=None, aliases=None, auto=()):
    """Return the settings in defaults overridden by argv, as a Config; raise ConfigError on mistakes.
    positional: the setting that an argument which is no config file sets (sample.py's prompt); aliases maps other
    names of a setting to it; auto names the settings that may also be 'auto' (the script works them out)."""
    config = Config(defaults)
    explicit, before_auto = set(), {}

    def assign(key, value):
        if value == 'auto' and key in auto:
            if config[key] != 'auto':
                before_auto[key] = config[key]
            config[key] = value
        else:
            config[key] = _check_type(key, value, defaults[key])
    known = list(defaults)
    aliases = aliases or {}
    for arg in argv:
        if not arg.startswith('--') and positional and not os.path.isfile(arg) and not arg.endswith('.py'):
            config[positional] = arg
            explicit.add(positional)
        elif not arg.startswith('--'):
            if not os.path.isfile(arg):
                raise ConfigError(f'config file {arg!r} not found (config files are Python files, e.g. config/shakespeare_char.py)')
            scope = dict(config)
            try:
                with open(arg, encoding='utf-8') as f:
                    source = f.read()
                exec(compile(source, arg, 'exec'), scope)
                explicit.update(_assigned_names(source) & config.keys())
            except Exception as e:
                raise ConfigError(f'error in config file {arg}: {type(e).__name__}: {e}') from None
            for key, value in scope.items():
                if key.startswith('_') or key in config and value is config[key]:
                    continue
                if key not in config:
                    if isinstance(value, (types.ModuleType, types.FunctionType, type)):
                        continue  # the file's imports and helpers
                    raise ConfigError(f'{arg}: {_unknown_key(key, known)}')
                assign(key, value)
        else:
            key, sep, raw = arg[2:].partition('=')
            if not sep and isinstance(defaults.get(aliases.get(key, key)), bool):
                sep, raw = '=', 'True'  # a bare --flag turns a boolean setting on (train.py --plan)
            if not sep or not key:
                raise ConfigError(f'malformed argument {arg!r}: use --key=value')
            key = aliases.get(key, key)
            if key not in config:
                raise _unknown_key(key, known)
            assign(key, _parse_value(raw, defaults[key]))
            explicit.add(key)
    config.explicit, config.defaults, config.before_auto = frozenset(explicit), dict(defaults), before_auto
    return config


def inherit(config, saved, keep=()):
    """Take every setting of saved (a resumed run's config) that config has, was not set explicitly, and is not
    in keep; returns the keys whose value changed. Raises ConfigError on a value of the wrong type."""
    taken = []
    for key, value in saved.items():
        if key in config and key not in config.explicit and key not in keep:
            value = _check_type(key, value, config.defaults[key])
            if value != config[key]:
                config[key] = value
                taken.append(key)
    return taken


def choose(config, key, allowed):
    """The setting key as one of allowed, matched without regard to case ('ReLU' is 'relu'); ConfigError otherwise."""
    value = config[key]
    if value in allowed:
        return value
    matches = [a for a in allowed if isinstance(value, str) and a.lower() == value.lower()]
    if len(matches) == 1:
        config[key] = matches[0]
        return matches[0]
    close = difflib.get_close_matches(str(value).lower(), allowed, n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'? " if close else ''
    raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}: {hint}".rstrip(': '))


def configure(namespace, argv=None, positional=None, aliases=None, auto=()):
    """Apply the command line to a script's settings in place (namespace is its globals()) and return
    them as a dict. --help prints the keys and exits; a mistake prints one line and exits with code 2.
    positional, aliases and auto: see apply_config."""
    argv = sys.argv[1:] if argv is None else argv
    defaults = {k: namespace[k] for k in config_keys(namespace)}
    if any(a in ('-h', '--help') for a in argv):
        try:
            print(help_text(namespace, defaults))
        except BrokenPipeError:  # --help | head
            pass
        sys.exit(0)
    try:
        config = apply_config(defaults, argv, positional, aliases, auto)
    except ConfigError as e:
        fail(e)
    namespace.update(config)
    return config


def run_folder_arguments(argv, doc, out_example, script_example):
    """The arguments of a command that reads training runs (plot.py, report.py): run folders, and --out=FILE
    (None when not given). --help prints doc and exits; a mistake ends the program with one line."""
    out, runs = None, []
    for arg in argv:
        if arg in ('-h', '--help'):
            try:
                print(doc.strip())
            except BrokenPipeError:  # --help | head
                pass
            sys.exit(0)
        if arg.startswith('--out='):
            out = arg[len('--out='):]
        elif arg.startswith('--'):
            fail(f'unknown option {arg}: the arguments are run folders, and --out={out_example}')
        else:
            runs.append(arg)
    if not runs:
        fail(f'name at least one run folder (an out_dir of train.py), e.g. {script_example}')
    return runs, out
