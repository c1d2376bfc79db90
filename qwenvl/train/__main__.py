"""`python -m qwenvl.train ...` (also under torchrun) is `qwenvl train ...`."""
import sys

from .cli import main_train

if __name__ == "__main__":
    sys.exit(main_train(sys.argv[1:]))
