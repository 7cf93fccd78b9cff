"""User-facing errors: one line naming the problem and the fix; the CLIs exit with code 2."""

from __future__ import annotations

import argparse


class GroupshotError(ValueError):
    """A problem with the user's input or environment that the user can fix."""


class ModelUnavailableError(GroupshotError):
    """Weights that were asked for cannot be had (offline, missing folder, ...)."""


def run_cli(main, argv=None, *, prog: str) -> int:
    """Run a CLI body; user errors become `prog: error: ...` on stderr and exit code 2.

    Only problems the user can fix are caught here; a bug still shows its traceback.
    """
    import errno
    import logging
    import os
    import sys

    # Libraries read these at import: keep their chatter (float32 notes, safety-checker
    # banners) out of the user's terminal; our own warnings still show.
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(level=os.environ.get("GROUPSHOT_LOG", "INFO").upper(), format=f"{prog}: %(message)s")
    for noisy in ("diffusers", "transformers", "accelerate", "peft", "httpx", "huggingface_hub", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    # A file name that is not valid UTF-8 (kept by Python as surrogates) must print, not crash.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")

    def fail(msg: str) -> int:
        print(f"{prog}: error: {' '.join(str(msg).split())}", file=sys.stderr)
        return 2

    try:
        return int(main(argv) or 0)
    except GroupshotError as e:
        return fail(str(e))
    except FileNotFoundError as e:
        return fail(f"{e.filename or e}: file not found")
    except IsADirectoryError as e:
        return fail(f"{e.filename}: is a folder, expected a file")
    except PermissionError as e:
        return fail(f"{e.filename or e}: permission denied; check the folder is writable")
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" {e.filename}" if e.filename else ""
            return fail(f"disk full while writing{where}; free some space (nothing was replaced)")
        if e.errno == errno.EROFS:
            return fail(f"{e.filename or 'the output folder'} is on a read-only file system; choose a writable folder")
        if e.errno == errno.ENAMETOOLONG:
            return fail(f"{e.filename or ''}: file name too long for this file system; use a shorter name")
        raise
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line through run_cli (exit 2), not usage + message."""

    def error(self, message: str) -> None:
        raise GroupshotError(f"{message} (see {self.prog} --help)")
