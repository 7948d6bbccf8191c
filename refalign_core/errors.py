"""The one error type users see for bad input: the message names the input and what is expected."""

import sys


class RefAlignInputError(ValueError):
    """Bad user input (file, tensor, option). The message says which input and what was expected."""


def first_non_finite(module) -> str | None:
    """The name of a torch module's first parameter holding NaN or inf (fp8 ones read in fp32), or None: the likely
    cause an error about non-finite outputs names."""
    for name, param in module.named_parameters():
        if param.is_floating_point() and not bool(param.float().sum().isfinite()):
            return name
    return None


def run_command(main, argv=None) -> int:
    """Run a command-line `main`: bad input is one `error:` line and exit 2, a failing file system (a full disk, a
    missing permission) one line and exit 1, Ctrl-C exit 130; never a traceback for any of them."""
    try:
        return main(argv)
    except RefAlignInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
