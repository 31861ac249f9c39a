"""``python -m clh_writerd`` is the ``clh-writerd`` command."""

from .cli import main

if __name__ == "__main__":
    main()
