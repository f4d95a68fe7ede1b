"""`python -m moerm.cli ...`: what torchrun and accelerate launch start (`-m moerm.cli train ...`)."""

from moerm.cli import main

main()
