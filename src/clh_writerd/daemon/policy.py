"""What a client may ask the daemon to do to a file, beyond the protocol's type checks.

The protocol checks that each option has the right type and range; this
policy decides whether the daemon, possibly running with more privilege than
the client, should do it at all. Every refusal is ``bad_options`` with a
message that names the option and the rule (docs/security.md lists them).
"""

import codecs
from typing import Any, Dict, Mapping, Sequence

from ..protocol import E_BAD_OPTIONS, ProtocolError, check_file_options

# Text encodings the daemon writes: each line is newline-terminated text
# that any reader can split (latin-1 and friends would let a client write
# arbitrary bytes; utf-16 puts NULs in the file). codecs.lookup names.
ALLOWED_ENCODINGS = ("utf-8", "ascii")
# No setuid, setgid, sticky or execute bit, for anyone.
FORBIDDEN_MODE_BITS = 0o7111
# newline values that keep "\n" a newline in the file ("\r" would turn every
# line end into a carriage return).
ALLOWED_NEWLINES = (None, "", "\n", "\r\n")


def refuse(option: str, rule: str) -> ProtocolError:
    return ProtocolError(E_BAD_OPTIONS, f"option {option!r} refused: {rule}")


class OptionPolicy:
    """``check(options)``: the validated options, or ProtocolError(bad_options) naming option and rule."""

    def __init__(self, allow_owner: bool) -> None:
        self.allow_owner = allow_owner

    def check(self, options: Mapping[str, Any]) -> Dict[str, Any]:
        opts = check_file_options(options)
        chmod = opts.get("chmod")
        if chmod is not None and chmod & FORBIDDEN_MODE_BITS:
            raise refuse("chmod", f"{oct(chmod)} sets setuid/setgid/sticky/execute bits "
                                  f"(the rule: chmod & {oct(FORBIDDEN_MODE_BITS)} == 0)")
        if "owner" in opts and not self.allow_owner:
            raise refuse("owner", "chown on a client's behalf is off (allow_owner = false)")
        if "encoding" in opts:
            name = codecs.lookup(opts["encoding"]).name  # check_file_options made sure it exists
            if name not in ALLOWED_ENCODINGS:
                raise refuse("encoding", f"{opts['encoding']!r} is not one of {', '.join(ALLOWED_ENCODINGS)}")
            opts["encoding"] = name
        terminator = opts.get("terminator", "\n")
        if not terminator.endswith("\n"):
            raise refuse("terminator", f"{terminator!r} does not end in a newline (\\n)")
        if opts.get("newline") not in ALLOWED_NEWLINES:
            raise refuse("newline", f"{opts['newline']!r} is not one of {ALLOWED_NEWLINES}")
        if "when" not in opts and opts.get("maxBytes", 0) > 0 and opts.get("backupCount", 0) == 0:
            raise refuse("backupCount", "0 with maxBytes > 0 makes concurrent-log-handler truncate the file at "
                                        "each rollover, deleting acknowledged lines (use backupCount >= 1)")
        return opts

    @staticmethod
    def encodable(opts: Mapping[str, Any], lines: Sequence[str]) -> bool:
        """False if the file's encoding would have to drop a whole line
        (ascii with unicode_error_policy = "strict"); utf-8 encodes every
        string the protocol can carry."""
        if opts.get("encoding") == "ascii" and opts.get("unicode_error_policy") == "strict":
            return all(line.isascii() for line in lines)
        return True
