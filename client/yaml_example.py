"""NonBlockingConcurrentHandler from a YAML file (client/logging.yaml).

PyYAML turns the file into a dictConfig dictionary; environment variables in
it (${CLH_EXAMPLE_LOG}) are expanded first. Needs ``pip install pyyaml``.

Run (from the project root):

    python client/yaml_example.py logs/app.log                  # daemon at the default endpoint
    python client/yaml_example.py logs/app.log --endpoint none  # no daemon: embedded writer

The log file may also come from $CLH_EXAMPLE_LOG; the default endpoint honours
$CLH_WRITERD_ENDPOINT.
"""

import argparse
import logging
import logging.config
import os

import yaml

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "logging.yaml")


def load_config(path: str = CONFIG) -> dict:
    with open(path) as f:
        return yaml.safe_load(os.path.expandvars(f.read()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logfile", nargs="?", default=os.environ.get("CLH_EXAMPLE_LOG", "logs/example.log"))
    parser.add_argument("--endpoint", default="", help="daemon endpoint, or 'none' for no daemon")
    parser.add_argument("--records", type=int, default=1000)
    args = parser.parse_args()
    os.environ["CLH_EXAMPLE_LOG"] = os.path.abspath(args.logfile)
    os.makedirs(os.path.dirname(os.environ["CLH_EXAMPLE_LOG"]), exist_ok=True)

    config = load_config()
    if args.endpoint:
        config["handlers"]["file"]["endpoint"] = None if args.endpoint == "none" else args.endpoint
    logging.config.dictConfig(config)

    log = logging.getLogger("example.yaml")
    for n in range(args.records):
        log.info("SEQ yaml %d %s", n, "x" * (n % 37))
    print(f"state={logging.getLogger().handlers[0].get_stats()['state']}")


if __name__ == "__main__":
    main()
