"""Run a Python snippet that uses `vmthunder` inside a UML node and get its result back.

Each call is a new Python process on the node: state must come back from the kernel, which is
what a restarted nova-compute does. The snippet calls `out(value)` to return JSON; a
`vmthunder.Error` it raises comes back as `GuestError` with the exception's class name.
"""

import json
import textwrap
import uuid

PRELUDE = """\
import json, logging, os, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
import vmthunder
def out(v):
    print("@@JSON " + json.dumps(v))
"""


class GuestError(AssertionError):
    """A snippet raised (exc_type = the vmthunder exception class name) or failed."""

    def __init__(self, node, exc_type, message, output):
        super().__init__(f"{node}: {exc_type}: {message}\n{output[-3000:]}")
        self.exc_type = exc_type
        self.message = message


def py(node, code, timeout=180):
    body = (
        PRELUDE
        + "try:\n"
        + textwrap.indent(textwrap.dedent(code), "    ")
        + """
except vmthunder.Error as e:
    print("@@ERR " + json.dumps([type(e).__name__, str(e)]))
    sys.exit(3)
"""
    )
    path = node.write_file(f"snippet-{uuid.uuid4().hex[:10]}.py", body.encode())
    rc, output = node.run(f"python3 {path}", timeout=timeout)
    result = None
    for line in output.splitlines():
        if line.startswith("@@ERR "):
            t, m = json.loads(line[6:])
            raise GuestError(node.name, t, m, output)
        if line.startswith("@@JSON "):
            result = json.loads(line[7:])
    if rc != 0:
        raise GuestError(node.name, "exit", f"snippet failed rc={rc}", output)
    return result
