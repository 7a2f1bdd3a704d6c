"""``python -m masstasker.cli``: the ``masstasker`` command."""

from masstasker.cli.main import entry_point

if __name__ == "__main__":
    entry_point()
