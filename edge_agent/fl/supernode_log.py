"""What the SuperNode supervisor reads in ``flower-supernode``'s log (Flower 1.41's words).

The supervisor follows the log while the SuperNode runs and reacts to a few lines; when
it exits, :func:`meaningful_line` names the cause (Flower prints ``Failed to activate
SuperNode`` for a node key the SuperLink does not know, ``CERTIFICATE_VERIFY_FAILED`` for
a wrong CA) and :func:`tls_hint` adds what to check, so a refusal is clear in the agent's
own log.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final

from edgefl.process import last_meaningful_line

__all__ = [
    "ANSI",
    "CAUSE",
    "ENDED",
    "HEALTHY",
    "NODE_ID",
    "NOISE",
    "REFUSED",
    "RETRYING",
    "TROUBLE",
    "meaningful_line",
    "tls_hint",
]

ANSI: Final = re.compile(r"\x1b\[[0-9;]*m")
CAUSE: Final = re.compile(
    r"Failed to activate SuperNode|CERTIFICATE_VERIFY_FAILED|\[SSL|\[code: \d+\]|"
    r"Traceback|Error:|Exception|refused|denied|No such file|Permission",
)
"""A line naming why the SuperNode stopped."""
NOISE: Final = (
    "INFO",
    "For more information",
    "Exit Code",
    "The SuperNode could not establish",
    "Failed to initialize the connection",
)
"""Prefixes of Flower's generic wrapper lines and chatter, never the cause."""
RETRYING: Final = "Connection attempt failed"
"""An unreachable SuperLink: the SuperNode retries by itself."""
ENDED: Final = ("Giving up reconnection", "SuperNode terminated gracefully")
"""Flower 1.41's SuperNode prints these when it gives up (reconnecting through a network
cut fails after two ~30 s TLS handshake timeouts) but may stay alive afterwards, no
longer connected and no longer retrying: either line counts as the end of the process."""
TROUBLE: Final = ("SSL/TLS handshake error detected", "Failed to send message")
"""After a network cut Flower 1.41's SuperNode can also wedge without saying so: a TLS
error, then silence, alive but no longer polling or retrying. Silence is normal for an
idle SuperNode, so only silence right after such an error counts; a :data:`HEALTHY` line
(a message received or sent, an activation) clears the suspicion."""
HEALTHY: Final = ("Received successfully", "Sent successfully", "SuperNode ID:")
NODE_ID: Final = re.compile(r"SuperNode ID: (\d+)")
REFUSED: Final = "edgefl app trust: edgefl refused"
"""How the ClientApp gate (edgefl.edge_agent.fl.apptrust) reports a refusal on stderr."""


def meaningful_line(text: str) -> str:
    """The line of SuperNode output that best names why it stopped (``""`` if none).

    Prefers the last line naming a cause (Flower's ``[code: N] ...`` line, an SSL error,
    a traceback's last line); skips Flower's generic wrapper lines and INFO chatter.
    """
    return last_meaningful_line(
        text,
        causes=CAUSE,
        noise=NOISE,
        skip=(RETRYING,),
        levels=("ERROR", "WARNING", "CRITICAL"),
    )


def tls_hint(line: str, superlink: str, ca: Path) -> str:
    """What to check when ``line`` is a TLS failure towards ``superlink`` (else ``""``)."""
    if "CERTIFICATE_VERIFY_FAILED" in line or "[SSL" in line:
        return (
            f"TLS to {superlink} failed: is {ca} the CA that signed the "
            "SuperLink's certificate, and does the certificate name this address?"
        )
    return ""
