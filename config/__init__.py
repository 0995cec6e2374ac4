"""The whole config system, nanoGPT-style.

A script defines its config as plain module globals (ints, floats, bools, strings, tuples, None),
then calls `configure(globals())`. Each command-line argument is either a path to a `config/*.py`
file, which is executed over those globals, or `--key=value`, which overrides one of them. Unknown
keys and type mismatches are errors, so a typo never silently trains the wrong model.

From `configure` on, a user error (a bad key or value, a missing or damaged file: the ValueError,
KeyError, TypeError and OSError families) ends the script with one line on stderr, `error: ...`, and
exit code 2; NANORAD_DEBUG=1 or --debug=True shows the traceback instead.
"""
import ast
import difflib
import os
import sys

CONFIG_TYPES = (int, float, bool, str, tuple, type(None))
# keys that once meant the same thing under another name in some script: the configurator points at
# today's name instead of just refusing the old one
RENAMED_KEYS = {
    "vit_size": "model_size", "arch": "model_size",
    "amp": "dtype", "amp_dtype": "dtype",
    "num_threads": "cpu_threads",
    "log_every": "log_interval",
    "n_phantoms": "phantom_sizes", "n_phantom_train": "phantom_sizes", "n_phantom_val": "phantom_sizes",
    "n_phantom_test": "phantom_sizes", "phantom_size_px": "phantom_px", "data": "data_path",
    "bart_size": "decoder_size", "bart_init": "decoder_init",
}


def config_keys(namespace):
    """The names a user may set: the script's simple-typed globals, except _private and
    UPPER_CASE constants (tables of choices, not settings)."""
    return [k for k, v in namespace.items()
            if not k.startswith("_") and not k.isupper() and isinstance(v, CONFIG_TYPES)]


def unknown_key_error(key, keys, where):
    """A one-line KeyError that names the key and the closest known one (renamed or mistyped)."""
    guess = RENAMED_KEYS.get(key) if RENAMED_KEYS.get(key) in keys else None
    guess = guess or next(iter(difflib.get_close_matches(key, keys, n=1, cutoff=0.6)), None)
    hint = f"; did you mean {guess}?" if guess else f"; known keys: {', '.join(sorted(keys))}"
    return KeyError(f"{where}unknown config key {key}{hint}")


def parse_value(text):
    """`--lr=3e-4` -> 3e-4, `--name=vits` -> 'vits' (a bare word stays a string)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def check_type(key, old, new):
    """Allow int where float is expected and anything where None was the default; else exact."""
    if old is None or new is None:
        return new
    if isinstance(old, float) and isinstance(new, int) and not isinstance(new, bool):
        return float(new)
    if isinstance(old, tuple) and isinstance(new, (list, int, float, str)):
        new = tuple(new) if isinstance(new, list) else (new,)
    if type(old) is not type(new):
        raise TypeError(f"config key '{key}': expected {type(old).__name__} "
                        f"(default {old!r}), got {type(new).__name__} {new!r}")
    return new


USER_ERRORS = (ValueError, KeyError, TypeError, OSError)


def report_user_errors(kind, error, traceback):
    """sys.excepthook: a user error is one line and exit code 2; anything else (a bug) keeps its traceback."""
    if not issubclass(kind, USER_ERRORS):
        return sys.__excepthook__(kind, error, traceback)
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    if "Original Traceback" in message:  # raised in a DataLoader worker: its own message is the last line
        message = message.strip().splitlines()[-1].split(": ", 1)[-1]
    sys.stdout.flush()
    # the process's own stderr: under torchrun, init_process_group wraps this hook with one that points
    # sys.stderr at a buffer and prints the buffer when the hook returns, which this one never does
    print(f"error: {message}", file=sys.__stderr__, flush=True)
    os._exit(2)  # not sys.exit: DataLoader workers and process groups must not turn this into a traceback


def configure(namespace, argv=None):
    """Apply config files and --key=value overrides to `namespace`; return the final config dict."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug=True" in argv or os.environ.get("NANORAD_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a not in ("--debug=True", "--debug=False")]
    if not debug:
        sys.excepthook = report_user_errors
    keys = set(config_keys(namespace))
    for arg in argv:
        if not arg.startswith("--"):
            # a config file: plain Python assigning some of the keys
            file_vars = {}
            try:
                with open(arg) as f:
                    exec(compile(f.read(), arg, "exec"), {}, file_vars)
            except FileNotFoundError:
                raise FileNotFoundError(f"config file '{arg}' not found (expected a path like config/omnirad_vits14.py)")
            for key, value in file_vars.items():
                if key.startswith("_") or isinstance(value, type(sys)) or callable(value):
                    continue
                if key not in keys:
                    raise unknown_key_error(key, keys, f"{arg}: ")
                namespace[key] = check_type(key, namespace[key], value)
        else:
            if "=" not in arg:
                raise ValueError(f"argument '{arg}': expected --key=value")
            key, text = arg[2:].split("=", 1)
            if key not in keys:
                raise unknown_key_error(key, keys, "")
            namespace[key] = check_type(key, namespace[key], parse_value(text))
    return {k: namespace[k] for k in sorted(keys)}
