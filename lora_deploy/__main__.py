"""The `lora-deploy` console script and `python -m lora_deploy`: the CLI (lora_deploy.cli),
with a Ctrl-C during its imports (the first tenth of a second) ending like one anywhere
else, exit 130 and one line, rather than a traceback from the middle of an import."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from lora_deploy.cli import main as cli
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: no partial output left behind\n")
        sys.exit(130)
    cli(prog_name="lora-deploy")


if __name__ == "__main__":
    main()
