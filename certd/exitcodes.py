"""Exit codes shared by ``certd`` and ``certctl``.

Values follow sysexits(3) where one fits, so that shell scripts and systemd
(``RestartPreventExitStatus=``) can tell failure classes apart.
"""

OK = 0
#: The input was well-formed but a check failed (verify found problems, or build/install
#: refused a chain that parses but does not validate).
CHECK_FAILED = 1
#: Command-line usage error (argparse's own code).
USAGE = 2
#: ``certctl fetch``: the buffer was too small; the answer carries the page count.
NOSPACE = 3
#: ``certctl status``: the daemon answers, but a profile serves the empty table (no blob,
#: or a blob that failed the policy), a stale blob, or a leaf or CRL expiring soon.
DEGRADED = 4
#: The input is malformed: not a certificate, not a blob, not a report.
DATAERR = 65
#: An input file does not exist or cannot be read.
NOINPUT = 66
#: The daemon or a needed service is not reachable.
UNAVAILABLE = 69
#: Internal error (a bug): please report it.
SOFTWARE = 70
#: Writing an output failed (disk full, read-only filesystem, permissions).
IOERR = 74
#: Busy: a lock was not obtained in time, or the daemon answered EAGAIN. Retry later.
BUSY = 75
#: Refused: the daemon's access control said no.
NOPERM = 77
#: The configuration file is invalid.
CONFIG = 78

DESCRIPTIONS = {
    OK: "success",
    CHECK_FAILED: "a check failed (details printed)",
    USAGE: "usage error",
    NOSPACE: "buffer too small (ENOSPC): the required page count is printed",
    DEGRADED: "degraded (status): a profile serves the empty table or a stale blob, or its "
              "leaf or CRL expires within --warn-days",
    DATAERR: "invalid input data (certificate, blob, report)",
    NOINPUT: "input file missing or unreadable",
    UNAVAILABLE: "daemon or service unavailable",
    SOFTWARE: "internal error",
    IOERR: "could not write output",
    BUSY: "busy: lock not obtained in time or EAGAIN; retry",
    NOPERM: "refused by access control",
    CONFIG: "invalid configuration",
}


def epilog() -> str:
    """The exit-code table for ``--help`` epilogues."""
    return "exit codes:\n" + "\n".join(f"  {k:>3}  {v}" for k, v in DESCRIPTIONS.items())
