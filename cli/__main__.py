"""`python -m sbn_surgery_cli ...` (what torchrun launches) runs the same app as `sbn-surgery`."""

from sbn_surgery_cli.app import main

if __name__ == "__main__":
    main()
