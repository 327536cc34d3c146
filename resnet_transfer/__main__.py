"""`python -m resnet_transfer ...` (and `torchrun -m resnet_transfer ...`) runs the `rt` CLI."""

from resnet_transfer.cli import main

if __name__ == "__main__":
    main()
