"""NonBlockingConcurrentHandler from an INI file (client/logging.ini).

logging.config.fileConfig builds the handler with
``class=clh_writerd.NonBlockingConcurrentHandler``; ``args`` builds the wrapped
concurrent-log-handler handler (fileConfig needs a class, so it cannot use the
factory as dictConfig does). The log file and the endpoint are filled in from
fileConfig's ``defaults``.

Run (from the project root):

    python client/fileconfig_example.py logs/app.log                  # daemon at the default endpoint
    python client/fileconfig_example.py logs/app.log --endpoint none  # no daemon: embedded writer

The log file may also come from $CLH_EXAMPLE_LOG; the default endpoint honours
$CLH_WRITERD_ENDPOINT.
"""

import argparse
import logging
import logging.config
import os

from clh_writerd import protocol

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "logging.ini")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logfile", nargs="?", default=os.environ.get("CLH_EXAMPLE_LOG", "logs/example.log"))
    parser.add_argument("--endpoint", default="", help="daemon endpoint, or 'none' for no daemon")
    parser.add_argument("--records", type=int, default=1000)
    args = parser.parse_args()
    logfile = os.path.abspath(args.logfile)
    os.makedirs(os.path.dirname(logfile), exist_ok=True)
    endpoint = None if args.endpoint == "none" else (args.endpoint or protocol.default_endpoint())

    # The defaults are substituted into the INI text: pass Python literals.
    logging.config.fileConfig(CONFIG, defaults={"logfile": logfile, "endpoint": repr(endpoint)},
                              disable_existing_loggers=False)
    log = logging.getLogger("example.fileconfig")
    for n in range(args.records):
        log.info("SEQ fileconfig %d %s", n, "x" * (n % 37))
    print(f"state={logging.getLogger().handlers[0].get_stats()['state']}")


if __name__ == "__main__":
    main()
